"""Augmentation of motion samples that keeps their labels consistent with the augmented frames.

Refinement fine-tunes a motion model to reproduce its own filtered labels under input
augmentation (Sun et al. 2024, following RAFT's and PIPs' training recipes):

- random crop: frames, flow, valid masks and track coordinates move together (track points that
  leave the crop lose their label; a track whose query, frame 0, leaves it loses all of them);
- horizontal flip (p 0.5) and vertical flip (p 0.1): frames are mirrored, the flow field is
  mirrored and its x (resp. y) component negated, track coordinates map x -> W - 1 - x (resp.
  y -> H - 1 - y; pixel centres are integers);
- colour jitter (brightness, contrast, saturation 0.4, hue 0.16): with probability 0.2 every
  frame draws its own jitter (RAFT's "asymmetric" jitter), otherwise all frames share one draw.
  Photometric changes leave motion untouched.

`LabelFlowPairs` and `LabelTrackSamples` serve a labels store (`labels.zarr` layout: flow/pairs,
flow/flow, flow/valid; tracks/clip, tracks/start, tracks/coords, tracks/valid) under these
augmentations, reading the frames from the store's frames source, for the shared training loop.
All randomness comes from the `np.random.Generator` handed in (the loop seeds one per sample).
Frames are float (T, 3, H, W) in [0, 1]; flow (2, H, W) pixels (x, y); tracks (S, P, 2) (x, y)
pixels with valid (S, P).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.core.params import StageParams
from pipeline.core.tensors import image_to_tensor


class AugmentParams(StageParams):
    """Augmentation knobs (the paper's released values by default; crop scaled to the demo size)."""

    crop: tuple[int, int] = Field((128, 128), description="random crop (H, W), capped at the frame size")
    brightness: float = Field(0.4, ge=0, lt=1, description="brightness factor drawn from 1 +- this")
    contrast: float = Field(0.4, ge=0, lt=1, description="contrast factor drawn from 1 +- this")
    saturation: float = Field(0.4, ge=0, lt=1, description="saturation factor drawn from 1 +- this")
    hue: float = Field(0.16, ge=0, le=0.5, description="hue shift drawn from +- this")
    per_frame_jitter_prob: float = Field(0.2, ge=0, le=1, description="probability that each frame "
                                         "gets its own colour jitter (else one draw for all frames)")
    hflip_prob: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip_prob: float = Field(0.1, ge=0, le=1, description="probability of a vertical flip")


@dataclass(frozen=True)
class Window:
    """A crop: top-left corner (x0, y0) and size (h, w) in pixels."""

    x0: int
    y0: int
    h: int
    w: int


def random_window(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator) -> Window:
    """A uniformly placed crop of size min(crop, frame) inside a (height, width) frame."""
    h, w = min(crop[0], height), min(crop[1], width)
    return Window(int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), h, w)


# --------------------------------------------------------------------------------------- flips


