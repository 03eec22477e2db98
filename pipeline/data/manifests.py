"""Video lists for the `decode` stage: a folder of videos, or a manifest in one of the usual formats.

Every reader returns `VideoEntry(path, label, split, source_split)` rows. Formats (see `parse_manifest`):

- `csv`: `path,label[,split]`, optional header row; relative paths resolve against the video root.
- `ucf101`: `trainlist0N.txt` (`Class/v_Class_g08_c01.avi 1`) and `testlist0N.txt` (path only).
- `hmdb51`: `<class>_test_split<N>.txt` files (`video.avi 1|2|0`), one file or a folder of them.
- `ssv2`: Something-Something v2 JSON (`id`, `template`); the class is the template without brackets,
  checked against `labels.json` (or `something-something-v2-labels.json`) beside it.
- `kinetics`: `label,youtube_id,time_start,time_end,split[,is_cc]` CSV of YouTube clips.

A dataset's official split is a set of these files; pipeline/data/manifest_sets.py reads one set.

Malformed input raises `ManifestError` naming the file and 1-based line. Missing videos are not
errors here: the decode stage reports them per file, next to the ones it cannot decode.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import StageError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
MANIFEST_FORMATS = ("auto", "csv", "ucf101", "hmdb51", "ssv2", "kinetics")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validate": "val", "validation": "val", "test": "test", "testing": "test"}
HMDB_FILE = re.compile(r"^(?P<label>.+)_test_split(?P<number>\d+)\.txt$")
_HMDB_IDS = {"1": "train", "2": "test"}  # "0": in neither half of this split
SSV2_LABELS = ("labels.json", "something-something-v2-labels.json")
UCF101_CLASSES = "classInd.txt"


@dataclass(frozen=True)
class VideoEntry:
    """One video to decode: its file, its class name (None = unlabelled), its split (`train`, `val`
    or `test`; None = unknown) and that split as its manifest names it (`validate`, `validation`)."""

    path: Path
    label: str | None
    split: str | None
    source_split: str | None = None


class ManifestError(StageError, ValueError):
    """A manifest is malformed or of unknown format; the message names the file and line."""


def _fail(path: Path, line: int | None, what: str) -> ManifestError:
    return ManifestError(f"{path}{f', line {line}' if line else ''}: {what}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise _fail(path, line, "not UTF-8 text") from None


def _text_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-blank line."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            yield number, line.split()


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of each non-blank CSV record."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, [cell.strip() for cell in row]
    except csv.Error as err:
        raise _fail(path, reader.line_num, f"bad CSV: {err}") from None


def _split(path: Path, line: int, value: str | None) -> str | None:
    """Normalise a split name (`validate` -> `val`); empty -> None; anything else is an error."""
    if not value:
        return None
    if value.lower() not in _SPLIT_ALIASES:
        raise _fail(path, line, f"unknown split {value!r}; expected one of {', '.join(SPLITS)}")
    return _SPLIT_ALIASES[value.lower()]


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def scan_folder(root: Path) -> list[VideoEntry]:
    """Video files under `root`: those directly in it are unlabelled, those in a sub-folder (at any
    depth) take the top-level sub-folder's name as label. Hidden files and folders are skipped;
    the order is by relative path, so it is the same on every machine."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder of videos")
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune: never descend into hidden folders
        rel = Path(folder).relative_to(root)
        found += [((*rel.parts, f), Path(folder, f)) for f in files if _is_video(f)]
    return [VideoEntry(path, parts[0] if len(parts) > 1 else None, None)
            for parts, path in sorted(found)]


def _parse_csv(path: Path, root: Path) -> list[VideoEntry]:
    entries = []
    for i, (line, row) in enumerate(_csv_rows(path)):
        if i == 0 and row[0].lower() == "path":
            continue  # header row
        if len(row) > 3 or not row[0]:
            raise _fail(path, line, f"expected `path,label[,split]`, got {len(row)} cells {row}")
        label, split = (row[1:] + ["", ""])[:2]
        entries.append(VideoEntry(root / row[0], label or None, _split(path, line, split), split or None))
    return entries


def _ucf101_classes(path: Path) -> dict[int, str] | None:
    """classInd.txt beside a UCF101 split file (`1 ApplyEyeMakeup`), or None when it is absent."""
    ind = path.with_name(UCF101_CLASSES)
    if not ind.is_file():
        return None
    classes = {}
    for line, fields in _text_rows(ind):
        if len(fields) != 2 or not fields[0].isdigit():
            raise _fail(ind, line, f"expected `<index> <class>`, got {' '.join(fields)!r}")
        classes[int(fields[0])] = fields[1]
    return classes


