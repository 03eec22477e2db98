"""motion_pretrain: the synthetic datasets carry exact labels, a tiny-budget run writes loadable
artifacts and metrics and resumes, given checkpoints are loaded instead of trained, and (slow) the
demo budget beats zero motion on the motion ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.flow import original_raft_state_dict, warp
from models.flow_io import load_flow_model
from models.tracker import load_tracker
from pipeline.core.errors import StageError
from pipeline.core.stores import create_clips_store
from pipeline.motion.synthetic_data import SyntheticFlowPairs, SyntheticTrackWindows
from stages import densify, pseudo_labels, refine
from stages.demo_data import Params as DemoParams
from stages.demo_data import write_motion_gt
from stages.motion_pretrain import HEADLINE, Params, run

TINY_TRAIN = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}
TINY = dict(flow_updates=2, tracker_points=8, tracker_iters=2, eval_flow_updates=2, eval_tracker_iters=2,
            flow_train=TINY_TRAIN, tracker_train=TINY_TRAIN)


def make_motion_gt(root: Path, **overrides) -> Path:
    """A motion ground-truth folder as demo_data writes it (small unless overridden)."""
    settings = {"size": 64, "motion_gt_clips": 1, "motion_gt_frames": 9, "motion_gt_points": 8, **overrides}
    (root / "motion_gt").mkdir(parents=True)
    write_motion_gt(root / "motion_gt", DemoParams(**settings))
    return root / "motion_gt"


def pretrain(root: Path, motion_gt: Path, **overrides) -> dict[str, Path]:
    return run(Params(**{**TINY, **overrides}), motion_gt=motion_gt, artifacts=root / "artifacts",
               metrics=root / "metrics.json", reports=root / "reports", runs=root / "runs")


def test_synthetic_samples_are_exact_and_seeded():
    pairs = SyntheticFlowPairs(size=128, clip_frames=3)
    a, b = pairs[(0, 7)], pairs[(5, 7)]
    assert all(torch.equal(a[k], b[k]) for k in a), "a sample is decided by its seed alone"
    assert not torch.equal(a["img0"], pairs[(0, 8)]["img0"])
    assert a["img0"].shape == (3, 128, 128) and a["flow"].shape == (2, 128, 128) and a["valid"].all()
    # the exact flow brings frame 1 back onto frame 0 wherever nothing is occluded (most pixels)
    error = (warp(a["img1"][None], a["flow"][None])[0] - a["img0"]).abs().mean(0)
    assert (error < 0.05).float().mean() > 0.8
    windows = SyntheticTrackWindows(size=128, window=8, num_points=16)
    sample = windows[(0, 3)]
    assert sample["video"].shape == (8, 3, 128, 128) and sample["tracks"].shape == (8, 16, 2)
    assert sample["visible"][0].all(), "queries are visible in frame 0"
    assert sample["valid"][0].all() and sample["valid"].dtype == torch.bool
    assert torch.equal(sample["tracks"], windows[(1, 3)]["tracks"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny-budget run: (its root folder, the motion_gt folder, its outputs)."""
    root = tmp_path_factory.mktemp("motion_pretrain")
    motion_gt = make_motion_gt(root)
    return root, motion_gt, pretrain(root, motion_gt)


def test_tiny_run_writes_loadable_artifacts_and_resumes(pretrained):
    tmp_path, motion_gt, out = pretrained
    flow, tracker = load_flow_model(out["flow"]), load_tracker(out["tracker"])
    blob = torch.load(out["flow"], weights_only=True)
    assert blob["format"] == "mam2.flow" and blob["name"] == "raft_small"
    assert tracker.config.window == 8
    metrics = json.loads(out["results"].read_text())
    for key in ("flow_epe", "flow_epe_zero_motion", "flow_acc_1px", "track_error_px",
                "track_error_px_zero_motion", "track_delta_avg", "track_delta_avg_zero_motion"):
        assert np.isfinite(metrics[key]), key
    assert metrics["flow_source"] == metrics["tracker_source"] == "trained"
    assert json.loads(out["metrics"].read_text()) == {key: metrics[key] for key in HEADLINE}
    for name in ("flow_history.csv", "tracker_history.csv"):
        assert (tmp_path / "reports" / name).read_text().count("\n") == 3  # header + 2 steps
    assert (tmp_path / "runs" / "flow" / "checkpoint.pt").exists()
    # a rerun finds both trainings complete and writes the same weights
    again = pretrain(tmp_path, motion_gt)
    reloaded = load_flow_model(again["flow"])
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in flow.state_dict().items())
    assert json.loads(again["metrics"].read_text())["flow_epe"] == pytest.approx(metrics["flow_epe"])


def test_given_checkpoints_are_loaded_not_trained(tmp_path, pretrained):
    _, motion_gt, first = pretrained
    flow = load_flow_model(first["flow"])
    torch.save(original_raft_state_dict(flow.state_dict()),
               tmp_path / "raft-small.pth")  # princeton-vl format
    out = pretrain(tmp_path / "b", motion_gt, flow_checkpoint=tmp_path / "raft-small.pth",
                   tracker_checkpoint=first["tracker"])
    metrics = json.loads(out["results"].read_text())
    assert metrics["flow_source"] == metrics["tracker_source"] == "checkpoint"
    assert not (tmp_path / "b" / "runs" / "flow").exists(), "nothing was trained"
    assert metrics["flow_epe"] == pytest.approx(json.loads(first["metrics"].read_text())["flow_epe"])
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(StageError, match="junk.pth"):
        pretrain(tmp_path / "c", motion_gt, flow_checkpoint=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="demo_data"):
        pretrain(tmp_path / "d", tmp_path / "nowhere")


