"""Manifest readers: each format in its real-world layout, auto-detection, errors, folder scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import StageError
from pipeline.data.manifests import (
    MANIFEST_FORMATS,
    ManifestError,
    VideoEntry,
    detect_format,
    parse_manifest,
    scan_folder,
)


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def triples(entries: list[VideoEntry], root: Path) -> list[tuple[str, str | None, str | None]]:
    return [(e.path.relative_to(root).as_posix(), e.label, e.split) for e in entries]


def test_scan_folder_labels_from_top_level_folder(tmp_path):
    for name in ["b.MP4", "a.webm", "notes.txt", ".hidden.mp4", "run/x.avi", "run/deep/y.mkv",
                 "jump/z.mov", ".cache/w.mp4", "jump/.tmp.mp4"]:
        write(tmp_path / name)
    assert triples(scan_folder(tmp_path), tmp_path) == [
        ("a.webm", None, None), ("b.MP4", None, None), ("jump/z.mov", "jump", None),
        ("run/deep/y.mkv", "run", None), ("run/x.avi", "run", None)]
    with pytest.raises(ManifestError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def test_csv_with_header_empty_label_and_split(tmp_path):
    videos = tmp_path / "videos"
    manifest = write(tmp_path / "list.csv", "path,label,split\nclips/a.mp4,run,train\n\n"
                     f"{videos / 'b.mp4'},,validation\n\"c, d.mp4\",\"jump, high\"\n")
    assert triples(parse_manifest(manifest), tmp_path) == [
        ("clips/a.mp4", "run", "train"), ("videos/b.mp4", None, "val"), ("c, d.mp4", "jump, high", None)]
    assert parse_manifest(manifest, video_root=videos)[0].path == videos / "clips/a.mp4"


def test_csv_without_header(tmp_path):
    manifest = write(tmp_path / "m.csv", "a.mp4,run\nb.mp4,jump,test\n")
    assert triples(parse_manifest(manifest, fmt="csv"), tmp_path) == [
        ("a.mp4", "run", None), ("b.mp4", "jump", "test")]


def test_ucf101_train_and_test_lists_with_class_index(tmp_path):
    lists, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n")
    train = write(lists / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
                  "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\r\n")
    test = write(lists / "testlist01.txt", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\n")
    assert triples(parse_manifest(train, video_root=root), root) == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup", "train"),
        ("ApplyLipstick/v_ApplyLipstick_g08_c01.avi", "ApplyLipstick", "train")]
    assert triples(parse_manifest(test, video_root=root), root) == [
        ("ApplyLipstick/v_ApplyLipstick_g01_c01.avi", "ApplyLipstick", "test")]
    assert parse_manifest(test)[0].path == lists / "ApplyLipstick/v_ApplyLipstick_g01_c01.avi"
    write(train, "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nApplyEyeMakeup/v_x.avi 2\n")
    with pytest.raises(ManifestError, match=r"trainlist01.txt, line 2: class index 2 is 'ApplyLipstick'"):
        parse_manifest(train)


def test_hmdb51_single_file_and_folder_by_split_number(tmp_path):
    splits, root = tmp_path / "testTrainMulti_7030_splits", tmp_path / "hmdb51_org"
    one = write(splits / "brush_hair_test_split1.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
                "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \nBrushing_hair_h_nm_np1_le_goo_0.avi 0 \n")
    write(splits / "cartwheel_test_split1.txt", "Cartwheel_f_cm_np1_ri_med_0.avi 2\n")
    write(splits / "cartwheel_test_split2.txt", "Cartwheel_f_cm_np1_ri_med_0.avi 1\n")
    assert triples(parse_manifest(one, video_root=root), root) == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair", "train"),
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi", "brush_hair", "test")]
    folder = parse_manifest(splits, fmt="hmdb51", video_root=root)
    assert [(e.label, e.split) for e in folder] == [
        ("brush_hair", "train"), ("brush_hair", "test"), ("cartwheel", "test")]
    assert triples(parse_manifest(splits, video_root=root, split_number=2), root) == [
        ("cartwheel/Cartwheel_f_cm_np1_ri_med_0.avi", "cartwheel", "train")]
    with pytest.raises(ManifestError, match="test_split3"):
        parse_manifest(splits, split_number=3)


def test_ssv2_train_test_and_labels_validation(tmp_path):
    root = tmp_path / "20bn-something-something-v2"
    train = write(tmp_path / "something-something-v2-train.json", json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks"]},
        {"id": "42326", "label": "spreading margarine onto bread",
         "template": "Spreading [something] onto [something]", "placeholders": ["margarine", "bread"]},
    ], indent=1))
    test = write(tmp_path / "something-something-v2-test.json", '[{"id": "1420"}, {"id": "1421"}]')
    assert triples(parse_manifest(train, video_root=root), root) == [
        ("78687.webm", "Holding something next to something", "train"),
        ("42326.webm", "Spreading something onto something", "train")]
    assert triples(parse_manifest(test, video_root=root), root) == [
        ("1420.webm", None, "test"), ("1421.webm", None, "test")]
    renamed = write(tmp_path / "mine.json", '[{"id": "5", "template": "Holding [something]"}]')
    assert parse_manifest(renamed)[0].split is None
    write(tmp_path / "something-something-v2-labels.json",
          json.dumps({"Holding something next to something": "0", "Holding something": "1"}))
    parse_manifest(renamed)
    with pytest.raises(ManifestError, match=r"train.json, line 11: class 'Spreading something onto"):
        parse_manifest(train)


def test_kinetics_lookup_order_and_missing_default(tmp_path):
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    manifest = write(tmp_path / "validate.csv", header + "abseiling,--33Lscn6sk,4,14,validate,0\n"
                     '"passing American football (in game)",abc,30,40,validate,0\n'
                     "zumba,zzz,0,10,validate,1\nabseiling,nope,1,11,validate,0\n")
    root = tmp_path / "k700"
    write(root / "val/abseiling/--33Lscn6sk_000004_000014.mp4")
    write(root / "passing American football (in game)/abc_000030_000040.mp4")
    write(root / "zzz_000000_000010.mp4")
    assert triples(parse_manifest(manifest, video_root=root), root) == [
        ("val/abseiling/--33Lscn6sk_000004_000014.mp4", "abseiling", "val"),
        ("passing American football (in game)/abc_000030_000040.mp4",
         "passing American football (in game)", "val"),
        ("zzz_000000_000010.mp4", "zumba", "val"),
        ("abseiling/nope_000001_000011.mp4", "abseiling", "val")]


@pytest.mark.parametrize(("name", "text", "fmt"), [
    ("list.csv", "path,label\na.mp4,x\n", "csv"),
    ("train.csv", "label,youtube_id,time_start,time_end,split\n", "kinetics"),
    ("something-something-v2-validation.json", "[]", "ssv2"),
    ("trainlist02.txt", "", "ucf101"),
    ("testlist03.txt", "", "ucf101"),
    ("golf_test_split2.txt", "", "hmdb51"),
])
def test_auto_detection(tmp_path, name, text, fmt):
    assert detect_format(write(tmp_path / name, text)) == fmt


def test_auto_detection_of_hmdb_folder_and_unknown(tmp_path):
    write(tmp_path / "splits/golf_test_split1.txt", "golf_0.avi 1\n")
    assert detect_format(tmp_path / "splits") == "hmdb51"
    assert parse_manifest(tmp_path / "splits")[0].path == tmp_path / "splits/golf/golf_0.avi"
    with pytest.raises(ManifestError, match="csv, ucf101, hmdb51, ssv2, kinetics"):
        parse_manifest(write(tmp_path / "videos.lst", "a.mp4\n"))
    with pytest.raises(ManifestError, match="unknown manifest format 'yaml'"):
        parse_manifest(tmp_path / "videos.lst", fmt="yaml")
    assert MANIFEST_FORMATS[0] == "auto"


@pytest.mark.parametrize(("name", "text", "line", "what"), [
    ("m.csv", "path,label\na.mp4,x\nb.mp4,x,train,extra\n", 3, "expected `path,label"),
    ("m.csv", "a.mp4,x,holdout\n", 1, "unknown split 'holdout'"),
    ("trainlist01.txt", "A/a.avi 1\nA/b.avi\n", 2, "expected `<Class>/<video> <index>`"),
    ("testlist01.txt", "a.avi\n", 1, "expected `<Class>/<video>`"),
    ("run_test_split1.txt", "a.avi 1\n\nb.avi 7\n", 3, "expected `<video> <0|1|2>`"),
    ("k.csv", "label,youtube_id,time_start,time_end,split\nrun,a,x,10,train\n", 2, "must be numbers"),
    ("k.csv", "label,youtube_id,time_start,time_end,split\nrun,a,0,10\n", 2, "expected 5 cells"),
    ("s.json", '[\n{"id": "1"},\n{"label": "x"}\n]', 3, "expected an object with an \"id\""),
    ("s.json", '[\n{"id": "1"}\n{"id": "2"}]', 3, "expected ',' or ']'"),
    ("s.json", '[\n{"id": "1",\n}]', 3, "invalid JSON"),
])
def test_malformed_line_is_named(tmp_path, name, text, line, what):
    manifest = write(tmp_path / name, text)
    fmt = "kinetics" if name == "k.csv" else "auto"
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest, fmt=fmt)
    assert str(err.value).startswith(f"{manifest}, line {line}: ")
    assert what in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, StageError)


def test_missing_manifest_and_videos(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        parse_manifest(tmp_path / "nope.csv")
    entries = parse_manifest(write(tmp_path / "m.csv", "gone.mp4,x\n"))
    assert entries == [VideoEntry(tmp_path / "gone.mp4", "x", None)]  # missing videos: decode's job
