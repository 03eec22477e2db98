"""`mam2 predict`: a video file is read as decode stores it and scored as finetune evaluates a val video
(the same averaged scores as the stage's evaluation of the decoded store), classes come from the
classifier, and an unreadable file is one line on stderr and exit code 1, the other files still
classified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.classifier import VideoClassifier, classifier_config, load_classifier, save_classifier
from models.video_vit import build_encoder
from pipeline.classify.evaluate import average_per_video
from pipeline.core.stores import open_clips
from pipeline.data.video import write_mp4
from pipeline.orchestrate.cli import main as mam2
from stages import decode, finetune
from tests.conftest import moving_frames

CLASSES = ["left", "right"]
DECODE = {"workers": 0, "num_frames": 8, "stride": 2, "store_size": 32, "clips_per_video": 2,
          "val_fraction": 0.5}
FINETUNE = {"num_frames": 4, "frame_step": 2, "input_size": 24, "eval_clips": 2, "eval_crops": 3,
            "eval_resize": 1.142857, "eval_batch_size": 5}
ENCODER = {"name": "tiny", "img_size": 24, "num_frames": 4, "patch_size": 8, "tubelet_size": 2, "depth": 1,
           "embed_dim": 32, "num_heads": 2}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def project(tmp_path: Path, make_video) -> Path:
    """Four labelled mp4s (two per class), a random classifier of those classes and a params file."""
    for i, name in enumerate(["left/a.mp4", "left/b.mp4", "right/c.mp4", "right/d.mp4"]):
        make_video(f"raw/{name}", num_frames=30, seed=i)
    torch.manual_seed(0)
    model = VideoClassifier(build_encoder(**ENCODER), len(CLASSES), head_init_scale=1.0,
                            input_norm="imagenet")
    save_classifier(model, classifier_config(model, ENCODER, CLASSES),
                    tmp_path / "artifacts" / "finetune" / "classifier.pt")
    doc = {"paths": {"artifacts": str(tmp_path / "artifacts")}, "decode": DECODE, "finetune": FINETUNE}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def test_a_file_gets_the_score_the_stage_gives_its_decoded_clips(project, capsys):
    clips = decode.run(decode.Params(**DECODE), videos=project / "raw", clips=project / "clips.zarr",
                       report=project / "decode.json")["clips"]
    classifier, config = load_classifier(project / "artifacts" / "finetune" / "classifier.pt")
    params = finetune.Params(**FINETUNE)
    views = finetune.evaluate(classifier, clips, params, params.train)
    ids, scores, _ = average_per_video(views)
    names = [str(n) for n in open_clips(clips)["videos"][:]]
    expected = {names[v]: row for v, row in zip(ids, scores, strict=True)}  # the val videos
    assert len(expected) == 2 and config["class_names"] == CLASSES
    out = project / "predictions.json"
    assert mam2(["predict", *expected, "--params", str(project / "params.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for result in json.loads(out.read_text())["videos"]:
        row = expected[result["path"]]
        assert result["clips"] == 2 and result["views"] == 2 * 2 * 3
        assert [top["class"] for top in result["top"]] == [CLASSES[k] for k in np.argsort(-row)]
        assert [top["score"] for top in result["top"]] == pytest.approx(np.sort(row)[::-1], abs=1e-4)
        assert f"{result['path']}  (2 clips, 12 views)" in printed


def test_unreadable_files_are_one_line_each_and_the_rest_is_classified(project, capsys):
    bad = project / "bad.mp4"
    bad.write_text("not a video")
    args = ["--params", str(project / "params.yaml"), "--top", "1"]
    good = project / "raw" / "left" / "a.mp4"
    assert mam2(["predict", str(bad), str(project / "missing.mp4"), str(good), *args]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert errors[0].startswith(f"mam2 predict: error: {bad}: unreadable video (")
    assert errors[1] == f"mam2 predict: error: {project / 'missing.mp4'}: file not found" and len(errors) == 2
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(str(good)) and len(lines) == 2 and lines[1].split()[1] in CLASSES  # --top 1
    short = write_mp4(project / "short.mp4", moving_frames(10, 64, 64), fps=25.0)
    assert mam2(["predict", str(short), *args]) == 1
    assert "too short: 10 frames, a clip needs 15" in capsys.readouterr().err


def test_missing_classifier_and_help(project, capsys):
    assert mam2(["predict", "x.mp4", "--classifier", str(project / "none.pt"), "--params",
                 str(project / "params.yaml")]) == 1
    assert "classifier not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        mam2(["predict", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "--top" in text and "eval_clips" in text