def test_the_whole_branch_runs_on_tiny_data(tmp_path, pretrained):
    """motion_pretrain -> pseudo_labels -> densify -> refine, both targets, on tiny clips."""
    root, motion_gt, models = pretrained
    frames = np.asarray(zarr.open_group(str(motion_gt / "gt.zarr"))["frames"])  # (1, 9, 64, 64, 3)
    frames = np.concatenate([frames, frames[:, ::-1]])  # a second clip: the first played backwards
    store = create_clips_store(tmp_path / "clips.zarr", num_clips=2, num_frames=9, size=64,
                               labels=np.array([0, -1]), videos=np.arange(2), starts=np.zeros(2),
                               splits=np.zeros(2), video_paths=["a", "b"], attrs={})
    store["frames"][:] = frames
    loose = dict(alpha=1.0, beta=50.0, colour=1.0, tau=1000.0, scale_thresholds=False)
    sources = {"clips": ("unlabelled", tmp_path / "clips.zarr"), "motion_gt": ("all", motion_gt / "gt.zarr")}
    for source, (clip_filter, frames_store) in sources.items():  # pseudo_labels@<source>, densify@<source>
        pseudo_labels.run(pseudo_labels.Params(source=source, clip_filter=clip_filter, pairs_per_clip=2,
                                               windows_per_clip=1, grid_step=16, flow_updates=2,
                                               tracker_iters=2, **loose),
                          clips=frames_store, flow_model=models["flow"], tracker=models["tracker"],
                          labels=tmp_path / f"{source}_labels.zarr", reports=tmp_path / f"r1{source}",
                          metrics=tmp_path / f"m1{source}.json")
        densify.run(densify.Params(source=source, window_size=2, max_queries_per_window=32,
                                   static_speed=0.0),
                    labels=tmp_path / f"{source}_labels.zarr", tracker=models["tracker"],
                    train_labels=tmp_path / f"{source}_train.zarr", work=tmp_path / f"w{source}",
                    reports=tmp_path / f"r2{source}", metrics=tmp_path / f"m2{source}.json")
    train = {"steps": 1, "batch_size": 1, "warmup_steps": 0}
    out = refine.run(refine.Params(flow_updates=2, tracker_iters=2, eval_pairs=2, eval_pairs_per_clip=2,
                                   flow_train=train, track_train=train, track_augment={"crop": [48, 48]}),
                     motion_models=root / "artifacts",
                     train_labels={source: tmp_path / f"{source}_train.zarr" for source in sources},
                     motion_gt=motion_gt, artifacts=tmp_path / "refined", run_dir=tmp_path / "runs",
                     metrics=tmp_path / "refine.json", reports=tmp_path / "r3")
    metrics = json.loads(out["results"].read_text())
    assert metrics["clips"]["labels"]["flow_pairs"] == 2 and metrics["clips"]["labels"]["track_samples"] > 0
    assert set(metrics["motion_gt"]["after"]) == {"flow", "tracks_first", "tracks_strided"}
    assert metrics["motion_gt"]["before"] != metrics["motion_gt"]["after"], "the models were refined"
    for target in ("clips", "motion_gt"):
        assert load_flow_model(tmp_path / "refined" / target / "flow.pt") is not None
        assert load_tracker(tmp_path / "refined" / target / "tracker.pt").config.window == 8
    # the real clips' labels come from the unlabelled clip only
    assert zarr.open_group(str(tmp_path / "clips_train.zarr")).attrs["labelled_clips"] == [1]
    assert metrics["motion_gt"]["labels"]["flow_pairs"] == 2, "motion_gt's own labels: 1 clip x 2 pairs"


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.xfail(strict=True, reason="issue 6 open: RAFT from scratch is undertrained at the CPU demo "
                   "budget (200 steps of 4 pairs: 1.00-1.10 x zero-motion EPE on motion_gt). 600 steps of 8 "
                   "pairs (8 min on 2 cores) gave 0.82-1.07 x over four fp32 seeds on a GPU and 0.96 x in "
                   "the CPU DAG (12 eval updates); 2400 steps of 4 pairs (17.5 min) give 0.68 x on CPU "
                   "and GPU")
def test_demo_budget_beats_zero_motion(tmp_path):
    """The default (demo) budget on the demo's own motion_gt: both models clearly better than predicting
    no motion."""
    (tmp_path / "motion_gt").mkdir()
    write_motion_gt(tmp_path / "motion_gt", DemoParams())
    out = run(Params(), motion_gt=tmp_path / "motion_gt", artifacts=tmp_path / "artifacts",
              metrics=tmp_path / "m.json", reports=tmp_path / "reports", runs=tmp_path / "runs")
    metrics = json.loads(out["results"].read_text())
    assert metrics["flow_epe"] < 0.9 * metrics["flow_epe_zero_motion"], metrics
    assert metrics["flow_acc_1px"] > 0.6, metrics
    assert metrics["track_error_px"] < 0.8 * metrics["track_error_px_zero_motion"], metrics
    assert metrics["track_delta_avg"] > metrics["track_delta_avg_zero_motion"], metrics
