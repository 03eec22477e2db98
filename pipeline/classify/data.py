"""Datasets over `clips.zarr` for action classification: seeded training clips and evaluation views.

Only labelled clips (label >= 0) of the requested split are used, so unlabelled videos in the store
(the demo's real sample videos) never reach a classifier. A clip is ``num_frames`` stored frames taken
every ``frame_step`` frames:

- training (`TrainClips`): a random temporal window, a random resized crop (area fraction ``scale``,
  aspect ``ratio``) resized to ``crop_size``, an optional horizontal flip, optional RandAugment
  (one op sequence for all frames of a clip) and optional random erasing (`random_erase`: VideoMAE's
  ``--reprob``, one box per clip at the same place in every frame, filled with per-pixel noise that is
  standard normal after the model's input normalisation). All randomness comes from the sample seed
  the shared training loop hands to ``__getitem__((index, seed))``.
- evaluation (`EvalViews`): VideoMAE's ``num_clips`` x ``num_crops`` testing. Each stored clip of a
  video gives ``num_clips`` temporal windows spread evenly over it (the centre one for 1); its frames
  are resized so the short side is ``short_side`` (VideoMAE's test pipeline: the crop size itself;
  None keeps the stored scale), and
  cut into ``num_crops`` spatial crops of ``crop_size`` spread along the width (left, centre, right
  for 3). Items carry the clip's ``video`` id so scores can be averaged per video (a
  video decoded into several stored clips gets all their views). `ViewPlan` is that recipe on its own;
  `ClipViews` applies it to clips held in memory (a video file decoded as the decode stage stores it),
  so a file is classified exactly as the evaluation split is.

Flip is off by default: on direction-defined classes (translate left/right, rotate cw/ccw, SSv2's
"left to right") a mirrored clip belongs to another class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from einops import rearrange
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pipeline.core.errors import StageError
from pipeline.core.stores import SPLITS, open_clips
from pipeline.core.tensors import clip_to_tensor


@dataclass(frozen=True)
class ClipSpec:
    """How a model clip is cut from a stored clip."""

    num_frames: int
    frame_step: int
    crop_size: int

    @property
    def span(self) -> int:
        """Stored frames one clip covers."""
        return (self.num_frames - 1) * self.frame_step + 1


@dataclass(frozen=True)
class StoreInfo:
    """What a classifier needs to know about a clips store."""

    path: Path
    class_names: list[str]
    num_frames: int
    size: int


def store_info(path: Path | str, spec: ClipSpec | None = None) -> StoreInfo:
    """Read class names and the frame shape; check the clip spec fits the stored clips."""
    group = open_clips(path)
    names = list(group.attrs.get("class_names") or [])
    if not names:
        raise StageError(f"{path}: no class_names in the store's attrs; classification needs labelled videos")
    _, t, h, w, _ = group["frames"].shape
    info = StoreInfo(Path(path), names, int(t), int(min(h, w)))
    if spec is not None and (spec.span > info.num_frames or spec.crop_size > info.size):
        raise StageError(f"{path}: clips of {spec.num_frames} frames every {spec.frame_step} at "
                         f"{spec.crop_size}px need {spec.span} stored frames of at least {spec.crop_size}px; "
                         f"the store has {info.num_frames} frames of {h}x{w}")
    return info


def labelled_rows(path: Path | str, split: str) -> np.ndarray:
    """Store rows of labelled clips in `split` ("train", "val" or "test")."""
    group = open_clips(path)
    code = SPLITS.index(split)
    rows = np.flatnonzero((group["split"][:] == code) & (group["label"][:] >= 0))
    if len(rows) == 0:
        raise StageError(f"{path}: no labelled clips in split {split!r}")
    return rows


class _StoreClips(Dataset):
    """Lazy access to the rows of a store (opened in each DataLoader worker, not pickled open)."""

    def __init__(self, path: Path | str, split: str, spec: ClipSpec) -> None:
        self.path, self.spec = Path(path), spec
        self.info = store_info(path, spec)
        self.rows = labelled_rows(path, split)
        group = open_clips(path)
        self.labels = group["label"][:][self.rows].astype(np.int64)
        self.videos = group["video"][:][self.rows].astype(np.int64)
        self._frames = None

    def read(self, position: int, first_frame: int) -> torch.Tensor:
        """Clip (C, T, H, W) float in [0, 1] of the `position`-th selected row from `first_frame`."""
        if self._frames is None:
            self._frames = open_clips(self.path)["frames"]
        stop = first_frame + self.spec.span
        frames = self._frames[int(self.rows[position]), first_frame:stop:self.spec.frame_step]
        return clip_to_tensor(np.asarray(frames))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_frames": None}


class TrainClips(_StoreClips):
    """Augmented training clips; ``__getitem__((index, seed))`` -> {"clip", "label", "seed"}.

    ``random_erasing`` is the probability of erasing one box of a clip (`random_erase`); ``norm`` is the
    (mean, std) per channel the model normalises its input with, so the erased pixels are standard normal
    after it, as VideoMAE erases after normalising. Clips are in [0, 1] except in an erased box.
    """

    def __init__(self, path: Path | str, split: str, spec: ClipSpec, *,
                 scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False,
                 rand_augment: tuple[int, int] | None = None, random_erasing: float = 0.0,
                 norm: tuple[Sequence[float], Sequence[float]] = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))) -> None:
        super().__init__(path, split, spec)
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing is a probability, got {random_erasing}")
        self.scale, self.ratio, self.flip = scale, ratio, flip
        self.rand_augment = (v2.RandAugment(num_ops=rand_augment[0], magnitude=rand_augment[1])
                             if rand_augment else None)
        self.random_erasing, self.norm = random_erasing, (tuple(norm[0]), tuple(norm[1]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, seed = key
        rng = np.random.default_rng(seed)
        clip = self.read(index, int(rng.integers(0, self.info.num_frames - self.spec.span + 1)))
        top, left, h, w = random_resized_box(clip.shape[-2:], self.scale, self.ratio, rng)
        clip = TF.resized_crop(clip, top, left, h, w, [self.spec.crop_size] * 2, antialias=True)
        if self.flip and rng.random() < 0.5:
            clip = clip.flip(-1)
        if self.rand_augment is not None:
            clip = self._augment(clip, int(rng.integers(2**31)))
        if self.random_erasing > 0:
            clip = random_erase(clip, self.random_erasing, rng, mean=self.norm[0], std=self.norm[1])
        return {"clip": clip.contiguous(), "label": int(self.labels[index]), "seed": int(seed)}

    def _augment(self, clip: torch.Tensor, seed: int) -> torch.Tensor:
        """RandAugment with the same ops on every frame, drawn from the sample's seed."""
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(seed)
            frames = self.rand_augment(rearrange(clip, "c t h w -> t c h w"))
        return rearrange(frames, "t c h w -> c t h w").clamp(0, 1)


