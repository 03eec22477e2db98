"""Motion metrics on hand-computed cases: flow EPE/accuracy, TAP-Vid (first and strided), label-free
checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.motion_losses import photometric_error
from models.tracker import PointTracker, TrackerConfig
from pipeline.motion.evaluate import (
    cycle_consistent_fraction,
    evaluate_tracker_clip,
    evaluation_mask,
    evenly_spaced,
    flow_metrics,
    mean_over_videos,
    sample_queries,
    tapvid_metrics,
    zero_motion_track_scores,
    zero_motion_tracks,
)
from pipeline.motion.pictures import before_after_chart, draw_tracks, flow_to_color


def test_flow_epe_and_accuracy_by_hand():
    # per-pixel error vectors (x, y): (0, 0), (3, 4), (0.6, 0.8), (2, 0) -> EPE 0, 5, 1, 2
    target = torch.zeros(1, 2, 2, 2)
    pred = torch.tensor([[[[0.0, 3.0], [0.6, 2.0]], [[0.0, 4.0], [0.8, 0.0]]]])
    m = flow_metrics(pred, target)
    assert m["epe"] == pytest.approx(2.0)
    assert m["acc_1px"] == pytest.approx(0.25)  # 1.0 is not strictly below 1
    assert m["acc_3px"] == pytest.approx(0.75)
    assert m["acc_5px"] == pytest.approx(0.75)  # 5.0 is not strictly below 5
    valid = torch.tensor([[[True, True], [True, False]]])  # drop the EPE-2 pixel
    m = flow_metrics(pred, target, valid)
    assert m["epe"] == pytest.approx(2.0)
    assert (m["acc_1px"], m["acc_3px"], m["acc_5px"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_tapvid_first_mode_by_hand():
    # Two points in a 256x256 video (no rescaling), 4 frames.
    # A: visible throughout, queried at frame 0; B: occluded at 0, visible at 1-2, occluded at 3.
    visible = np.array([[1, 0], [1, 1], [1, 1], [1, 0]], bool)
    query_frames, points = sample_queries(visible, "first")
    assert query_frames.tolist() == [0, 1] and points.tolist() == [0, 1]
    gt = np.full((4, 2, 2), 10.0)
    pred = gt.copy()
    pred[0, 0] = [100, 100]         # A at its query frame: not scored
    pred[1, 0] += [0.3, 0.4]        # 0.5 px: within every delta
    pred[2, 0] += [3.0, 0.0]        # 3 px: within 4, 8, 16
    pred[3, 0] += [0.0, 2.0]        # exactly 2 px: not within 2 (strict), within 4, 8, 16
    pred[:2, 1] = [200, 200]        # B up to its query frame: not scored
    pred[2, 1] += [20.0, 0.0]       # 20 px: within none
    pred_vis = np.ones((4, 2), bool)  # B predicted visible at 3 where it is occluded
    m = tapvid_metrics(query_frames, gt, visible, pred, pred_vis, "first", (256, 256))
    # scored: A1 A2 A3 B2 B3; ground-truth visible: A1 A2 A3 B2
    assert m["occlusion_accuracy"] == pytest.approx(4 / 5)
    within = {1: 1 / 4, 2: 1 / 4, 4: 3 / 4, 8: 3 / 4, 16: 3 / 4}
    for d, value in within.items():
        assert m[f"pts_within_{d}"] == pytest.approx(value)
    assert m["delta_avg"] == pytest.approx(np.mean(list(within.values())))
    # TP = correct and predicted visible; FP = predicted visible and (occluded or too far)
    # delta 1, 2: TP A1; FP A2 A3 B2 B3 -> 1 / (4 + 4). delta 4+: TP A1-3; FP B2 B3 -> 3 / (4 + 2)
    jaccard = {1: 1 / 8, 2: 1 / 8, 4: 1 / 2, 8: 1 / 2, 16: 1 / 2}
    for d, value in jaccard.items():
        assert m[f"jaccard_{d}"] == pytest.approx(value)
    assert m["average_jaccard"] == pytest.approx(0.35)


def test_tapvid_strided_mode_by_hand_with_rescaling():
    # One point in a 128 (H) x 64 (W) video, 6 frames, occluded at frame 3: strided queries at 0 and 5.
    visible = np.array([[1], [1], [1], [0], [1], [1]], bool)
    query_frames, points = sample_queries(visible, "strided")
    assert query_frames.tolist() == [0, 5] and points.tolist() == [0, 0]
    assert evaluation_mask(query_frames, 6, "strided")[:, 0].tolist() == [False] + [True] * 5
    track = np.stack([np.linspace(5, 40, 6), np.linspace(20, 90, 6)], -1)  # (6, 2) (x, y)
    gt = np.repeat(track[:, None], 2, axis=1)  # (T, N=2, 2)
    gt_vis = visible[:, points]
    pred = gt.copy()
    pred[:, 1, 0] += 0.375  # query 2: 0.375 px in x = 1.5 px at 256 wide (x scaled by 4)
    pred_vis = np.ones((6, 2), bool)
    pred_vis[3, 1] = False  # query 1 calls frame 3 visible (wrong), query 2 gets it right
    m = tapvid_metrics(query_frames, gt, gt_vis, pred, pred_vis, "strided", (128, 64))
    # scored: q1 frames 1-5, q2 frames 0-4 -> 10 points, 8 ground-truth visible
    assert m["occlusion_accuracy"] == pytest.approx(9 / 10)
    assert m["pts_within_1"] == pytest.approx(4 / 8)  # 1.5 px > 1: only q1 counts
    for d in (2, 4, 8, 16):
        assert m[f"pts_within_{d}"] == pytest.approx(1.0)
    assert m["delta_avg"] == pytest.approx((0.5 + 4) / 5)
    # delta 1: TP 4 (q1), FP = q1 frame 3 + q2's 4 visible frames -> 4 / (8 + 5); delta 2+: 8 / (8 + 1)
    assert m["jaccard_1"] == pytest.approx(4 / 13)
    assert m["jaccard_2"] == pytest.approx(8 / 9)
    assert m["average_jaccard"] == pytest.approx((4 / 13 + 4 * 8 / 9) / 5)


def test_evenly_spaced():
    assert evenly_spaced(23, 4).tolist() == [0, 7, 15, 22]
    assert evenly_spaced(3, 8).tolist() == [0, 1, 2]
    assert evenly_spaced(5, None).tolist() == [0, 1, 2, 3, 4]


def test_mean_over_videos_skips_nan():
    rows = [{"a": 1.0, "b": float("nan")}, {"a": 0.0, "b": 0.5}]
    assert mean_over_videos(rows) == {"a": 0.5, "b": 0.5}


def test_photometric_error_and_cycle_consistent_fraction():
    gen = torch.Generator().manual_seed(0)
    img0 = torch.rand(1, 3, 16, 20, generator=gen)
    img1 = torch.roll(img0, shifts=3, dims=-1)  # content moves 3 px right
    right = torch.zeros(1, 2, 16, 20)
    right[:, 0] = 3.0
    # exact flow: zero error on the pixels that stay in frame (the last 3 columns leave it)
    assert float(photometric_error(img0, img1, right)) == pytest.approx(0.0, abs=1e-6)
    assert float(photometric_error(img0, img1, torch.zeros_like(right))) > 0.1
    # pixels whose flow leaves the frame (last 3 columns) are not counted
    assert float(cycle_consistent_fraction(right, -right, alpha=0.01, beta=0.5)) == 1.0
    assert float(cycle_consistent_fraction(right, torch.zeros_like(right), alpha=0.01, beta=0.5)) == 0.0
    # backward flow wrong by (0.4, 0.4) (0.57 px) in the top 4 of 16 rows: 1/4 of the pixels fail
    back = -right.clone()
    back[..., :4, :] += 0.4
    assert float(cycle_consistent_fraction(right, back, alpha=0.0, beta=0.1)) == pytest.approx(0.75)
    # the tolerance grows with the flow magnitude: 0.2 x (3 + 2.63) + 0.1 > 0.57
    assert float(cycle_consistent_fraction(right, back, alpha=0.2, beta=0.1)) == 1.0


def test_flow_colours_and_track_overlay():
    flow = np.zeros((2, 4, 4), np.float32)
    flow[0, 0, 0] = 2.0   # right: red
    flow[1, 0, 1] = 2.0   # down: hue 1/4 (yellow-green)
    image = flow_to_color(flow)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert image[3, 3].tolist() == [255, 255, 255]  # still -> white
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[0, 1].tolist() == [128, 255, 0]
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    tracks = np.array([[[2.0, 3.0]], [[6.2, 5.9]]])
    out = draw_tracks(frames, tracks, np.array([[True], [False]]), radius=0)
    assert out[0, 3, 2].any() and out[0].sum() == out[0, 3, 2].sum()
    assert not out[1].any()  # occluded: not drawn


def test_tracker_evaluation_runs_on_a_clip():
    torch.manual_seed(0)
    model = PointTracker(TrackerConfig(feat_dim=16, hidden_dim=32, levels=2, blocks=1))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    tracks = rng.uniform(4, 28, (10, 5, 2)).astype(np.float32)
    visible = rng.random((10, 5)) > 0.3
    visible[0] = True
    for mode in ("first", "strided"):
        metrics, (qf, pred, pred_vis) = evaluate_tracker_clip(model, frames, tracks, visible, mode, iters=2)
        assert set(metrics) >= {"delta_avg", "occlusion_accuracy", "average_jaccard"}
        assert all(0 <= v <= 1 for v in metrics.values())
        # the query itself comes back where it was asked
        n = np.arange(len(qf))
        _, points = sample_queries(visible, mode)
        np.testing.assert_allclose(pred[qf, n], tracks[qf, points], atol=1e-3)
        assert pred_vis[qf, n].all()


def test_zero_motion_tracks_by_hand():
    """Standing still at the query: a still point is within every delta, one moving 3 px a frame is 3, 6
    and 9 px away on the scored frames (256 x 256 video: no rescaling); both predicted visible."""
    tracks = np.zeros((4, 2, 2))
    tracks[:, 0] = 50.0
    tracks[:, 1, 0] = 100.0 + 3.0 * np.arange(4)
    tracks[:, 1, 1] = 100.0
    visible = np.ones((4, 2), bool)
    m = zero_motion_tracks(tracks, visible, "first", (256, 256))
    within = {1: 3 / 6, 2: 3 / 6, 4: 4 / 6, 8: 5 / 6, 16: 6 / 6}
    assert m["delta_avg"] == pytest.approx(np.mean(list(within.values())))
    assert m["occlusion_accuracy"] == 1.0
    store = {"frames": np.zeros((2, 4, 256, 256, 3), np.uint8), "tracks": np.stack([tracks, tracks]),
             "visible": np.stack([visible, visible])}
    scores = zero_motion_track_scores(store)
    assert set(scores) == {"tracks_first", "tracks_strided"}
    assert scores["tracks_first"]["delta_avg"] == pytest.approx(m["delta_avg"])


def test_before_after_chart_draws_the_scores_a_target_has():
    flow = {"epe": 1.2, "acc_1px": 0.6, "other": 3.0}
    scores = {"before": {"flow": flow, "tracks_first": {"delta_avg": 0.2}},
              "after": {"flow": {**flow, "epe": 1.1}, "tracks_first": {"delta_avg": 0.25}},
              "zero_motion": {"flow": {"epe": 1.8, "acc_1px": 0.7}}}
    image = before_after_chart(scores, "motion_gt")
    label_free = before_after_chart({"before": {"flow": {"photometric_error": 0.02}},
                                     "after": {"flow": {"photometric_error": 0.019}}}, "clips")
    assert image.dtype == np.uint8 and image.shape[1] > 1.5 * label_free.shape[1] > 0  # 3 panels vs 1
    with pytest.raises(ValueError, match="no before/after scores"):
        before_after_chart({"before": {}, "after": {}}, "nothing")
