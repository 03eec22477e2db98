"""Single frames of `clips.zarr` for image models (the VQGAN tokenizer), and its held-out frames.

`FramesDataset` serves random frames of chosen clips as VQGAN inputs: (3, S, S) floats in [-1, 1], a
random S x S crop, mirrored half of the time; all randomness comes from the sample seed the shared
training loop hands out. `split_rows` picks training and held-out clips, `held_out_frames` a fixed,
evenly spread set of held-out frames for evaluation. `to_vqgan` / `from_vqgan` map uint8 images to the
VQGAN's [-1, 1] range and back (through pipeline.core.tensors, the one layout conversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from pipeline.core.stores import SPLITS
from pipeline.core.tensors import image_to_tensor, tensor_to_image


def to_vqgan(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1], the VQGAN's input range."""
    return image_to_tensor(images).mul_(2.0).sub_(1.0)


def from_vqgan(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [-1, 1] -> (..., H, W, 3) uint8 (rounded, clipped)."""
    return tensor_to_image(images.detach().float().add(1.0).div_(2.0))


def split_rows(store: zarr.Group, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a clips store.

    Training rows are the train split (unlabelled clips are stored as train). Held out are the val
    split; a store without val clips holds out every round(1 / val_fraction)-th *video* instead (by
    its `video` index), so no video has clips on both sides.
    """
    n = store["frames"].shape[0]
    split = store["split"][:] if "split" in store else np.zeros(n, np.int8)
    train = np.flatnonzero(split == SPLITS.index("train"))
    val = np.flatnonzero(split == SPLITS.index("val"))
    if len(val) or not len(train) or val_fraction <= 0:
        return train, val
    videos = store["video"][:][train] if "video" in store else train
    ids = np.unique(videos)
    step = max(2, round(1 / val_fraction)) if len(ids) > 1 else 0
    held = np.isin(videos, ids[step - 1::step]) if step else np.zeros(len(train), bool)
    return train[~held], train[held]


def centre_crop_size(size: int, multiple: int) -> int:
    """The largest multiple of `multiple` that fits in `size` (the VQGAN needs whole code cells)."""
    return size - size % multiple


def held_out_frames(frames: zarr.Array, rows: Sequence[int], count: int, size: int) -> np.ndarray:
    """`count` frames evenly spread over the (row, t) pairs of `rows`, centre-cropped to size x size.

    Returns (n, size, size, 3) uint8 with n = min(count, len(rows) * T); each clip is read once.
    """
    rows = np.asarray(rows, dtype=int)
    num_frames, height, width = frames.shape[1:4]
    total = len(rows) * num_frames
    if total == 0 or count <= 0:
        return np.zeros((0, size, size, 3), np.uint8)
    picks = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
    y0, x0 = (height - size) // 2, (width - size) // 2
    out = []
    for position in np.unique(picks // num_frames):
        times = picks[picks // num_frames == position] % num_frames
        clip = frames[int(rows[position])]
        out.append(clip[times, y0:y0 + size, x0:x0 + size])
    return np.concatenate(out)


class FramesDataset(Dataset):
    """Random frames of chosen clips: item `(index, seed)` -> (3, crop, crop) float in [-1, 1].

    `index` enumerates (clip, frame) pairs of `rows`; the crop position and the mirror flip come from
    `np.random.default_rng(seed)`, so a sample is the same whichever process or run draws it. The
    store is opened lazily, so the dataset pickles into spawned loader workers.
    """

    def __init__(self, clips: Path | str, rows: Sequence[int], *, crop_size: int | None = None,
                 flip: bool = True) -> None:
        self.clips = Path(clips)
        self.rows = np.asarray(rows, dtype=int)
        self.flip = flip
        shape = zarr.open_array(str(self.clips / "frames"), mode="r").shape
        self.num_frames, height, width = shape[1:4]
        self.crop_size = crop_size or min(height, width)
        if self.crop_size > min(height, width):
            raise ValueError(f"crop_size={self.crop_size} exceeds the stored {height}x{width} frames")
        self._frames: zarr.Array | None = None

    def __len__(self) -> int:
        return len(self.rows) * self.num_frames

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        if self._frames is None:
            self._frames = zarr.open_array(str(self.clips / "frames"), mode="r")
        clip, t = divmod(int(index), self.num_frames)
        frame = self._frames[int(self.rows[clip]), t]  # (H, W, 3) uint8
        rng = np.random.default_rng(seed)
        s = self.crop_size
        y0 = int(rng.integers(frame.shape[0] - s + 1))
        x0 = int(rng.integers(frame.shape[1] - s + 1))
        frame = frame[y0:y0 + s, x0:x0 + s]
        if self.flip and rng.random() < 0.5:
            frame = frame[:, ::-1]
        return to_vqgan(np.ascontiguousarray(frame))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_frames": None}  # open arrays stay in their process