def random_erase(clip: torch.Tensor, probability: float, rng: np.random.Generator, *,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 area: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3,
                 attempts: int = 100) -> torch.Tensor:
    """Random erasing of a clip (C, T, H, W) as VideoMAE applies it (``--reprob``, mode "pixel", count 1,
    its "cube" variant): with `probability`, one box is chosen for the whole clip and replaced in every
    frame by fresh per-pixel noise. The box covers an area fraction drawn from `area` with aspect (h/w)
    log-uniform in [min_aspect, 1/min_aspect], and must be smaller than the frame on both sides; when
    `attempts` draws do not fit, the clip is left as it is. The noise is ``mean + std * N(0, 1)`` per
    channel, so it is standard normal after the model normalises its input with (mean, std), as in
    VideoMAE, which erases normalised clips. Returns a new tensor; the input is not changed."""
    if probability <= 0 or rng.random() >= probability:
        return clip
    channels, frames, height, width = clip.shape
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    for _ in range(attempts):
        target = rng.uniform(*area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            noise = torch.from_numpy(rng.standard_normal((channels, frames, h, w), dtype=np.float32))
            centre = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
            scale = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
            out = clip.clone()
            out[:, :, top:top + h, left:left + w] = (centre + scale * noise).to(clip.dtype)
            return out
    return clip


def random_resized_box(size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box covering an area fraction in `scale` with aspect ratio
    (w/h) in `ratio` (log-uniform); the whole frame when ten draws do not fit."""
    height, width = int(size[0]), int(size[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


@dataclass(frozen=True)
class ViewPlan:
    """How evaluation cuts views from a stored clip: ``num_clips`` temporal windows x ``num_crops``
    spatial crops, after resizing the short side to ``short_side`` (None: the stored scale)."""

    spec: ClipSpec
    num_clips: int = 1
    num_crops: int = 3
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_crops < 1:
            raise ValueError(f"num_clips and num_crops must be >= 1, got {self.num_clips} and "
                             f"{self.num_crops}")
        if self.short_side is not None and self.short_side < self.spec.crop_size:
            raise ValueError(f"short_side {self.short_side} is smaller than the crop size "
                             f"{self.spec.crop_size}")

    @property
    def per_clip(self) -> int:
        """Views of one stored clip."""
        return self.num_clips * self.num_crops

    def locate(self, index: int) -> tuple[int, int, int]:
        """(stored clip position, window, crop) of view `index`; a clip's views are consecutive, crops
        fastest."""
        position, rest = divmod(int(index), self.per_clip)
        return (position, *divmod(rest, self.num_crops))

    def first_frame(self, stored_frames: int, window: int) -> int:
        """First stored frame of temporal window `window` of a clip of `stored_frames` frames."""
        return window_start(stored_frames, self.spec.span, window, self.num_clips)

    def crop(self, clip: torch.Tensor, crop: int) -> torch.Tensor:
        """Spatial view `crop` of a window (C, T, H, W): resized to the short side, then cut."""
        if self.short_side is not None and min(clip.shape[-2:]) != self.short_side:
            clip = TF.resize(clip, self.short_side, antialias=True)  # (C, T, H, W): the last two resize
        top, left = crop_origin(clip.shape[-2:], self.spec.crop_size, crop, self.num_crops)
        size = self.spec.crop_size
        return clip[..., top:top + size, left:left + size].contiguous()

    def view(self, frames: np.ndarray, window: int, crop: int) -> torch.Tensor:
        """View (window, crop) of a whole stored clip `frames` (T, H, W, 3) uint8, as (C, T', h, w)."""
        start = self.first_frame(len(frames), window)
        window_frames = np.asarray(frames[start:start + self.spec.span:self.spec.frame_step])
        return self.crop(clip_to_tensor(window_frames), crop)


class EvalViews(_StoreClips):
    """Every (stored clip, temporal window, spatial crop) view of a split; ``__getitem__(i)`` -> {"clip",
    "label", "video", "window", "crop"}. Views of one stored clip are consecutive, crops fastest.
    ``video_names`` is the store's `videos` table (the source file of each video id)."""

    def __init__(self, path: Path | str, split: str, spec: ClipSpec, *, num_clips: int = 1,
                 num_crops: int = 3, short_side: int | None = None) -> None:
        super().__init__(path, split, spec)
        self.plan = ViewPlan(spec, num_clips, num_crops, short_side)
        self.num_clips, self.num_crops, self.short_side = num_clips, num_crops, short_side
        self.video_names = video_names(path)

    def __len__(self) -> int:
        return len(self.rows) * self.plan.per_clip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        position, window, crop = self.plan.locate(index)
        clip = self.plan.crop(self.read(position, self.plan.first_frame(self.info.num_frames, window)), crop)
        return {"clip": clip, "label": int(self.labels[position]),
                "video": int(self.videos[position]), "window": window, "crop": crop}


class ClipViews(Dataset):
    """`EvalViews` over clips in memory: every view of ``clips[i]`` ((T, H, W, 3) uint8, e.g. decoded
    from a file as the decode stage stores them) with video id ``videos[i]`` and label -1."""

    def __init__(self, clips: Sequence[np.ndarray], videos: Sequence[int], plan: ViewPlan) -> None:
        if len(clips) != len(videos):
            raise ValueError(f"{len(clips)} clips but {len(videos)} video ids")
        short = [c.shape for c in clips if len(c) < plan.spec.span or min(c.shape[1:3]) < plan.spec.crop_size]
        if short:
            raise ValueError(f"clips of {short[0]} are too small for views of {plan.spec.span} frames at "
                             f"{plan.spec.crop_size}px")
        self.clips, self.videos, self.plan = list(clips), [int(v) for v in videos], plan

    def __len__(self) -> int:
        return len(self.clips) * self.plan.per_clip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        position, window, crop = self.plan.locate(index)
        return {"clip": self.plan.view(self.clips[position], window, crop), "label": -1,
                "video": self.videos[position], "window": window, "crop": crop}


def video_names(path: Path | str) -> list[str] | None:
    """The source file of each video id of a clips store (its `videos` table), None if it has none."""
    group = open_clips(path)
    return [str(name) for name in group["videos"][:]] if "videos" in group else None


def window_start(stored_frames: int, span: int, window: int, num_clips: int) -> int:
    """First stored frame of temporal view `window` of `num_clips`: centred for 1, else evenly spread
    from the first possible start to the last."""
    slack = stored_frames - span
    if num_clips == 1:
        return slack // 2
    return round(window * slack / (num_clips - 1))


def crop_origin(size: tuple[int, int], crop_size: int, crop: int, num_crops: int) -> tuple[int, int]:
    """Top-left of spatial view `crop` of `num_crops`: centred vertically, evenly spread along the width."""
    height, width = int(size[0]), int(size[1])
    top = (height - crop_size) // 2
    if num_crops == 1:
        return top, (width - crop_size) // 2
    return top, round(crop * (width - crop_size) / (num_crops - 1))
