"""Augmentations keep motion labels consistent with the augmented frames (exact synthetic motion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.flow import warp
from pipeline.core.tensors import image_to_tensor
from pipeline.data.synthetic import GT_STYLE, render_motion_clip
from pipeline.motion.augment import (
    AugmentParams,
    augment_flow_sample,
    augment_track_sample,
    color_jitter,
    flip_flow_sample,
    flip_track_sample,
)

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@pytest.fixture(scope="module")
def clip():
    return render_motion_clip(size=(36, 44), num_frames=4, num_points=24, style=GT_STYLE,
                              rng=np.random.default_rng(3))


def flow_sample(clip):
    frames = image_to_tensor(clip.frames[:2])  # (2, 3, H, W)
    flow = torch.from_numpy(clip.flow[0]).permute(2, 0, 1)  # (2, H, W)
    return frames, flow


def residual(frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """|I0 - warp(I1, f)| per pixel (H, W): small wherever the flow is right and nothing occludes."""
    return (frames[0] - warp(frames[1][None], flow[None])[0]).abs().sum(0)


def sample_colors(frames: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear colours (S, P, 3) of frames (S, 3, H, W) at pixel coordinates (S, P, 2)."""
    h, w = frames.shape[-2:]
    grid = torch.stack([2 * coords[..., 0] / (w - 1) - 1, 2 * coords[..., 1] / (h - 1) - 1], -1)
    return F.grid_sample(frames, grid[:, :, None], align_corners=True)[..., 0].permute(0, 2, 1)


@pytest.mark.parametrize("horizontal", [True, False])
def test_flipped_flow_still_warps_frame1_onto_frame0(clip, horizontal):
    frames, flow = flow_sample(clip)
    before = residual(frames, flow)
    assert before.median() < 0.05  # exact flow: frame 1 warps onto frame 0 (up to occlusions)
    f_frames, f_flow, f_valid = flip_flow_sample(frames, flow, torch.ones(flow.shape[1:], dtype=torch.bool),
                                                 horizontal=horizontal)
    axis = -1 if horizontal else -2
    torch.testing.assert_close(residual(f_frames, f_flow), before.flip(axis), atol=1e-4, rtol=0)
    # flipping the field without negating its component breaks the warp: the check can fail
    wrong = flow.flip(axis)
    assert (residual(f_frames, wrong) - before.flip(axis)).abs().mean() > 0.05
    assert f_valid.all()


@pytest.mark.parametrize("horizontal", [True, False])
def test_flipped_tracks_land_on_the_same_colours(clip, horizontal):
    frames = image_to_tensor(clip.frames)  # (T, 3, H, W)
    coords = torch.from_numpy(clip.tracks)  # (T, P, 2)
    f_frames, f_coords = flip_track_sample(frames, coords, horizontal=horizontal)
    vis = torch.from_numpy(clip.visible)
    torch.testing.assert_close(sample_colors(f_frames, f_coords)[vis], sample_colors(frames, coords)[vis],
                               atol=1e-4, rtol=0)
    w, h = frames.shape[-1], frames.shape[-2]
    moved = 0 if horizontal else 1
    torch.testing.assert_close(f_coords[..., moved], (w - 1 if horizontal else h - 1) - coords[..., moved])
    torch.testing.assert_close(f_coords[..., 1 - moved], coords[..., 1 - moved])


def test_augmented_flow_sample_matches_crop_and_flips_of_the_residual(clip):
    frames, flow = flow_sample(clip)
    valid = torch.rand(flow.shape[1:], generator=torch.Generator().manual_seed(0)) > 0.5
    params = AugmentParams(crop=(24, 30), hflip_prob=1.0, vflip_prob=1.0, **NO_JITTER)
    a_frames, a_flow, a_valid = augment_flow_sample(frames, flow, valid, np.random.default_rng(1), params)
    assert a_frames.shape == (2, 3, 24, 30) and a_flow.shape == (2, 24, 30) and a_valid.shape == (24, 30)
    # find the crop: the flipped-back valid mask is a window of the original
    back_valid = a_valid.flip(-1).flip(-2)
    hits = [(y, x) for y in range(36 - 24 + 1) for x in range(44 - 30 + 1)
            if torch.equal(valid[y:y + 24, x:x + 30], back_valid)]
    assert len(hits) == 1
    y, x = hits[0]
    torch.testing.assert_close(a_frames.flip(-1).flip(-2), frames[..., y:y + 24, x:x + 30], atol=1e-4, rtol=0)
    torch.testing.assert_close(-a_flow.flip(-1).flip(-2), flow[:, y:y + 24, x:x + 30])
    # interior pixels (warps that stay inside the crop) keep their residual
    inner = residual(frames[..., y:y + 24, x:x + 30], flow[:, y:y + 24, x:x + 30])
    torch.testing.assert_close(residual(a_frames, a_flow).flip(-1).flip(-2)[6:-6, 6:-6], inner[6:-6, 6:-6],
                               atol=1e-4, rtol=0)


def test_track_crop_moves_coordinates_and_drops_points_outside(clip):
    frames = image_to_tensor(clip.frames)
    coords = torch.from_numpy(clip.tracks)
    valid = torch.ones(coords.shape[:2], dtype=torch.bool)
    params = AugmentParams(crop=(20, 20), hflip_prob=0.0, vflip_prob=0.0, **NO_JITTER)
    a_frames, a_coords, a_valid = augment_track_sample(frames, coords, valid, np.random.default_rng(5),
                                                       params)
    assert a_frames.shape == (4, 3, 20, 20)
    shift = coords - a_coords  # one (x0, y0) for every point and frame
    torch.testing.assert_close(shift, shift[:1, :1].expand_as(shift))
    x0, y0 = (int(v) for v in shift[0, 0].round())
    torch.testing.assert_close(a_frames, frames[..., y0:y0 + 20, x0:x0 + 20])
    inside = (a_coords >= 0).all(-1) & (a_coords <= 19).all(-1)
    assert torch.equal(a_valid, inside & inside[:1])  # outside the crop, or query outside: no label
    assert a_valid.any() and not a_valid.all()
    vis = a_valid & torch.from_numpy(clip.visible)
    torch.testing.assert_close(sample_colors(a_frames, a_coords)[vis], sample_colors(frames, coords)[vis],
                               atol=1e-4, rtol=0)


def test_color_jitter_joint_or_per_frame_and_seeded():
    frame = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = frame.repeat(3, 1, 1, 1)
    joint = color_jitter(frames, np.random.default_rng(0), AugmentParams(per_frame_jitter_prob=0.0))
    assert torch.equal(joint[0], joint[1]) and torch.equal(joint[1], joint[2])
    assert not torch.allclose(joint[0], frames[0])
    per_frame = color_jitter(frames, np.random.default_rng(0), AugmentParams(per_frame_jitter_prob=1.0))
    assert not torch.allclose(per_frame[0], per_frame[1])
    again = color_jitter(frames, np.random.default_rng(0), AugmentParams(per_frame_jitter_prob=1.0))
    assert torch.equal(per_frame, again)
    assert per_frame.min() >= 0 and per_frame.max() <= 1
