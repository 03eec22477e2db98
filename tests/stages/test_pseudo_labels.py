"""pseudo_labels: the labels.zarr layout, stored labels equal to the models' filtered estimates,
thresholds scaled to the resolution, clear errors, a run interrupted mid-way that resumes to the
same store, and two shards that merge into the store of one unsharded run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.flow import build_flow_model, estimate_flow
from models.flow_io import load_flow_model, save_flow_model
from models.tracker import PointTracker, TrackerConfig, save_tracker
from pipeline.core.errors import StageError
from pipeline.core.params import Paths
from pipeline.core.shards import Shard
from pipeline.core.stores import create_clips_store
from pipeline.core.tensors import image_to_tensor
from pipeline.data.synthetic import GT_STYLE, render_motion_clip
from pipeline.motion.cycle import flow_label_mask, grid_queries
from pipeline.motion.label_store import append_flow, counts, mark_done, open_label_store, start_partial
from stages import pseudo_labels
from stages.pseudo_labels import HEADLINE, Params, run, scaled_thresholds

TINY_TRACKER = TrackerConfig(feat_dim=16, hidden_dim=32, levels=2, radius=2, blocks=1)
FAST = dict(pairs_per_clip=2, windows_per_clip=2, grid_step=16, points_per_sample=16, flow_updates=2,
            tracker_iters=2)


def make_label_inputs(root: Path, num_clips: int = 2, num_frames: int = 10,
                      size: int = 64) -> dict[str, Path]:
    """A small clips store of rendered scenes and (untrained, seeded) motion models saved to files."""
    frames = np.stack([render_motion_clip(size=(size, size), num_frames=num_frames, num_points=0,
                                          rng=np.random.default_rng(i), style=GT_STYLE).frames
                       for i in range(num_clips)])
    zeros = np.zeros(num_clips, int)
    store = create_clips_store(root / "clips.zarr", num_clips=num_clips, num_frames=num_frames, size=size,
                               labels=zeros - 1, videos=zeros, starts=zeros, splits=zeros,
                               video_paths=["rendered"], attrs={})
    store["frames"][:] = frames
    torch.manual_seed(0)
    save_flow_model(build_flow_model("raft_small").eval(), "raft_small", root / "flow.pt")
    save_tracker(PointTracker(TINY_TRACKER).eval(), root / "tracker.pt")
    return {"clips": root / "clips.zarr", "flow_model": root / "flow.pt", "tracker": root / "tracker.pt"}


def label(root: Path, inputs: dict[str, Path], name: str = "labels.zarr", shard: Shard | None = None,
          **overrides) -> dict[str, Path]:
    return run(Params(**{**FAST, **overrides}), **inputs, labels=root / name, reports=root / "reports",
               metrics=root / "metrics.json", shard=shard)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    inputs = make_label_inputs(root)
    return root, inputs, label(root, inputs)


def test_layout_and_attrs(labelled):
    root, inputs, out = labelled
    group = open_label_store(out["labels"])
    m, k = counts(group)
    assert m == 2 * 2  # clips x pairs
    assert group["flow/pairs"].dtype == np.int32 and group["flow/flow"].dtype == np.float16
    assert group["flow/flow"].shape == (m, 2, 64, 64) and group["flow/valid"].shape == (m, 64, 64)
    assert group["flow/valid"].dtype == bool
    pairs = group["flow/pairs"][:]
    assert sorted(set(pairs[:, 0].tolist())) == [0, 1] and (pairs[:, 2] - pairs[:, 1] == 1).all()
    assert pairs[:, 1].min() == 0 and pairs[:, 2].max() == 9  # evenly spread over the clip
    assert group["tracks/coords"].shape == (k, 8, 16, 2) and group["tracks/valid"].shape == (k, 8, 16)
    assert group["tracks/clip"].dtype == np.int32 and group["tracks/start"].dtype == np.int32
    assert sorted(set(group["tracks/start"][:].tolist())) == [0, 2]  # windows of 8 in 10 frames
    valid = group["tracks/valid"][:]
    assert (valid.all(1) == valid.any(1)).all(), "a track is valid in every frame or in none"
    # an untrained tracker predicts no motion, which is cycle-consistent: every grid query is kept
    # (4 x 4 queries per window), and the queries sit on the grid in the window's first frame
    assert valid[:, 0].sum() == 2 * 2 * 16
    grid = grid_queries((64, 64), 16)[0].numpy()
    coords = group["tracks/coords"][:]
    assert np.allclose(coords[:, 0][valid[:, 0]], np.tile(grid, (4, 1)))
    attrs = dict(group.attrs)
    assert attrs["clips"] == str(inputs["clips"]) and attrs["window"] == 8 and attrs["points"] == 16
    assert attrs["image_size"] == [64, 64]
    expected, tau = scaled_thresholds(Params(), (64, 64))
    assert attrs["beta"] == pytest.approx(expected.beta) and attrs["tau"] == pytest.approx(tau)
    assert attrs["alpha"] == 0.002 and attrs["colour"] == 0.005
    assert 0 <= attrs["kept_fraction_flow"] <= 1 and attrs["kept_fraction_tracks"] == 1.0
    stats = json.loads((root / "reports" / "stats.json").read_text())
    assert stats["tracks_kept"] == 64 and sum(stats["track_speed_histogram"]["counts"]) == 64
    assert (root / "reports" / "speed_histograms.png").stat().st_size > 1000
    assert json.loads(out["metrics"].read_text()) == {key: stats[key] for key in HEADLINE}
    assert json.loads(out["metrics"].read_text())["kept_fraction_tracks"] == 1.0


def test_clip_selection_labels_only_the_chosen_clips(tmp_path):
    inputs = make_label_inputs(tmp_path, num_clips=3)
    zarr.open_group(str(inputs["clips"]), mode="r+")["label"][:] = np.array([2, -1, -1], np.int32)
    out = label(tmp_path, inputs, clip_filter="unlabelled", max_clips=1, windows_per_clip=1,
                pairs_per_clip=1)
    group = open_label_store(out["labels"])
    assert group.attrs["labelled_clips"] == [1]
    assert group["flow/pairs"][:, 0].tolist() == [1] and set(group["tracks/clip"][:].tolist()) == {1}
    zarr.open_group(str(inputs["clips"]), mode="r+")["label"][:] = np.array([2, 0, 1], np.int32)
    with pytest.raises(StageError, match="no clips to label"):
        label(tmp_path, inputs, name="none.zarr", clip_filter="unlabelled")


def test_stored_flow_is_the_models_filtered_estimate(labelled):
    _, inputs, out = labelled
    group = open_label_store(out["labels"])
    clip, t0, t1 = group["flow/pairs"][3]
    video = image_to_tensor(zarr.open_group(str(inputs["clips"]), mode="r")["frames"][clip])
    model = load_flow_model(inputs["flow_model"]).eval()
    with torch.no_grad():
        fwd = estimate_flow(model, video[t0:t0 + 1], video[t1:t1 + 1], FAST["flow_updates"])
        bwd = estimate_flow(model, video[t1:t1 + 1], video[t0:t0 + 1], FAST["flow_updates"])
    stored = torch.from_numpy(group["flow/flow"][3].astype(np.float32))
    torch.testing.assert_close(stored, fwd[0], atol=0.02, rtol=1e-3)  # float16 storage
    thresholds, _ = scaled_thresholds(Params(**FAST), (64, 64))
    mask = flow_label_mask(video[t0:t0 + 1], video[t1:t1 + 1], fwd, bwd, thresholds)[0].numpy()
    assert (group["flow/valid"][3] == mask).mean() > 0.999


def test_thresholds_scale_with_resolution():
    thresholds, tau = scaled_thresholds(Params(), (128, 128))
    assert thresholds.beta == pytest.approx(0.1 * 128 / np.sqrt(436 * 1024))
    assert thresholds.max_flow == pytest.approx(400 * 128 / np.sqrt(436 * 1024))
    assert tau == pytest.approx(3.0 * 128 / np.sqrt(256 * 448))
    assert thresholds.alpha == 0.002 and thresholds.colour == 0.005  # ratios are not lengths
    unscaled, tau = scaled_thresholds(Params(scale_thresholds=False), (128, 128))
    assert unscaled.beta == 0.1 and tau == 3.0


def test_interrupted_run_resumes_to_the_same_store(tmp_path, labelled, monkeypatch):
    _, inputs, out = labelled
    real = pseudo_labels.label_tracks
    calls = []

    def fails_on_second_clip(group, clip, *args, **kwargs):
        calls.append(clip)
        if len(calls) == 2:  # the flow of clip 1 is already appended: a kill between two appends
            raise KeyboardInterrupt
        return real(group, clip, *args, **kwargs)

    monkeypatch.setattr(pseudo_labels, "label_tracks", fails_on_second_clip)
    with pytest.raises(KeyboardInterrupt):
        label(tmp_path, inputs)
    assert not (tmp_path / "labels.zarr").exists()
    monkeypatch.setattr(pseudo_labels, "label_tracks", real)
    resumed = label(tmp_path, inputs)
    a, b = open_label_store(out["labels"]), open_label_store(resumed["labels"])
    for name in ("flow/pairs", "flow/flow", "flow/valid", "tracks/clip", "tracks/start", "tracks/coords",
                 "tracks/valid"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert a.attrs["kept_fraction_flow"] == b.attrs["kept_fraction_flow"]
    assert not (tmp_path / ".labels.zarr.partial").exists()
    assert not (tmp_path / ".labels.zarr.shards").exists()


def test_two_shards_then_the_merge_equal_one_unsharded_run(tmp_path, labelled):
    _, inputs, out = labelled
    for index in (1, 0):  # in either order
        partial = label(tmp_path, inputs, shard=Shard(index, 2))
        assert partial == {"partial": tmp_path / ".labels.zarr.shards"}
        assert not (tmp_path / "labels.zarr").exists()  # nothing is committed by a shard
    done = sorted(p.name for p in (tmp_path / ".labels.zarr.shards" / "_progress" / "done").iterdir())
    assert done == ["0", "1"]
    merged = label(tmp_path, inputs)
    a, b = open_label_store(out["labels"]), open_label_store(merged["labels"])
    for name in ("flow/pairs", "flow/flow", "flow/valid", "tracks/clip", "tracks/start", "tracks/coords",
                 "tracks/valid"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert dict(a.attrs) == dict(b.attrs)
    assert not (tmp_path / ".labels.zarr.shards").exists()


def test_partial_store_is_cut_back_to_the_last_marker(tmp_path):
    store = tmp_path / "partial"
    args = dict(image_size=(4, 5), window=8, points=2, attrs={"clips": "x"})
    group, done = start_partial(store, "sig", **args)
    assert done == {}
    one = (np.zeros((1, 3)), np.ones((1, 2, 4, 5)), np.ones((1, 4, 5), bool))
    append_flow(group, *one)
    mark_done(store, "0", group, note=1)
    append_flow(group, *one)  # written, but its unit never finished
    group, done = start_partial(store, "sig", **args)
    assert counts(group) == (1, 0) and done == {"0": {"flow_rows": 1, "track_rows": 0, "note": 1}}
    group, done = start_partial(store, "other", **args)  # other work: start afresh
    assert counts(group) == (0, 0) and done == {}


def test_clear_errors(tmp_path, labelled):
    _, inputs, _ = labelled
    with pytest.raises(FileNotFoundError, match="motion_pretrain"):
        label(tmp_path, {**inputs, "tracker": tmp_path / "none.pt"})
    short = make_label_inputs(tmp_path / "short", num_clips=1, num_frames=5)
    with pytest.raises(StageError, match="5 frames"):
        label(tmp_path, short)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match="bad.pt"):
        label(tmp_path, {**inputs, "flow_model": tmp_path / "bad.pt"})


def test_motion_gt_source_labels_its_frames_alone_into_its_own_store(tmp_path):
    """`source: motion_gt` (dvc.yaml's pseudo_labels@motion_gt) reads only the frames of gt.zarr
    (its ground-truth arrays are absent here) and writes the motion_gt label store, reports and
    metrics, leaving the clips' outputs alone."""
    inputs = make_label_inputs(tmp_path / "made")
    paths = Paths(motion_gt=tmp_path / "motion_gt", artifacts=tmp_path / "artifacts",
                  reports=tmp_path / "reports", metrics=tmp_path / "metrics",
                  labels=tmp_path / "labels.zarr", motion_gt_labels=tmp_path / "gt_labels.zarr")
    gt = zarr.open_group(str(paths.ground_truth()), mode="w")
    gt.create_array("frames", data=zarr.open_group(str(inputs["clips"]), mode="r")["frames"][:])
    models = paths.artifacts_of("motion_pretrain")
    models.mkdir(parents=True)
    for name in ("flow.pt", "tracker.pt"):
        (models / name).write_bytes(inputs["flow_model" if name == "flow.pt" else "tracker"].read_bytes())
    out = pseudo_labels.run_from_paths(Params(source="motion_gt", clip_filter="all", **FAST), paths)
    assert out["labels"] == paths.motion_gt_labels and not paths.labels.exists()
    group = open_label_store(paths.motion_gt_labels)
    assert Path(group.attrs["clips"]) == paths.ground_truth() and group.attrs["source"] == "motion_gt"
    assert counts(group)[0] == 2 * 2
    stats = json.loads((tmp_path / "reports" / "pseudo_labels" / "motion_gt" / "stats.json").read_text())
    assert stats["clips"] == 2
    metrics = json.loads((tmp_path / "metrics" / "pseudo_labels" / "motion_gt.json").read_text())
    assert metrics == {key: stats[key] for key in HEADLINE}
