"""Synthetic supervised datasets for the motion models: flow pairs and 8-frame track windows.

Both render a fresh scene for every sample from the sample's seed (the shared training loop hands
`(index, sample_seed)`), so the data is unlimited, reproducible and independent of the process
layout; the index only sets the epoch length. Scenes come from `pipeline.data.synthetic` (layered,
textured objects under affine motion with occlusion: the FlyingChairs/Kubric recipe), by default in
`PRETRAIN_STYLE`, whose look and motion differ on purpose from the evaluation clips (`GT_STYLE`).

- `SyntheticFlowPairs`: a random consecutive frame pair of a rendered clip and its exact forward
  flow. Items: img0, img1 (3, H, W) float in [0, 1]; flow (2, H, W) float32 pixels (x, y); valid (H, W) bool.
- `SyntheticTrackWindows`: a `window`-frame clip and `num_points` tracks queried in its first
  frame. Items: video (S, 3, H, W) float in [0, 1]; tracks (S, P, 2) float32 (x, y); visible (S, P) bool;
  valid (S, P) bool (the position is inside the frame, so it can be supervised).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.tensors import image_to_tensor
from pipeline.data.synthetic import PRETRAIN_STYLE, SceneStyle, render_motion_clip

# Flow labels larger than this (px) are left out of the loss, as RAFT's training does (at 400 px on
# full-size data); synthetic pre-training scenes never get close at the demo size.
MAX_FLOW = 400.0


class SyntheticFlowPairs(Dataset):
    """Consecutive frame pairs with exact flow, one freshly rendered scene per sample seed."""

    def __init__(self, size: int = 128, clip_frames: int = 4, style: SceneStyle = PRETRAIN_STYLE,
                 length: int = 1024) -> None:
        if clip_frames < 2:
            raise ValueError(f"clip_frames must be >= 2 (a pair needs two frames), got {clip_frames}")
        self.size, self.clip_frames, self.style, self.length = size, clip_frames, style, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        _, seed = item
        rng = np.random.default_rng(seed)
        clip = render_motion_clip(size=(self.size, self.size), num_frames=self.clip_frames,
                                  num_points=0, rng=rng, style=self.style)
        t = int(rng.integers(self.clip_frames - 1))
        flow = torch.from_numpy(clip.flow[t]).permute(2, 0, 1).contiguous()  # (2, H, W)
        return {"img0": image_to_tensor(clip.frames[t]), "img1": image_to_tensor(clip.frames[t + 1]),
                "flow": flow, "valid": flow.norm(dim=0) < MAX_FLOW}


class SyntheticTrackWindows(Dataset):
    """`window`-frame clips with `num_points` exact tracks queried (and visible) in frame 0."""

    def __init__(self, size: int = 128, window: int = 8, num_points: int = 64,
                 style: SceneStyle = PRETRAIN_STYLE, length: int = 1024) -> None:
        if window < 2 or num_points < 1:
            raise ValueError(f"need window >= 2 and num_points >= 1, got {window}, {num_points}")
        self.size, self.window, self.num_points = size, window, num_points
        self.style, self.length = style, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        _, seed = item
        rng = np.random.default_rng(seed)
        # The renderer queries each point at a random frame; oversample and keep those visible in
        # frame 0, which is where the tracker takes its queries.
        clip = render_motion_clip(size=(self.size, self.size), num_frames=self.window,
                                  num_points=3 * self.num_points, rng=rng, style=self.style)
        seen = np.flatnonzero(clip.visible[0])
        if len(seen) == 0:  # practically impossible (half the points lie on the background)
            seen = np.arange(clip.tracks.shape[1])
        # Cycle through the visible points if there are too few; repeated points only re-weight.
        chosen = rng.permutation(seen)[np.arange(self.num_points) % len(seen)]
        tracks = clip.tracks[:, chosen]
        inside = ((tracks >= 0) & (tracks <= self.size - 1)).all(-1)
        return {"video": image_to_tensor(clip.frames), "tracks": torch.from_numpy(tracks),
                "visible": torch.from_numpy(clip.visible[:, chosen]), "valid": torch.from_numpy(inside)}
