"""Manifest sets: which files of a folder form an official split, and reading several manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.manifest_sets import find_manifest_set, read_manifests
from pipeline.data.manifests import ManifestError, VideoEntry, detect_format


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(found: tuple[str, list[Path]] | None) -> tuple[str, list[str]] | None:
    return None if found is None else (found[0], [f.name for f in found[1]])


def test_each_dataset_folder_gives_its_files_train_first(tmp_path):
    for n in (1, 2):
        write(tmp_path / "ucf" / f"testlist0{n}.txt")
        write(tmp_path / "ucf" / f"trainlist0{n}.txt")
    write(tmp_path / "ucf/classInd.txt", "1 A\n")
    assert names(find_manifest_set(tmp_path / "ucf", split_number=2)) == (
        "ucf101", ["trainlist02.txt", "testlist02.txt"])
    for name in ("b_test_split1.txt", "a_test_split1.txt", "a_test_split2.txt"):
        write(tmp_path / "hmdb" / name)
    assert names(find_manifest_set(tmp_path / "hmdb")) == (
        "hmdb51", ["a_test_split1.txt", "b_test_split1.txt"])
    for name in ("test.csv", "validate.csv", "train.csv"):
        write(tmp_path / "kinetics" / name, "label,youtube_id,time_start,time_end,split\n")
    assert names(find_manifest_set(tmp_path / "kinetics")) == (
        "kinetics", ["train.csv", "validate.csv", "test.csv"])
    for name in ("labels.json", "validation.json", "train.json", "test.json"):
        write(tmp_path / "ssv2" / name, "[]")
    assert names(find_manifest_set(tmp_path / "ssv2")) == (
        "ssv2", ["train.json", "validation.json", "test.json"])


def test_a_folder_of_videos_is_no_set_and_csv_sets_are_asked_for(tmp_path):
    write(tmp_path / "raw/jump/a.mp4")
    write(tmp_path / "raw/notes.csv", "path,label\n")
    assert find_manifest_set(tmp_path / "raw") is None
    assert names(find_manifest_set(tmp_path / "raw", "csv")) == ("csv", ["notes.csv"])
    with pytest.raises(ManifestError, match=r"raw: no kinetics manifest files in this folder"):
        find_manifest_set(tmp_path / "raw", "kinetics")


def test_read_manifests_keeps_each_files_split_and_its_name(tmp_path):
    header = "label,youtube_id,time_start,time_end,split\n"
    train = write(tmp_path / "train.csv", header + "run,a,0,10,train\n")
    val = write(tmp_path / "validate.csv", header + "run,b,0,10,validate\n")
    assert read_manifests([train, val], video_root=tmp_path) == [
        VideoEntry(tmp_path / "run/a_000000_000010.mp4", "run", "train", "train"),
        VideoEntry(tmp_path / "run/b_000000_000010.mp4", "run", "val", "validate")]
    with pytest.raises(ManifestError, match="no manifest files"):
        read_manifests([])
    with pytest.raises(ManifestError, match=r"classInd.txt: this is a class list"):
        detect_format(write(tmp_path / "classInd.txt", "1 A\n"))
