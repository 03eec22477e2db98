"""decode keeps the official splits of UCF101, HMDB51, Kinetics and SSv2: one decode reads a dataset's
split files (a folder of them, or `decode.manifests`), each video lands in its split's store split
(a test list becomes `val` where there is no validation split) and keeps its split's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr

from pipeline.core.errors import StageError
from pipeline.core.stores import SPLITS
from stages.decode import Params, run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def decode(tmp_path: Path, source: Path, **overrides) -> zarr.Group:
    params = Params(**{"workers": 0, "num_frames": 4, "stride": 1, "clips_per_video": 1,
                       "store_size": 32, **overrides})
    out = run(params, videos=source, clips=tmp_path / "clips.zarr", report=tmp_path / "report.json")
    return zarr.open_group(str(out["clips"]), mode="r")


def by_video(store: zarr.Group) -> dict[str, tuple[str, str, str]]:
    """File name -> (class, store split, split as the manifest names it) of every decoded video."""
    names, classes = store["videos"][:], store.attrs["class_names"]
    official = store["video_split"][:]
    out = {}
    for video, label, split in zip(store["video"][:], store["label"][:], store["split"][:], strict=True):
        out[Path(names[video]).name] = (classes[label] if label >= 0 else None, SPLITS[split],
                                        str(official[video]))
    return out


@pytest.fixture
def videos(make_video):
    """videos(root, *relpaths): tiny real videos at root/relpath (the extension is only a name)."""
    def make(root: str, *relpaths: str) -> None:
        for i, rel in enumerate(relpaths):
            make_video(f"{root}/{rel}", num_frames=8, height=32, width=32, seed=i)
    return make


def test_ucf101_folder_keeps_train_and_test_lists(tmp_path, videos):
    videos("UCF-101", "Jump/v_Jump_g01_c01.avi", "Jump/v_Jump_g02_c01.avi",
           "Run/v_Run_g01_c01.avi", "Run/v_Run_g02_c01.avi")
    lists = tmp_path / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 Jump\r\n2 Run\r\n")
    write(lists / "trainlist01.txt", "Jump/v_Jump_g01_c01.avi 1\r\nRun/v_Run_g01_c01.avi 2\r\n")
    write(lists / "testlist01.txt", "Jump/v_Jump_g02_c01.avi\r\nRun/v_Run_g02_c01.avi\r\n")
    write(lists / "trainlist02.txt", "Jump/v_Jump_g02_c01.avi 1\r\nRun/v_Run_g02_c01.avi 2\r\n")
    write(lists / "testlist02.txt", "Jump/v_Jump_g01_c01.avi\r\nRun/v_Run_g01_c01.avi\r\n")
    store = decode(tmp_path / "one", lists, video_root=tmp_path / "UCF-101")
    assert by_video(store) == {
        "v_Jump_g01_c01.avi": ("Jump", "train", "train"), "v_Run_g01_c01.avi": ("Run", "train", "train"),
        "v_Jump_g02_c01.avi": ("Jump", "val", "test"), "v_Run_g02_c01.avi": ("Run", "val", "test")}
    assert store.attrs["official_splits"] == {"test": "val", "train": "train"}
    second = by_video(decode(tmp_path / "two", lists, video_root=tmp_path / "UCF-101", split_number=2))
    assert second["v_Jump_g02_c01.avi"] == ("Jump", "train", "train")
    assert second["v_Jump_g01_c01.avi"] == ("Jump", "val", "test")


def test_hmdb51_split_files_keep_1_train_2_test_and_skip_0(tmp_path, videos):
    videos("hmdb51_org", "jump/j0.avi", "jump/j1.avi", "jump/j2.avi", "run/r0.avi", "run/r1.avi")
    splits = tmp_path / "testTrainMulti_7030_splits"
    write(splits / "jump_test_split1.txt", "j0.avi 1 \nj1.avi 2 \nj2.avi 0 \n")
    write(splits / "run_test_split1.txt", "r0.avi 2 \nr1.avi 1 \n")
    write(splits / "run_test_split2.txt", "r0.avi 1 \nr1.avi 2 \n")
    store = decode(tmp_path, splits, video_root=tmp_path / "hmdb51_org")
    assert by_video(store) == {
        "j0.avi": ("jump", "train", "train"), "j1.avi": ("jump", "val", "test"),
        "r0.avi": ("run", "val", "test"), "r1.avi": ("run", "train", "train")}


def test_kinetics_train_validate_test_csvs(tmp_path, videos):
    videos("k400", "train/abseiling/aaa_000000_000010.mp4", "train/zumba/bbb_000004_000014.mp4",
           "val/abseiling/ccc_000001_000011.mp4", "test/zumba/ddd_000002_000012.mp4")
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    notes = tmp_path / "annotations"
    write(notes / "train.csv", header + "abseiling,aaa,0,10,train,0\nzumba,bbb,4,14,train,0\n")
    write(notes / "validate.csv", header + "abseiling,ccc,1,11,validate,0\n")
    write(notes / "test.csv", "label,youtube_id,time_start,time_end\nzumba,ddd,2,12\n")  # split from the name
    store = decode(tmp_path, notes, video_root=tmp_path / "k400")
    assert by_video(store) == {
        "aaa_000000_000010.mp4": ("abseiling", "train", "train"),
        "bbb_000004_000014.mp4": ("zumba", "train", "train"),
        "ccc_000001_000011.mp4": ("abseiling", "val", "validate"),
        "ddd_000002_000012.mp4": ("zumba", "test", "test")}
    assert store.attrs["official_splits"] == {"test": "test", "train": "train", "validate": "val"}


def test_ssv2_jsons_with_labels_json_and_an_unlabelled_test(tmp_path, videos):
    videos("20bn-something-something-v2", "1.webm", "2.webm", "3.webm", "4.webm")
    labels = tmp_path / "labels"
    write(labels / "labels.json", json.dumps({"Holding something": "0", "Pushing something": "1"}))
    write(labels / "train.json", json.dumps([{"id": "1", "template": "Holding [something]"},
                                             {"id": "2", "template": "Pushing [something]"}]))
    write(labels / "validation.json", json.dumps([{"id": "3", "template": "Pushing [something]"}]))
    write(labels / "test.json", json.dumps([{"id": "4"}]))
    store = decode(tmp_path / "all", labels, video_root=tmp_path / "20bn-something-something-v2")
    assert by_video(store) == {
        "1.webm": ("Holding something", "train", "train"), "2.webm": ("Pushing something", "train", "train"),
        "3.webm": ("Pushing something", "val", "validation"), "4.webm": (None, "test", "test")}
    # decode.manifests picks files of the folder: here the labelled ones only
    chosen = decode(tmp_path / "chosen", labels, video_root=tmp_path / "20bn-something-something-v2",
                    manifests=["train.json", "validation.json"])
    assert sorted(by_video(chosen)) == ["1.webm", "2.webm", "3.webm"]


def test_malformed_entries_leaks_and_mixed_sets_get_one_line(tmp_path, videos):
    videos("UCF-101", "Jump/v_Jump_g01_c01.avi")
    lists = tmp_path / "lists"
    write(lists / "trainlist01.txt", "Jump/v_Jump_g01_c01.avi 1\n")
    write(lists / "testlist01.txt", "Jump/v_Jump_g01_c01.avi\n")  # in both halves: a leak
    with pytest.raises(StageError, match=r"v_Jump_g01_c01.avi \(train/Jump and test/Jump\); "
                                         r"remove them or set decode.duplicates"):
        decode(tmp_path, lists, video_root=tmp_path / "UCF-101")
    write(lists / "testlist01.txt", "Jump/v_Jump_g02_c01.avi\nv_Jump_g03_c01.avi\n")
    with pytest.raises(StageError, match=r"testlist01.txt, line 2: expected `<Class>/<video>`"):
        decode(tmp_path, lists, video_root=tmp_path / "UCF-101")
    (lists / "testlist01.txt").unlink()
    with pytest.raises(StageError, match=r"needs both trainlist01.txt and testlist01.txt"):
        decode(tmp_path, lists)
    write(lists / "train.csv", "label,youtube_id,time_start,time_end,split\n")
    with pytest.raises(StageError, match=r"lists: holds the split files of ucf101 and kinetics"):
        decode(tmp_path, lists)
    with pytest.raises(StageError, match=r"trainlist03.txt and testlist03.txt in this folder \(it has "
                                         r"split\(s\) 1\)"):
        decode(tmp_path, lists, manifest_format="ucf101", split_number=3)
    with pytest.raises(StageError, match=r"decode.manifests: .*testlist01.txt: manifest does not exist"):
        decode(tmp_path, lists, manifests=["trainlist01.txt", "testlist01.txt"])