def flip_flow_sample(frames: Tensor, flow: Tensor, valid: Tensor, *, horizontal: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror frames (T, 3, H, W), flow (2, H, W) and valid (H, W) left-right or up-down.

    The flow vector at a mirrored pixel is the mirror image of the original vector: its component
    along the flipped axis changes sign.
    """
    axis, component = (-1, 0) if horizontal else (-2, 1)
    flow = flow.flip(axis).clone()
    flow[component] = -flow[component]
    return frames.flip(axis), flow, valid.flip(axis)


def flip_track_sample(frames: Tensor, coords: Tensor, *, horizontal: bool) -> tuple[Tensor, Tensor]:
    """Mirror frames (S, 3, H, W) and track coordinates (S, P, 2): x -> W - 1 - x or y -> H - 1 - y."""
    axis, component = (-1, 0) if horizontal else (-2, 1)
    size = frames.shape[axis]
    coords = coords.clone()
    coords[..., component] = (size - 1) - coords[..., component]
    return frames.flip(axis), coords


# ---------------------------------------------------------------------------------- colour jitter


def _jitter_one(frames: Tensor, rng: np.random.Generator, p: AugmentParams) -> Tensor:
    """One random colour jitter (factors and order as torchvision's ColorJitter) applied to frames."""
    ops = [
        (TF.adjust_brightness, 1 + rng.uniform(-p.brightness, p.brightness)),
        (TF.adjust_contrast, 1 + rng.uniform(-p.contrast, p.contrast)),
        (TF.adjust_saturation, 1 + rng.uniform(-p.saturation, p.saturation)),
        (TF.adjust_hue, rng.uniform(-p.hue, p.hue)),
    ]
    for i in rng.permutation(len(ops)):
        fn, factor = ops[i]
        frames = fn(frames, float(factor))
    return frames.clamp(0, 1)


def color_jitter(frames: Tensor, rng: np.random.Generator, params: AugmentParams) -> Tensor:
    """Jitter frames (T, 3, H, W) in [0, 1]: per frame with `per_frame_jitter_prob`, else jointly."""
    if rng.random() < params.per_frame_jitter_prob:
        return torch.stack([_jitter_one(frame, rng, params) for frame in frames])
    return _jitter_one(frames, rng, params)


# ----------------------------------------------------------------------------------- whole samples


def augment_flow_sample(frames: Tensor, flow: Tensor, valid: Tensor, rng: np.random.Generator,
                        params: AugmentParams) -> tuple[Tensor, Tensor, Tensor]:
    """Crop, flip and jitter a flow sample: frames (2, 3, H, W), flow (2, H, W), valid (H, W)."""
    win = random_window(frames.shape[-2], frames.shape[-1], params.crop, rng)
    rows, cols = slice(win.y0, win.y0 + win.h), slice(win.x0, win.x0 + win.w)
    frames, flow, valid = frames[..., rows, cols], flow[:, rows, cols], valid[rows, cols]
    if rng.random() < params.hflip_prob:
        frames, flow, valid = flip_flow_sample(frames, flow, valid, horizontal=True)
    if rng.random() < params.vflip_prob:
        frames, flow, valid = flip_flow_sample(frames, flow, valid, horizontal=False)
    return color_jitter(frames, rng, params), flow, valid


def augment_track_sample(frames: Tensor, coords: Tensor, valid: Tensor, rng: np.random.Generator,
                         params: AugmentParams) -> tuple[Tensor, Tensor, Tensor]:
    """Crop, flip and jitter a track sample: frames (S, 3, H, W), coords (S, P, 2), valid (S, P).

    Frame 0 holds the queries: a point outside the crop there has nothing to track and loses its
    label in every frame; elsewhere a label outside the crop is dropped for that frame only.
    """
    win = random_window(frames.shape[-2], frames.shape[-1], params.crop, rng)
    frames = frames[..., win.y0:win.y0 + win.h, win.x0:win.x0 + win.w]
    coords = coords - coords.new_tensor([win.x0, win.y0])
    inside = ((coords[..., 0] >= 0) & (coords[..., 0] <= win.w - 1)
              & (coords[..., 1] >= 0) & (coords[..., 1] <= win.h - 1))
    valid = valid.bool() & inside & (valid[:1].bool() & inside[:1])
    if rng.random() < params.hflip_prob:
        frames, coords = flip_track_sample(frames, coords, horizontal=True)
    if rng.random() < params.vflip_prob:
        frames, coords = flip_track_sample(frames, coords, horizontal=False)
    return color_jitter(frames, rng, params), coords, valid


# ------------------------------------------------------------------------------- label datasets


CACHED_CLIPS = 16


class _LabelSamples(Dataset):
    """Shared part: the labels group, the frames array and a small per-clip frame cache."""

    def __init__(self, labels: zarr.Group, frames: zarr.Array, augment: AugmentParams | None) -> None:
        self.labels, self.frames, self.augment = labels, frames, augment
        self._cache: dict[int, np.ndarray] = {}

    def clip_frames(self, clip: int, frame_index: np.ndarray) -> Tensor:
        """Frames of one clip (len(frame_index), 3, H, W) float in [0, 1]."""
        clip = int(clip)
        if clip not in self._cache:
            # frames are chunked one clip per chunk: read a clip once, serve its frames many times
            if len(self._cache) >= CACHED_CLIPS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[clip] = np.asarray(self.frames[clip])
        return image_to_tensor(self._cache[clip][frame_index])


class LabelFlowPairs(_LabelSamples):
    """Frame pairs with flow labels: items img0, img1 (3, h, w), flow (2, h, w), valid (h, w)."""

    def __init__(self, labels: zarr.Group, frames: zarr.Array, augment: AugmentParams | None) -> None:
        super().__init__(labels, frames, augment)
        self.pairs = np.asarray(labels["flow/pairs"][:])  # (M, 3): clip, t0, t1

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, index: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Flow (2, H, W) and valid (H, W) of pair `index`."""
        return (torch.from_numpy(np.asarray(self.labels["flow/flow"][index], np.float32)),
                torch.from_numpy(np.asarray(self.labels["flow/valid"][index], bool)))

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = item
        clip, t0, t1 = self.pairs[index]
        frames = self.clip_frames(clip, np.array([t0, t1]))
        flow, valid = self.label(index, tuple(frames.shape[-2:]))
        if self.augment is not None:
            frames, flow, valid = augment_flow_sample(frames, flow, valid, np.random.default_rng(seed),
                                                      self.augment)
        return {"img0": frames[0], "img1": frames[1], "flow": flow, "valid": valid}


class FramePairs(LabelFlowPairs):
    """The labelled pairs' frames without their labels (flow 0, nothing valid): what the
    self-supervised photometric baseline trains on, so that it sees the same pairs as the
    pseudo-label method and only the loss differs."""

    def label(self, index: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return torch.zeros(2, *size), torch.zeros(size, dtype=torch.bool)


class LabelTrackSamples(_LabelSamples):
    """S-frame windows with track labels: items video (S, 3, h, w), tracks (S, P, 2), valid (S, P)."""

    def __init__(self, labels: zarr.Group, frames: zarr.Array, augment: AugmentParams | None) -> None:
        super().__init__(labels, frames, augment)
        self.clips = np.asarray(labels["tracks/clip"][:])
        self.starts = np.asarray(labels["tracks/start"][:])
        self.window = int(labels["tracks/coords"].shape[1])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = item
        start = int(self.starts[index])
        video = self.clip_frames(self.clips[index], np.arange(start, start + self.window))
        coords = torch.from_numpy(np.asarray(self.labels["tracks/coords"][index], np.float32))
        valid = torch.from_numpy(np.asarray(self.labels["tracks/valid"][index], bool))
        if self.augment is not None:
            video, coords, valid = augment_track_sample(video, coords, valid, np.random.default_rng(seed),
                                                        self.augment)
        return {"video": video, "tracks": coords, "valid": valid}