def _parse_ucf101(path: Path, root: Path) -> list[VideoEntry]:
    train = path.name.lower().startswith("trainlist")
    classes = _ucf101_classes(path)
    known = {name.lower() for name in classes.values()} if classes else None
    entries = []
    for line, fields in _text_rows(path):
        video, *index = fields
        label = Path(video).parts[0] if len(Path(video).parts) > 1 else None
        if len(fields) != (2 if train else 1) or label is None or (index and not index[0].isdigit()):
            form = "<Class>/<video> <index>" if train else "<Class>/<video>"
            raise _fail(path, line, f"expected `{form}`, got {' '.join(fields)!r}")
        if classes is not None and index and classes.get(int(index[0]), "").lower() != label.lower():
            raise _fail(path, line, f"class index {index[0]} is {classes.get(int(index[0]))!r} "
                        f"in classInd.txt, but the video is in folder {label!r}")
        if known is not None and label.lower() not in known:
            raise _fail(path, line, f"class {label!r} is not in classInd.txt")
        split = "train" if train else "test"
        entries.append(VideoEntry(root / video, label, split, split))
    return entries


def _parse_hmdb51(path: Path, root: Path, split_number: int = 1) -> list[VideoEntry]:
    if path.is_dir():
        files = sorted(f for f in path.iterdir()
                       if (m := HMDB_FILE.match(f.name)) and int(m["number"]) == split_number)
        if not files:
            raise _fail(path, None, f"no `<class>_test_split{split_number}.txt` files in this folder")
        return [entry for f in files for entry in _parse_hmdb51(f, root)]
    match = HMDB_FILE.match(path.name)
    if not match:
        raise _fail(path, None, "HMDB51 split files are named `<class>_test_split<N>.txt`")
    entries = []
    for line, fields in _text_rows(path):
        if len(fields) != 2 or fields[1] not in ("0", *_HMDB_IDS):
            raise _fail(path, line, f"expected `<video> <0|1|2>`, got {' '.join(fields)!r}")
        if fields[1] != "0":
            label = match["label"]
            split = _HMDB_IDS[fields[1]]
            entries.append(VideoEntry(root / label / fields[0], label, split, split))
    return entries


