"""pipeline/motion/cycle.py: the flow filter keeps exactly the non-occluded pixels of a pair with known
motion, the colour test is active, and the track cycle test keeps exact tracks and rejects
perturbed ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.flow import lands_inside, warp
from models.tracker import PointTracker, TrackerConfig
from pipeline.motion.cycle import (
    FLOW_TESTS,
    FlowThresholds,
    colour_error,
    flow_cycle_mask,
    flow_label_mask,
    flow_label_tests,
    forward_backward_tracks,
    resolution_scale,
    track_cycle_error,
    track_cycle_mask,
)

H, W = 64, 80
SQUARE = (20, 16, 24)  # top-left x, top-left y, side in frame 0
MOVE = (6, 4)  # the square's integer translation (dx, dy) from frame 0 to frame 1
# The paper's thresholds at Sintel scale, beta and max_flow scaled to this frame size.
THRESHOLDS = FlowThresholds(alpha=0.002, beta=0.1 * resolution_scale((H, W), (436, 1024)), colour=0.005,
                            max_flow=400 * resolution_scale((H, W), (436, 1024)), colour_window=1)


def _square(dx: int = 0, dy: int = 0) -> np.ndarray:
    """(H, W) bool: the square moved by (dx, dy)."""
    x0, y0, side = SQUARE
    mask = np.zeros((H, W), bool)
    mask[y0 + dy:y0 + dy + side, x0 + dx:x0 + dx + side] = True
    return mask


@pytest.fixture(scope="module")
def square_pair():
    """A textured square translating over a static textured background, its exact forward and
    backward flow, and the pixels of frame 0 that are visible in frame 1 (not occluded)."""
    rng = np.random.default_rng(0)
    background = rng.uniform(0, 1, (3, H, W)).astype(np.float32)
    texture = rng.uniform(0, 1, (3, H, W)).astype(np.float32)  # the square's own texture
    img0 = np.where(_square(), texture, background)
    moved_texture = np.roll(texture, MOVE[::-1], axis=(1, 2))  # the square carries its texture along
    img1 = np.where(_square(*MOVE), moved_texture, background)
    fwd = np.zeros((2, H, W), np.float32)
    fwd[:, _square()] = np.array(MOVE, np.float32)[:, None]
    bwd = np.zeros((2, H, W), np.float32)
    bwd[:, _square(*MOVE)] = -np.array(MOVE, np.float32)[:, None]
    # background pixels of frame 0 that the square covers in frame 1 have no match: occluded
    visible = ~(~_square() & _square(*MOVE))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None]  # noqa: E731
    return as_tensor(img0), as_tensor(img1), as_tensor(fwd), as_tensor(bwd), visible


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_warp_brings_frame1_onto_frame0_where_visible(square_pair):
    img0, img1, fwd, _, visible = square_pair
    warped = warp(img1, fwd)
    assert torch.allclose(warped[0][:, torch.from_numpy(visible)], img0[0][:, torch.from_numpy(visible)],
                          atol=1e-5)
    occluded = torch.from_numpy(~visible)
    assert (warped[0][:, occluded] - img0[0][:, occluded]).abs().mean() > 0.1


def test_flow_filter_keeps_the_non_occluded_region(square_pair):
    img0, img1, fwd, bwd, visible = square_pair
    kept = flow_label_mask(img0, img1, fwd, bwd, THRESHOLDS)[0].numpy()
    assert (~visible).sum() > 100, "the test needs a real occluded region"
    assert _iou(kept, visible) >= 0.95
    assert not (kept & ~visible).any(), "an occluded pixel passed"
    # each test alone: the cycle test finds the occlusion too, the colour test passes the exact match
    cycle = flow_cycle_mask(fwd, bwd, THRESHOLDS.alpha, THRESHOLDS.beta)[0].numpy()
    assert _iou(cycle, visible) >= 0.95
    assert (colour_error(img0, img1, fwd)[0].numpy()[visible] < 1e-5).all()


def test_colour_and_range_tests_are_active(square_pair):
    img0, img1, fwd, bwd, visible = square_pair
    brighter = img1 + 0.05 * torch.from_numpy(_square(*MOVE))  # the square changes colour
    kept = flow_label_mask(img0, brighter, fwd, bwd, THRESHOLDS)[0].numpy()
    assert not kept[_square()].any() and kept[visible & ~_square()].all()
    tests = flow_label_tests(img0, brighter, fwd, bwd, THRESHOLDS)  # which test rejected what
    assert tuple(tests) == FLOW_TESTS
    assert not tests["colour"][0].numpy()[_square()].any() and tests["cycle"][0].numpy()[_square()].all()
    assert torch.equal(torch.stack(list(tests.values())).all(0)[0], torch.from_numpy(kept))
    strict = FlowThresholds(**{**THRESHOLDS.as_dict(), "max_flow": 5.0})  # |MOVE| = 7.2 px
    assert not flow_label_mask(img0, img1, fwd, bwd, strict)[0, torch.from_numpy(_square())].any()
    # a neighbourhood average spreads a one-pixel colour error below the threshold
    spike = img1.clone()
    spike[..., 40, 60] += 0.03
    assert not flow_label_mask(img0, spike, fwd, bwd, THRESHOLDS)[0, 40, 60]
    windowed = FlowThresholds(**{**THRESHOLDS.as_dict(), "colour_window": 3})
    assert flow_label_mask(img0, spike, fwd, bwd, windowed)[0, 40, 60]


def test_wrong_flow_fails_the_cycle_test(square_pair):
    img0, img1, fwd, bwd, visible = square_pair
    off = fwd.clone()
    off[:, 0][torch.from_numpy(_square())[None]] += 1.0  # one pixel off on the square
    cycle = flow_cycle_mask(off, bwd, THRESHOLDS.alpha, THRESHOLDS.beta)[0].numpy()
    assert not cycle[_square()].any()


def test_flow_leaving_the_frame_is_not_kept():
    flow = torch.zeros(1, 2, 8, 10)
    flow[:, 0] = 3.0  # everything moves 3 px right: the last 3 columns leave the frame
    inside = lands_inside(flow)[0]
    assert inside[:, :7].all() and not inside[:, 7:].any()


def test_resolution_scale():
    assert resolution_scale((436, 1024), (436, 1024)) == pytest.approx(1.0)
    assert resolution_scale((128, 128), (256, 448)) == pytest.approx(128 / np.sqrt(256 * 448))
    assert resolution_scale((512, 896), (256, 448)) == pytest.approx(2.0)


def _tracks(rng: np.random.Generator, s: int = 8, n: int = 6) -> torch.Tensor:
    """(1, S, N, 2) smooth random tracks well inside a 64 x 80 frame."""
    start = rng.uniform(20, 40, (n, 2))
    velocity = rng.uniform(-2, 2, (n, 2))
    return torch.from_numpy(start[None] + velocity[None] * np.arange(s)[:, None, None]).float()[None]


def test_track_cycle_keeps_exact_tracks_and_rejects_perturbed_ones():
    tau = 1.2
    exact = _tracks(np.random.default_rng(1))
    assert track_cycle_mask(exact, exact.clone(), tau, (H, W)).all()
    backward = exact.clone()
    backward[0, 3, 2] += torch.tensor([2 * tau, 0.0])  # point 2 off by 2 tau in frame 3 only
    backward[0, 5, 4] += torch.tensor([0.0, 0.5 * tau])  # point 4 off by tau / 2: still agrees
    keep = track_cycle_mask(exact, backward, tau, (H, W))[0]
    assert keep.tolist() == [True, True, False, True, True, True]
    assert track_cycle_error(exact, backward)[0, 2] == pytest.approx(2 * tau)
    leaving = exact.clone()
    leaving[0, -1, 0, 0] = W + 3.0  # leaves the frame in the last frame
    assert not track_cycle_mask(leaving, leaving, tau, (H, W))[0, 0]


def test_forward_backward_tracks_starts_and_ends_where_it_should():
    torch.manual_seed(0)
    model = PointTracker(TrackerConfig(feat_dim=16, hidden_dim=32, levels=2, radius=2, blocks=1)).eval()
    video = torch.rand(2, 8, 3, 32, 40)
    queries = torch.tensor([[[5.0, 6.0], [20.5, 17.0]], [[30.0, 3.0], [11.0, 25.0]]])
    forward, backward = forward_backward_tracks(model, video, queries, iters=2)
    assert forward.shape == backward.shape == (2, 8, 2, 2)
    torch.testing.assert_close(forward[:, 0], queries)  # forward starts at the queries
    torch.testing.assert_close(backward[:, -1], forward[:, -1])  # backward starts at the endpoints
