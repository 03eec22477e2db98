"""`mam2 evaluate`: a saved model is scored again with the stage's own evaluation, giving what the stage
recorded (finetune: the same top-1, top-k and predictions; tokenizer, motion_pretrain, refine: the stage
functions' scores), beside the recorded value; --out keeps everything; pretrain and data stages are
refused with a reason; nothing the pipeline tracks is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.flow import build_flow_model
from models.flow_io import save_flow_model
from models.tracker import PointTracker, save_tracker
from models.vqgan import VQGAN, VQGANConfig, save_vqgan
from pipeline.orchestrate.cli import main as mam2
from pipeline.orchestrate.evaluate_cli import flatten
from stages import motion_pretrain, refine, tokenizer
from tests.pipeline.classify.test_data import write_class_store
from tests.stages.test_finetune import MOTIONS, finetune
from tests.stages.test_finetune import params as finetune_params
from tests.stages.test_refine import TINY_TRACKER, render, write_frames
from tests.stages.test_tokenizer import make_clips_store

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_params(root: Path, **sections) -> Path:
    """params.yaml with every `paths` entry under `root` and the given stage sections."""
    paths = {"clips": "data/clips.zarr", "artifacts": "artifacts", "metrics": "metrics", "reports": "reports",
             "runs": "runs", "motion_gt": "motion_gt"}
    doc = {"paths": {key: str(root / value) for key, value in paths.items()}, **sections}
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    return root / "params.yaml"


def evaluate(params: Path, *args: str) -> int:
    return mam2(["evaluate", *args, "--params", str(params)])


def score_table(text: str) -> dict[str, list[str]]:
    """The printed table: score name -> [now, recorded]."""
    lines = text.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("score"))
    rows = [line.split() for line in lines[start + 2:] if line and not line.startswith("wrote")]
    return {row[0]: row[1:] for row in rows}


def test_finetune_is_scored_as_the_stage_scored_it(tmp_path, capsys):
    store = write_class_store(tmp_path / "data" / "clips.zarr", MOTIONS, videos_per_class=4, size=32,
                              num_frames=8)
    p = finetune_params(init="scratch", train={"steps": 2}, eval_clips=2, eval_crops=2)
    finetune(tmp_path, store, p)
    recorded = json.loads((tmp_path / "metrics" / "finetune.json").read_text())
    params = write_params(tmp_path, finetune=p.model_dump(mode="json"))
    before = sorted(str(f) for f in tmp_path.rglob("*") if f.is_file())
    assert evaluate(params, "finetune", "--out", str(tmp_path / "out" / "scores.json")) == 0
    assert sorted(str(f) for f in tmp_path.rglob("*") if f.is_file() and "out" not in f.parts) == before
    table = score_table(capsys.readouterr().out)
    assert table["top1"] == [f"{recorded['top1']:.4g}"] * 2 and table["top4"][0] == table["top4"][1]
    assert {"top1_single_view", "views_per_video", "per_class.translate_up"} <= set(table)
    out = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert out["scores"]["top1"] == recorded["top1"] and out["scores"]["views"] == 4 * 4
    assert len(out["confusion"]) == 4 and out["class_names"] == MOTIONS
    stage_predictions = json.loads((tmp_path / "reports" / "finetune" / "predictions.json").read_text())
    assert out["predictions"] == stage_predictions and stage_predictions[0]["path"].endswith(".mp4")
    # the classifier exported to safetensors and to VideoMAE's layout scores the same
    for fmt, name in (("safetensors", "c.safetensors"), ("videomae", "c.pth")):
        assert mam2(["export", "--what", "classifier", "--format", fmt, "--out", str(tmp_path / name),
                     "--params", str(params)]) == 0
        capsys.readouterr()
        assert evaluate(params, "finetune", "--from", str(tmp_path / name)) == 0
        assert score_table(capsys.readouterr().out)["top1"][0] == f"{recorded['top1']:.4g}"
    # evaluation-only params change the score, never the model
    assert evaluate(params, "finetune", "--set", "finetune.eval_crops=1") == 0
    assert score_table(capsys.readouterr().out)["views"][0] == "8"


def test_tokenizer_held_out_psnr_against_the_mean_frame(tmp_path, capsys):
    clips = make_clips_store(tmp_path / "data" / "clips.zarr", num_clips=8, size=32)
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny_f16())
    (tmp_path / "artifacts" / "tokenizer").mkdir(parents=True)
    save_vqgan(model, tmp_path / "artifacts" / "tokenizer" / "vqgan.pt")
    params = write_params(tmp_path, tokenizer={"val_frames": 6, "eval_batch": 4})
    assert evaluate(params, "tokenizer", "--out", str(tmp_path / "scores.json")) == 0
    assert "data/clips.zarr (held-out frames)" in capsys.readouterr().out
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    import zarr

    p = tokenizer.Params(val_frames=6, eval_batch=4)
    frames = tokenizer.evaluation_frames(zarr.open_group(str(clips), mode="r"), p, model, where=clips)
    expected, _ = tokenizer.evaluate(model, frames, 4)
    assert scores == pytest.approx(expected) and scores["val_frames"] == 6
    assert scores["psnr"] < scores["baseline_psnr"]  # untrained: worse than the mean frame


@pytest.fixture
def motion_project(tmp_path: Path) -> dict:
    """motion_gt (2 clips of 6 frames at 64 px), an untrained raft_small and a tiny tracker saved as
    motion_pretrain and as refine's motion_gt target save them."""
    (tmp_path / "motion_gt").mkdir()
    write_frames(tmp_path / "motion_gt" / "gt.zarr", render(2, seed=2), with_gt=True)
    torch.manual_seed(0)
    flow, tracker = build_flow_model("raft_small").eval(), PointTracker(TINY_TRACKER).eval()
    torch.nn.init.normal_(tracker.delta_block.to_delta[-1].weight, std=0.05)
    for folder in (tmp_path / "artifacts" / "motion_pretrain", tmp_path / "artifacts/refine/motion_gt"):
        folder.mkdir(parents=True)
        save_flow_model(flow, "raft_small", folder / "flow.pt")
        save_tracker(tracker, folder / "tracker.pt")
    return {"root": tmp_path, "flow": flow, "tracker": tracker}


