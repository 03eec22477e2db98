"""Forward-backward consistency tests for flow and point tracks: the pseudo-label filters.

Refining a motion model on unlabelled video (Sun, Harley, Guibas 2024) keeps only the estimates
that survive a cycle: run the model forward and backward in time and keep what agrees.

Flow (docs/design.md section 7): with f the flow 0 -> 1 and b the flow 1 -> 0, a pixel is kept when

- `|f + warp(b, f)| < alpha (|f| + |warp(b, f)|) + beta` (forward and backward cancel),
- `mean_c |I0 - warp(I1, f)| < colour` on images in [-0.5, 0.5] (colour constancy; the offset
  cancels in the difference, so [0, 1] images give the same number), per pixel by default, as the
  paper does. `colour_window` > 1 averages the error over a square neighbourhood first, which
  forgives single-pixel noise; measured with exact flows on rendered GT_STYLE clips at 128 px, the
  per-pixel test keeps 91% of the non-occluded pixels and a 3 x 3 mean 85% (windows straddle
  occlusion edges), while both reject 99.5% of the occluded ones, so per pixel is the default,
- `|f| < max_flow`, and the target `x + f` lies inside the frame (outside, nothing can be checked).

Tracks: track S frames forward from the queries, re-query at the endpoint and track back to frame
0 on the time-reversed clip; keep a track when the two agree within `tau` px in every frame and
stay inside the frame. Visibility is not used by the filter (as in the paper).

Tensors follow models/: images (B, 3, H, W), flow (B, 2, H, W) pixels (x, y), coordinates (x, y).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.flow import lands_inside, to_unit_range, warp
from models.tracker import PointTracker, track_long


def resolution_scale(size: tuple[int, int], reference: tuple[int, int]) -> float:
    """Factor that carries a length in pixels from `reference` (H, W) frames to `size` (H, W) frames.

    The geometric mean of the two side ratios, sqrt(H W / (H_ref W_ref)): a length threshold set
    for one resolution (the paper's beta at Sintel's 436 x 1024, tau at 256 x 448) means the same
    fraction of the scene at another. The mean of both sides, rather than the width alone, keeps
    square frames from being scaled as if they were as wide as the reference.
    """
    return float(np.sqrt(size[0] * size[1] / (reference[0] * reference[1])))


FLOW_TESTS = ("inside", "small", "colour", "cycle")


@dataclass(frozen=True)
class FlowThresholds:
    """The flow filter's thresholds in pixels of the images being labelled (already scaled)."""

    alpha: float = 0.002
    beta: float = 0.1
    colour: float = 0.005
    max_flow: float = 400.0
    colour_window: int = 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def flow_cycle_mask(fwd: Tensor, bwd: Tensor, alpha: float, beta: float) -> Tensor:
    """(B, H, W) bool: |f + warp(b, f)| < alpha (|f| + |warp(b, f)|) + beta."""
    back = warp(bwd, fwd)
    diff = torch.linalg.vector_norm(fwd + back, dim=1)
    scale = torch.linalg.vector_norm(fwd, dim=1) + torch.linalg.vector_norm(back, dim=1)
    return diff < alpha * scale + beta


def colour_error(img0: Tensor, img1: Tensor, fwd: Tensor, window: int = 1) -> Tensor:
    """(B, H, W): mean over channels of |I0 - warp(I1, f)|, box-averaged over window x window.

    Images uint8 or float in [0, 1]; the error is in units of the full intensity range (what it is
    on [-0.5, 0.5] images). Near the border the box averages the pixels it covers.
    """
    if window % 2 == 0:
        raise ValueError(f"the colour window must be odd, got {window}")
    err = (to_unit_range(img0) - warp(to_unit_range(img1), fwd)).abs().mean(1, keepdim=True)
    if window > 1:
        err = F.avg_pool2d(err, window, stride=1, padding=window // 2, count_include_pad=False)
    return err[:, 0]


def flow_label_tests(img0: Tensor, img1: Tensor, fwd: Tensor, bwd: Tensor,
                     thresholds: FlowThresholds) -> dict[str, Tensor]:
    """Each flow test on its own, (B, H, W) bool by name: inside, small, colour, cycle (which one
    rejects most pixels tells a user which threshold to look at)."""
    th = thresholds
    return {"inside": lands_inside(fwd), "small": torch.linalg.vector_norm(fwd, dim=1) < th.max_flow,
            "colour": colour_error(img0, img1, fwd, th.colour_window) < th.colour,
            "cycle": flow_cycle_mask(fwd, bwd, th.alpha, th.beta)}


def flow_label_mask(img0: Tensor, img1: Tensor, fwd: Tensor, bwd: Tensor,
                    thresholds: FlowThresholds) -> Tensor:
    """(B, H, W) bool: the pixels of `fwd` (img0 -> img1) that pass every flow test above."""
    tests = list(flow_label_tests(img0, img1, fwd, bwd, thresholds).values())
    keep = tests[0]
    for test in tests[1:]:
        keep = keep & test
    return keep


# ----------------------------------------------------------------------------------------- tracks


def grid_queries(size: tuple[int, int], step: int) -> torch.Tensor:
    """(1, N, 2) (x, y) pixel centres every `step` px, the grid centred in the (H, W) frame."""
    h, w = size
    ys = torch.arange((h - 1) % step // 2 + 0.0, h, step) if step < h else torch.tensor([(h - 1) / 2])
    xs = torch.arange((w - 1) % step // 2 + 0.0, w, step) if step < w else torch.tensor([(w - 1) / 2])
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)[None]


def track_cycle_error(forward: Tensor, backward: Tensor) -> Tensor:
    """Largest forward-backward distance over frames: (..., S, N, 2) twice -> (..., N) pixels."""
    return torch.linalg.vector_norm(forward - backward, dim=-1).amax(dim=-2)


def inside_frame(coords: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., S, N, 2) -> (..., N) bool: the track stays inside an (H, W) frame in every frame."""
    h, w = size
    x, y = coords[..., 0], coords[..., 1]
    return ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).all(dim=-2)


def track_cycle_mask(forward: Tensor, backward: Tensor, tau: float, size: tuple[int, int]) -> Tensor:
    """(..., N) bool: forward and backward agree within `tau` px in every frame, inside the frame."""
    return (track_cycle_error(forward, backward) <= tau) & inside_frame(forward, size)


@torch.no_grad()
def forward_backward_tracks(model: PointTracker, video: Tensor, queries: Tensor, iters: int,
                            point_chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Track `queries` (B, N, 2) from frame 0 of `video` (B, S, 3, H, W) to its last frame, then back.

    Returns (forward, backward) coordinates (B, S, N, 2): `forward` starts at the queries,
    `backward` at the forward endpoints in frame S-1, tracked on the time-reversed clip.
    """
    s = video.shape[1]
    zeros = queries.new_zeros(*queries.shape[:-1], 1)
    forward, _ = track_long(model, video, torch.cat([zeros, queries], -1), iters=iters,
                            direction="forward", point_chunk=point_chunk)
    ends = torch.cat([zeros + (s - 1), forward[:, -1]], -1)
    backward, _ = track_long(model, video, ends, iters=iters, direction="backward",
                             point_chunk=point_chunk)
    return forward, backward