def _json_items(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, item) of each element of a top-level JSON list, so errors can name a line."""
    text, decoder, skip = _read_text(path), json.JSONDecoder(), re.compile(r"\s*")
    line, seen = 1, 0

    def line_at(pos: int) -> int:  # counts newlines incrementally: SSv2 lists have ~170k items
        nonlocal line, seen
        line, seen = line + text.count("\n", seen, pos), pos
        return line

    pos = skip.match(text).end()
    if not text.startswith("[", pos):
        raise _fail(path, line_at(pos), "expected a JSON list of objects")
    pos = skip.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _fail(path, err.lineno, f"invalid JSON: {err.msg}") from None
        yield line_at(pos), item
        pos = skip.match(text, end).end()
        if text.startswith(",", pos):
            pos = skip.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise _fail(path, line_at(pos), "expected ',' or ']' in the JSON list")


def split_word(path: Path) -> str | None:
    """The split a file name gives (`something-something-v2-validation.json` -> "validation"), as
    written; None unless exactly one split is named."""
    words = {w for w in re.split(r"[^a-z]+", path.stem.lower()) if w in _SPLIT_ALIASES}
    return words.pop() if len(words) == 1 else None


def split_of_name(path: Path) -> str | None:
    """The normalised split a file name gives (`validate.csv` -> "val"), or None."""
    word = split_word(path)
    return _SPLIT_ALIASES[word] if word else None


def _ssv2_labels(path: Path) -> tuple[Path, set[str] | None]:
    """The SSv2 class list beside `path` and its class names (None when there is no such file)."""
    files = [path.with_name(name) for name in SSV2_LABELS]
    labels_file = next((f for f in files if f.is_file()), files[0])
    if not labels_file.is_file():
        return labels_file, None
    try:
        known = json.loads(_read_text(labels_file))
    except json.JSONDecodeError as err:
        raise _fail(labels_file, err.lineno, f"invalid JSON: {err.msg}") from None
    if not isinstance(known, dict):
        raise _fail(labels_file, 1, "expected a JSON object of `class: index`")
    return labels_file, set(known)


def _parse_ssv2(path: Path, root: Path) -> list[VideoEntry]:
    labels_file, known = _ssv2_labels(path)
    word, entries = split_word(path), []
    split = _SPLIT_ALIASES[word] if word else None
    for line, item in _json_items(path):
        if not isinstance(item, dict) or not str(item.get("id", "")).strip():
            raise _fail(path, line, f"expected an object with an \"id\", got {str(item)[:80]}")
        template = item.get("template")
        label = template.replace("[", "").replace("]", "") if isinstance(template, str) else None
        if label is not None and known is not None and label not in known:
            raise _fail(path, line, f"class {label!r} is not in {labels_file.name}")
        entries.append(VideoEntry(root / f"{str(item['id']).strip()}.webm", label, split, word))
    return entries


def _kinetics_path(root: Path, label: str | None, split_dirs: list[str], name: str) -> Path:
    """The first existing of root/<split>/<label>/name, root/<label>/name, root/name; if none
    exists, root/<label>/name, so that the decode stage reports that path as missing."""
    sub = label or ""
    candidates = [root / s / sub / name for s in split_dirs] + [root / sub / name, root / name]
    return next((c for c in candidates if c.is_file()), candidates[-2])


def _parse_kinetics(path: Path, root: Path) -> list[VideoEntry]:
    rows = _csv_rows(path)
    _, header = next(rows, (1, []))
    missing = {"youtube_id", "time_start", "time_end"} - set(header)
    if missing:
        raise _fail(path, 1, f"Kinetics header lacks column(s) {', '.join(sorted(missing))}")
    entries = []
    for line, row in rows:
        if len(row) != len(header):
            raise _fail(path, line, f"expected {len(header)} cells ({','.join(header)}), got {len(row)}")
        cell = dict(zip(header, row))
        try:
            start, end = (int(float(cell[k])) for k in ("time_start", "time_end"))
        except ValueError:
            raise _fail(path, line, "time_start and time_end must be numbers") from None
        label, raw_split = cell.get("label") or None, cell.get("split") or split_word(path) or ""
        split = _split(path, line, raw_split)
        name = f"{cell['youtube_id']}_{start:06d}_{end:06d}.mp4"
        split_dirs = list(dict.fromkeys(s for s in (raw_split, split) if s))  # `validate` or `val`
        entries.append(VideoEntry(_kinetics_path(root, label, split_dirs, name), label, split,
                                  raw_split or None))
    return entries


def detect_format(path: Path) -> str:
    """The manifest format of `path`, from its name (and a CSV's header); ManifestError if unknown."""
    name = path.name.lower()
    if path.is_dir():
        if any(HMDB_FILE.match(f.name) for f in path.iterdir()):
            return "hmdb51"
    elif name in (UCF101_CLASSES.lower(), *SSV2_LABELS):
        raise _fail(path, None, "this is a class list, read beside the split files; it is not a "
                    "manifest of videos")
    elif name.endswith(".json"):
        return "ssv2"
    elif name.endswith(".csv"):
        _, header = next(_csv_rows(path), (1, []))
        return "kinetics" if "youtube_id" in header else "csv"
    elif name.startswith(("trainlist", "testlist")):
        return "ucf101"
    elif "_split" in name:
        return "hmdb51"
    raise _fail(path, None, "cannot tell the manifest format; pass one of "
                f"{', '.join(MANIFEST_FORMATS[1:])} explicitly")


def parse_manifest(path: Path, *, fmt: str = "auto", video_root: Path | None = None,
                   split_number: int = 1) -> list[VideoEntry]:
    """Read the video list in manifest `path` (a file, or for HMDB51 a folder of split files).

    Relative video paths resolve against `video_root`, by default the manifest's folder.
    `split_number` picks which HMDB51 split files of a folder are read. Raises ManifestError
    (naming file and line) on malformed input; videos that do not exist are left to the caller.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest does not exist")
    if fmt not in MANIFEST_FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; known: {', '.join(MANIFEST_FORMATS)}")
    if split_number < 1:
        raise ManifestError(f"split_number must be >= 1, got {split_number}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if path.is_dir() and fmt != "hmdb51":
        raise _fail(path, None, f"a {fmt} manifest is a file, not a folder")
    parsers: dict[str, Callable[[Path, Path], list[VideoEntry]]] = {
        "csv": _parse_csv, "ucf101": _parse_ucf101, "ssv2": _parse_ssv2, "kinetics": _parse_kinetics,
        "hmdb51": functools.partial(_parse_hmdb51, split_number=split_number)}
    root = Path(video_root) if video_root is not None else (path if path.is_dir() else path.parent)
    return parsers[fmt](path, root)