def test_motion_models_are_scored_on_the_ground_truth(motion_project, capsys):
    root, flow, tracker = motion_project["root"], motion_project["flow"], motion_project["tracker"]
    section = {"eval_flow_updates": 2, "eval_tracker_iters": 2, "eval_pairs_per_clip": 2}
    refine_section = {"targets": ["motion_gt"], "flow_updates": 2, "tracker_iters": 2,
                      "eval_pairs_per_clip": 2}
    params = write_params(root, motion_pretrain=section, refine=refine_section)
    assert evaluate(params, "motion_pretrain", "--out", str(root / "mp.json")) == 0
    gt, p = root / "motion_gt" / "gt.zarr", motion_pretrain.Params(**section)
    expected = {**motion_pretrain.evaluate_flow(flow, gt, p),
                **motion_pretrain.evaluate_tracks(tracker, gt, p)}
    assert json.loads((root / "mp.json").read_text())["scores"] == pytest.approx(expected)
    # refine's "after" scores, beside what the stage recorded
    (root / "reports" / "refine").mkdir(parents=True)
    (root / "reports" / "refine" / "results.json").write_text(json.dumps(
        {"motion_gt": {"after": {"flow": {"epe": 12.5}}}}))
    capsys.readouterr()
    assert evaluate(params, "refine", "--out", str(root / "refine.json")) == 0
    table = score_table(capsys.readouterr().out)
    assert table["motion_gt.flow.epe"][1] == "12.5"
    scores = json.loads((root / "refine.json").read_text())["scores"]
    rp = refine.Params(**refine_section)
    expected = flatten(refine.evaluate("motion_gt", rp, flow, tracker, None, root / "motion_gt"))
    assert scores == pytest.approx({f"motion_gt.{k}": v for k, v in expected.items()}, nan_ok=True)
    assert np.isfinite(scores["motion_gt.tracks_strided.delta_avg"])
    # --from scores another folder of models: refine's output with motion_pretrain's evaluation
    assert evaluate(params, "motion_pretrain", "--from", str(root / "artifacts/refine/motion_gt")) == 0


def test_refusals_and_missing_models_are_one_line(tmp_path, capsys):
    params = write_params(tmp_path)
    assert evaluate(params, "pretrain") == 2
    assert "no held-out evaluation" in capsys.readouterr().err
    assert evaluate(params, "decode") == 2
    assert "decode writes data, not a model" in capsys.readouterr().err
    assert evaluate(params, "finetune") == 1
    assert capsys.readouterr().err.strip().endswith("(run `mam2 finetune` first)")
    assert evaluate(params, "finetune", "--set", "finetune.eval_clips=0") == 2
    assert "finetune.eval_clips" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        mam2(["evaluate", "--help"])
    assert done.value.code == 0 and "--from" in capsys.readouterr().out
