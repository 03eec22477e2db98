"""Official split sets: several manifest files read as one video list, every video keeping its split.

A dataset's official split comes as a set of files, read together by one decode:

| dataset | the files of split N (a folder holding them, or a list of them) |
|---|---|
| UCF101 | `trainlist0N.txt` and `testlist0N.txt` (`classInd.txt` beside them is read for the classes) |
| HMDB51 | `<class>_test_splitN.txt`, one per class (`1` train, `2` test, `0` in neither) |
| Kinetics | `train.csv`, `validate.csv`, `test.csv` (`label,youtube_id,time_start,time_end,split`) |
| SSv2 | `train.json`, `validation.json`, `test.json` (`labels.json` beside them holds the classes) |

`find_manifest_set` picks the files of one split from a folder (None when the folder holds no split
files: a folder of videos); `read_manifests` reads any list of manifests into one list of
`VideoEntry`, each with its split as the file gives it. Errors are `ManifestError`s naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.manifests import (
    HMDB_FILE,
    MANIFEST_FORMATS,
    SPLITS,
    SSV2_LABELS,
    ManifestError,
    VideoEntry,
    detect_format,
    parse_manifest,
    split_of_name,
)

SET_FORMATS = ("ucf101", "hmdb51", "kinetics", "ssv2")  # what `auto` looks for in a folder
UCF101_FILE = re.compile(r"^(?P<kind>train|test)list(?P<number>\d+)\.txt$", re.IGNORECASE)


def find_manifest_set(folder: Path, fmt: str = "auto", split_number: int = 1
                      ) -> tuple[str, list[Path]] | None:
    """(format, files) of official split `split_number` in `folder`, train files first.

    With `fmt="auto"` the folder is searched for the files of every dataset in SET_FORMATS, and
    None is returned when it holds none (a folder of videos); files of two datasets are an error.
    A named `fmt` (`csv` too: every `*.csv` in the folder) must have files there.
    """
    folder = Path(folder)
    if fmt not in MANIFEST_FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; known: {', '.join(MANIFEST_FORMATS)}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    present = {name: found for name in (SET_FORMATS if fmt == "auto" else (fmt,))
               if (found := _candidates(files, name))}
    if not present:
        if fmt == "auto":
            return None
        raise ManifestError(f"{folder}: no {fmt} manifest files in this folder")
    if len(present) > 1:
        raise ManifestError(f"{folder}: holds the split files of {' and '.join(present)}; one decode "
                            "reads one dataset's (list the files to read)")
    (name, found), = present.items()
    return name, _of_split(folder, name, found, split_number)


def read_manifests(files: Sequence[Path], *, fmt: str = "auto", video_root: Path | None = None,
                   split_number: int = 1) -> list[VideoEntry]:
    """The videos of every manifest in `files`, in order, each keeping its split.

    Each file's format is detected unless `fmt` names it; relative video paths resolve against
    `video_root`, by default each manifest's folder.
    """
    if not files:
        raise ManifestError("no manifest files to read")
    return [entry for path in files
            for entry in parse_manifest(Path(path), fmt=fmt, video_root=video_root,
                                        split_number=split_number)]


def _candidates(files: list[Path], fmt: str) -> list[Path]:
    """The split files of dataset `fmt` among `files` (of every split number)."""
    if fmt == "ucf101":
        return [f for f in files if UCF101_FILE.match(f.name)]
    if fmt == "hmdb51":
        return [f for f in files if HMDB_FILE.match(f.name)]
    if fmt == "ssv2":
        return [f for f in files if f.suffix.lower() == ".json" and split_of_name(f)
                and f.name.lower() not in SSV2_LABELS]
    csvs = [f for f in files if f.suffix.lower() == ".csv"]
    if fmt == "kinetics":
        return [f for f in csvs if detect_format(f) == "kinetics"]
    return csvs


def _of_split(folder: Path, fmt: str, files: list[Path], split_number: int) -> list[Path]:
    """The files of split `split_number` (UCF101, HMDB51), ordered train, val, test, then by name."""
    if fmt in ("ucf101", "hmdb51"):
        pattern = UCF101_FILE if fmt == "ucf101" else HMDB_FILE
        numbers = {int(pattern.match(f.name)["number"]) for f in files}
        files = [f for f in files if int(pattern.match(f.name)["number"]) == split_number]
        wanted = (f"trainlist{split_number:02d}.txt and testlist{split_number:02d}.txt"
                  if fmt == "ucf101" else f"`<class>_test_split{split_number}.txt` files")
        if not files:
            raise ManifestError(f"{folder}: no {wanted} in this folder (it has split(s) "
                                f"{', '.join(map(str, sorted(numbers)))})")
        kinds = {UCF101_FILE.match(f.name)["kind"].lower() for f in files} if fmt == "ucf101" else None
        if kinds is not None and kinds != {"train", "test"}:
            raise ManifestError(f"{folder}: split {split_number} needs both {wanted}; only "
                                f"{files[0].name} is here (list it alone to decode only that file)")
    return sorted(files, key=lambda f: (_split_rank(f), f.name))


def _split_rank(path: Path) -> int:
    split = split_of_name(path) or ("test" if path.name.lower().startswith("test") else "train")
    return SPLITS.index(split)
