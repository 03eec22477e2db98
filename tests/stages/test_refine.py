"""refine: runs end to end on a tiny hand-written labels store with tiny models, for both methods and
both targets, writes loadable models, before/after metrics and pictures; fails clearly on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.flow import build_flow_model
from models.flow_io import load_flow_model, save_flow_model
from models.tracker import PointTracker, TrackerConfig, load_tracker, save_tracker
from pipeline.core.errors import StageError
from pipeline.core.params import ParamsError, validate_section
from pipeline.data.synthetic import GT_STYLE, render_motion_clip
from pipeline.motion.label_store import append_flow, append_tracks, create_label_store
from stages.refine import Params, run

SIZE, FRAMES, WINDOW, POINTS = 64, 6, 4, 8
TRAIN = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}
TINY_TRACKER = TrackerConfig(window=WINDOW, feat_dim=16, hidden_dim=32, levels=2, blocks=1)
# What pseudo_labels records in the labels' attrs: the thresholds (the clips target's cycle check reads
# them) and the update counts refine must train and score with.
RECIPE = {"alpha": 0.002, "beta": 0.02, "tau": 1000.0, "flow_updates": 2, "tracker_iters": 2}


def write_array(group: zarr.Group, name: str, values: np.ndarray) -> None:
    array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape or None)
    if values.size:
        array[...] = values


def render(num_clips: int, seed: int) -> list:
    return [render_motion_clip(size=(SIZE, SIZE), num_frames=FRAMES, num_points=POINTS, style=GT_STYLE,
                               rng=np.random.default_rng([seed, i])) for i in range(num_clips)]


def write_frames(path: Path, clips: list, with_gt: bool = False) -> Path:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("frames", shape=(len(clips), FRAMES, SIZE, SIZE, 3), dtype="uint8",
                       chunks=(1, FRAMES, SIZE, SIZE, 3))[...] = np.stack([c.frames for c in clips])
    if with_gt:
        for name in ("flow", "tracks", "visible"):
            write_array(group, name, np.stack([getattr(c, name) for c in clips]))
    return path


def write_labels(path: Path, frames: Path, clips: list) -> Path:
    """A labels store in the densify layout; the 'pseudo-labels' are the exact motion, half kept."""
    rng = np.random.default_rng(0)
    pairs = np.array([(c, t, t + 1) for c in range(len(clips)) for t in range(FRAMES - 1)], np.int32)
    flow = np.stack([clips[c].flow[t].transpose(2, 0, 1) for c, t, _ in pairs])
    starts = np.array([(c, s) for c in range(len(clips)) for s in (0, FRAMES - WINDOW)], np.int32)
    coords = np.stack([clips[c].tracks[s:s + WINDOW] for c, s in starts])
    visible = np.stack([clips[c].visible[s:s + WINDOW] for c, s in starts])
    group = create_label_store(path, image_size=(SIZE, SIZE), window=WINDOW, points=POINTS,
                               attrs={"clips": str(frames), **RECIPE})
    append_flow(group, pairs, flow, rng.random((len(pairs), SIZE, SIZE)) < 0.5)
    append_tracks(group, starts[:, 0], starts[:, 1], coords, visible)
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """Frames, a labels store, ground truth and two tiny untrained motion models."""
    clips = render(2, seed=1)
    frames = write_frames(tmp_path / "data" / "clips.zarr", clips)
    labels = write_labels(tmp_path / "data" / "train_labels.zarr", frames, clips)
    (tmp_path / "motion_gt").mkdir()
    gt_clips = render(2, seed=2)
    gt = write_frames(tmp_path / "motion_gt" / "gt.zarr", gt_clips, with_gt=True)
    gt_labels = write_labels(tmp_path / "data" / "motion_gt_train_labels.zarr", gt, gt_clips)
    models = tmp_path / "artifacts" / "motion_pretrain"
    models.mkdir(parents=True)
    torch.manual_seed(0)
    save_flow_model(build_flow_model("raft_small"), "raft_small", models / "flow.pt")
    tracker = PointTracker(TINY_TRACKER)
    # an untrained tracker's zero-initialised update layer (the mixer's last) predicts no motion, and
    # densify drops motionless tracks as too easy: small random updates leave moving tracks to train on
    torch.nn.init.normal_(tracker.delta_block.to_delta[-1].weight, std=0.05)
    save_tracker(tracker, models / "tracker.pt")
    return {"root": tmp_path, "labels": labels, "gt_labels": gt_labels, "models": models}


def refine(ws: dict[str, Path], **overrides) -> dict[str, Path]:
    params = Params.model_validate({"flow_updates": 2, "tracker_iters": 2, "eval_pairs": 3,
                                    "track_augment": {"crop": [48, 48]},
                                    "flow_train": TRAIN, "track_train": TRAIN, **overrides})
    root = ws["root"]
    return run(params, motion_models=ws["models"],
               train_labels={"clips": ws["labels"], "motion_gt": ws["gt_labels"]},
               motion_gt=root / "motion_gt",
               artifacts=root / "artifacts" / "refine", run_dir=root / "runs", metrics=root / "refine.json",
               reports=root / "reports")


def test_refine_clips_writes_models_metrics_and_pictures(workspace, one_thread):
    out = refine(workspace, targets=["clips"])
    metrics = json.loads(out["results"].read_text())
    assert metrics["method"] == "pseudo_labels"
    assert json.loads(out["metrics"].read_text()) == {}, "the headline is motion_gt's, not refined here"
    for phase in ("before", "after"):
        scores = metrics["clips"][phase]["flow"]
        assert 0 <= scores["cycle_consistent_fraction"] <= 1 and scores["photometric_error"] > 0
    # the models changed and load back
    before = load_flow_model(workspace["models"] / "flow.pt").state_dict()
    after = load_flow_model(out["artifacts"] / "clips" / "flow.pt").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tracker = load_tracker(out["artifacts"] / "clips" / "tracker.pt")
    assert tracker.config == TINY_TRACKER
    names = {p.name for p in out["reports"].iterdir()}
    assert {"clips_flow.png", "clips_tracks.mp4", "clips_flow_history.csv",
            "clips_tracker_history.csv", "clips_before_after.png"} <= names
    assert (out["reports"] / "clips_before_after.png").stat().st_size > 10_000


def test_photometric_baseline_runs_without_using_the_labels(workspace, one_thread):
    labels = zarr.open_group(str(workspace["labels"]), mode="r+")
    labels["flow/valid"][...] = False  # the baseline never looks at the labels
    out = refine(workspace, targets=["clips"], method="photometric")
    metrics = json.loads(out["results"].read_text())
    assert metrics["method"] == "photometric"
    assert set(metrics["clips"]) == {"before", "after", "labels"}
    history = (out["reports"] / "clips_flow_history.csv").read_text().splitlines()
    assert "photometric" in history[0] and "smoothness" in history[0]


def test_photometric_flow_trains_on_the_pseudo_label_pairs(workspace):
    """The baseline sees the same pairs as the pseudo-label method (their labels unused), so only the
    loss differs; with no labelled pairs neither method trains."""
    from pipeline.motion.augment import FramePairs, LabelFlowPairs

    labels = zarr.open_group(str(workspace["labels"]), mode="r")
    frames = zarr.open_group(str(workspace["root"] / "data" / "clips.zarr"), mode="r")["frames"]
    assert np.array_equal(FramePairs(labels, frames, None).pairs, LabelFlowPairs(labels, frames, None).pairs)
    assert not FramePairs(labels, frames, None)[0, 0]["valid"].any()  # items are (index, seed)
    create_label_store(workspace["labels"], image_size=(SIZE, SIZE), window=WINDOW, points=POINTS,
                       attrs={"clips": str(workspace["root"] / "data" / "clips.zarr"), **RECIPE})
    out = refine(workspace, targets=["clips"], method="photometric", refine_tracker=False)
    assert not (out["reports"] / "clips_flow_history.csv").exists(), "no pairs: nothing to train on"
    assert json.loads(out["results"].read_text())["clips"]["labels"]["flow_pairs"] == 0


def test_refine_uses_the_update_counts_the_labels_were_made_with(workspace):
    with pytest.raises(StageError, match=r"refine.flow_updates is 3, but .* flow_updates 2"):
        refine(workspace, targets=["clips"], flow_updates=3)
    with pytest.raises(StageError, match=r"refine.tracker_iters is 4, but .* tracker_iters 2"):
        refine(workspace, targets=["motion_gt"], tracker_iters=4)


def test_stopped_run_writes_nothing_and_a_rerun_completes(workspace, one_thread):
    out = refine(workspace, targets=["clips"], flow_train={**TRAIN, "stop_after": 1})
    assert not out["metrics"].exists() and not out["artifacts"].exists() and not out["reports"].exists()
    assert "results" not in out
    assert (workspace["root"] / "runs" / "clips" / "flow" / "checkpoint.pt").exists()
    out = refine(workspace, targets=["clips"])
    assert json.loads(out["results"].read_text())["clips"]["after"]


def test_bad_inputs_and_params_fail_clearly(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        refine({**workspace, "labels": tmp_path / "nowhere.zarr"}, targets=["clips"])
    (workspace["models"] / "tracker.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match="tracker.pt"):
        refine(workspace, targets=["clips"])
    with pytest.raises(ParamsError, match="refine.method"):
        validate_section({"refine": {"method": "cycle"}}, "refine", Params)
    with pytest.raises(ParamsError, match="refine.flow_train.stepz"):
        validate_section({"refine": {"flow_train": {"stepz": 3}}}, "refine", Params)
    partial = validate_section({"refine": {"track_train": {"steps": 3}}}, "refine", Params)
    assert partial.track_train.steps == 3 and partial.track_train.base_lr == Params().track_train.base_lr
    partial = validate_section({"refine": {"track_augment": {"hflip_prob": 0.0}}}, "refine", Params)
    assert (partial.track_augment.hflip_prob == 0.0
            and partial.track_augment.crop == Params().track_augment.crop)


def test_refine_motion_gt_trains_on_its_labels_and_scores_against_ground_truth(workspace, one_thread):
    out = refine(workspace, targets=["motion_gt"])
    metrics = json.loads(out["results"].read_text())["motion_gt"]
    # DVC's metrics file: EPE and delta_avg (first queries) before and after, nothing else
    assert json.loads(out["metrics"].read_text()) == {
        f"motion_gt_{name}_{phase}": metrics[phase][group][name]
        for group, name in (("flow", "epe"), ("tracks_first", "delta_avg")) for phase in ("before", "after")}
    for phase in ("before", "after"):
        assert set(metrics[phase]) == {"flow", "tracks_first", "tracks_strided"}
        assert metrics[phase]["flow"]["epe"] > 0 and 0 <= metrics[phase]["flow"]["acc_3px"] <= 1
        for mode in ("tracks_first", "tracks_strided"):
            assert {"delta_avg", "occlusion_accuracy", "average_jaccard"} <= set(metrics[phase][mode])
    assert metrics["labels"]["flow_pairs"] == 2 * (FRAMES - 1), "the motion_gt labels, not the clips'"
    # diagnostics: these labels are the exact motion (float16), half the pixels kept
    assert metrics["labels"]["label_epe_kept"] < 0.01 and metrics["labels"]["label_epe_all"] < 0.01
    assert metrics["labels"]["label_kept_fraction"] == pytest.approx(0.5, abs=0.02)
    for phase in ("before", "after"):
        flow = metrics[phase]["flow"]
        assert flow["epe_moving"] > 0 and flow["epe_static"] >= 0 and 0 < flow["moving_fraction"] < 1
        assert flow["mean_gt_flow_px"] > 0 and flow["mean_flow_px"] >= 0
    names = {p.name for p in out["reports"].iterdir()}
    assert {"motion_gt_flow.png", "motion_gt_tracks.mp4", "motion_gt_flow_history.csv",
            "motion_gt_before_after.png"} <= names
    assert (out["reports"] / "motion_gt_before_after.png").stat().st_size > 10_000
    # the chart's reference: zero motion's tracks scores beside its flow scores
    assert 0 <= metrics["zero_motion"]["tracks_first"]["delta_avg"] <= 1
    assert set(metrics["zero_motion"]) == {"flow", "tracks_first", "tracks_strided"}


def test_refine_reads_labels_and_never_makes_them(workspace, one_thread):
    """Each target's labels come from the stores it is given (the densify stage's outputs): without
    the motion_gt store refine fails naming it, and it writes no label store of its own."""
    shutil.rmtree(workspace["gt_labels"])
    with pytest.raises(FileNotFoundError, match="motion_gt_train_labels.zarr.*mam2 pseudo_labels"):
        refine(workspace, targets=["motion_gt"])
    assert not list(workspace["root"].rglob("labels.zarr"))


def test_no_surviving_labels_leaves_the_models_as_they_were(workspace, one_thread):
    create_label_store(workspace["labels"], image_size=(SIZE, SIZE), window=WINDOW, points=POINTS,
                       attrs={"clips": str(workspace["root"] / "data" / "clips.zarr"), **RECIPE})
    out = refine(workspace, targets=["clips"])
    metrics = json.loads(out["results"].read_text())["clips"]
    assert metrics["labels"] == {"flow_pairs": 0, "track_samples": 0}
    assert metrics["before"] == metrics["after"]  # scored on the clips' frames all the same
    before = load_flow_model(workspace["models"] / "flow.pt").state_dict()
    after = load_flow_model(out["artifacts"] / "clips" / "flow.pt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
