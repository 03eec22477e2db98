"""The pre-training dataset: augmented clips and their MAM2 targets, read from `clips.zarr` + `targets.zarr`.

No video is decoded here: frames come from the clips store and the targets (VQGAN codes of every frame,
codes of the horizontally flipped frames, exact RGB differences) from the targets store, one chunk per
clip each. Every sample draws its augmentation and its mask from its own seed (the training loop hands
`(index, sample_seed)`), so samples are identical whatever the worker or process layout.

Why the crops are not VideoMAE's multi-scale crops: a code describes one f x f cell of the frame the
tokenizer saw. Resizing a crop to the input size maps cells onto fractions of cells (or several cells
onto one), and no stored code describes the resampled cell, so any scale other than 1 would make the
appearance target wrong. Crops are therefore taken at the input size directly from the stored frames,
at offsets that are multiples of f: every f x f cell of the crop is a whole stored cell and its code is
the stored code, exactly. Scale jitter is restricted to the one scale that keeps codes exact (1); the
augmentation left is translation on the f-grid (`store_size - input_size` gives the range), horizontal
flips and the temporal window. A flipped crop takes its codes from `codes_flipped` (the tokenizer's codes
of the flipped frames; codes of a mirrored cell are not the mirrored codes), and its frames and RGB
differences are mirrored (the difference of mirrored frames is the mirrored difference, exactly).
Cropping keeps the code each cell got in the context of the whole stored frame (the tokenizer's receptive
field is wider than one cell), which is the best code the store has for it.

The RGB differences need no store at all: `targets.zarr/rgb_diff` is `frame[t+1] - frame[t]` exactly, so
the differences of a sample's own (cropped, mirrored) frames are the stored ones under that crop, bit for
bit. They are read from the store only when `Sampling.rgb_diff` asks (tests compare the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from models.masking import MASK_KINDS, make_mask
from models.video_vit import grid_size
from pipeline.core.errors import StageError, require
from pipeline.core.stores import open_clips, train_rows
from pipeline.data.batch_reads import read_together, share_cores_in_worker
from pipeline.data.clip_cache import ClipCache

TARGET_ARRAYS = ("codes", "codes_flipped", "rgb_diff")
REQUIRED_ARRAYS = ("codes", "codes_flipped")  # rgb_diff can always be recomputed from the frames


@dataclass(frozen=True)
class Sampling:
    """How a training sample is cut from a stored clip and masked."""

    num_frames: int = 16
    input_size: int = 112
    patch_size: int = 16
    tubelet_size: int = 2
    flip: bool = True
    mask_kind: str = "tube"
    mask_ratio: float = 0.9
    codes: bool = True  # read the appearance targets
    rgb_diff: bool = False  # read the stored RGB differences (they equal the differences of `frames`)


class Crop(NamedTuple):
    """A crop of a stored clip: first frame, top-left corner (pixels), and whether it is mirrored."""

    t0: int
    y0: int
    x0: int
    flipped: bool


class TargetsInfo(NamedTuple):
    """What the targets store says about its codes."""

    downsample: int
    codebook_size: int


def open_targets(path: Path | str, frames_shape: tuple[int, ...]) -> zarr.Group:
    """Open a targets store and check it matches the clips store's (N, T, S, S, 3) frames."""
    path = Path(path)
    require(path, "targets store", "targets")
    group = zarr.open_group(str(path), mode="r")
    missing = [name for name in REQUIRED_ARRAYS if name not in group]
    missing += [f"attrs.{key}" for key in ("downsample", "codebook_size") if key not in group.attrs]
    if missing:
        raise StageError(f"{path}: not a targets store (missing {', '.join(missing)})")
    n, t, s = frames_shape[:3]
    f = int(group.attrs["downsample"])
    want = {"codes": (n, t, s // f, s // f), "codes_flipped": (n, t, s // f, s // f),
            "rgb_diff": (n, t - 1, s, s, 3)}
    for name, shape in want.items():
        if name in group and (tuple(group[name].shape) != shape or s % f):
            raise StageError(f"{path}/{name}: shape {tuple(group[name].shape)} does not match the clips "
                             f"store's frames {tuple(frames_shape)} at down-sampling {f} (expected {shape}); "
                             "rerun `mam2 targets` on this clips store")
    return group


def check_sampling(sampling: Sampling, frames_shape: tuple[int, ...], align: int) -> None:
    """Fail early, naming the param, when a sample cannot be cut from the stored clips."""
    _, t, s = frames_shape[:3]
    problems = []
    if sampling.num_frames > t:
        problems.append(f"num_frames={sampling.num_frames} exceeds the stored {t} frames per clip")
    if sampling.input_size > s:
        problems.append(f"input_size={sampling.input_size} exceeds the stored frame size {s}")
    if sampling.input_size % align:
        problems.append(f"input_size={sampling.input_size} must be a multiple of the tokenizer's "
                        f"down-sampling {align} so crops keep whole code cells")
    if sampling.codes and sampling.patch_size % align:
        problems.append(f"patch_size={sampling.patch_size} must be a multiple of the tokenizer's "
                        f"down-sampling {align}")
    if sampling.mask_kind not in MASK_KINDS:
        problems.append(f"mask kind {sampling.mask_kind!r} is not one of {MASK_KINDS}")
    try:
        grid_size(sampling.num_frames, sampling.input_size, sampling.input_size,
                  sampling.tubelet_size, sampling.patch_size)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise StageError("cannot sample pre-training clips: " + "; ".join(problems))


def draw_crop(rng: np.random.Generator, stored_frames: int, stored_size: int, sampling: Sampling,
              align: int) -> Crop:
    """A temporal window and an `align`-grid-aligned spatial crop at the input size, maybe mirrored."""
    t0 = int(rng.integers(stored_frames - sampling.num_frames + 1))
    cells = (stored_size - sampling.input_size) // align + 1  # aligned corner positions per axis
    y0, x0 = (int(v) * align for v in rng.integers(cells, size=2))
    flipped = bool(sampling.flip and rng.random() < 0.5)
    return Crop(t0, y0, x0, flipped)


def pixel_selection(row: int, crop: Crop, frames: int, size: int) -> tuple:
    """The (frames, size, size, C) window of row `row` of a (N, T, S, S, C) array under `crop`."""
    return (row, slice(crop.t0, crop.t0 + frames), slice(crop.y0, crop.y0 + size),
            slice(crop.x0, crop.x0 + size))


def mirrored(pixels: np.ndarray, crop: Crop) -> np.ndarray:
    """A window read at `pixel_selection`, mirrored (contiguous) when the crop is flipped."""
    return np.ascontiguousarray(pixels[:, :, ::-1]) if crop.flipped else np.asarray(pixels)


def crop_pixels(array: zarr.Array | np.ndarray, row: int, crop: Crop, frames: int, size: int) -> np.ndarray:
    """(frames, size, size, C) window of a (N, T, S, S, C) array at `crop`, mirrored when it is flipped."""
    return mirrored(array[pixel_selection(row, crop, frames, size)], crop)


def code_selection(row: int, crop: Crop, frames: int, size: int, stored_size: int, f: int) -> tuple:
    """The (frames, size/f, size/f) window of the codes under `crop`, in `codes_flipped` when the crop is
    flipped: a mirrored crop of columns [x0, x0+size) is columns [S-x0-size, S-x0) of the mirrored frame."""
    x0 = stored_size - crop.x0 - size if crop.flipped else crop.x0
    y0, x0, k = crop.y0 // f, x0 // f, size // f
    return row, slice(crop.t0, crop.t0 + frames), slice(y0, y0 + k), slice(x0, x0 + k)


class Draw(NamedTuple):
    """What a sample's seed decides: its store row, crop and mask."""

    row: int
    crop: Crop
    mask: torch.Tensor


class PretrainDataset(Dataset):
    """Samples `{"frames", "mask", ["codes"], ["rgb_diff"], "row", "flipped"}` of the train clips.

    With I the input size: `frames` (T, I, I, 3) uint8 and `rgb_diff` (T-1, I, I, 3) int16 stay in the
    on-disk layout (four times less to move between processes than floats); the loss converts them with
    `pipeline.core.tensors`. The stored differences are read only when asked: they are exactly
    `frames[t+1] - frames[t]` of the sample's own frames, which the loss can compute on the device for
    free instead of reading and moving twice the frames' bytes. `codes` (T, I/f, I/f) int16; `mask`
    (N_tokens,) bool, True = masked. Stores open lazily in each worker process (open Zarr handles are
    not shared across processes). A sample is drawn (crop and mask, from its seed), read, then assembled;
    the DataLoader's one call per batch (`__getitems__`) gives Zarr all the batch's reads at once
    (`pipeline.data.batch_reads`), and returns what `__getitem__` returns sample by sample.
    """

    def __init__(self, clips: Path | str, targets: Path | str | None, sampling: Sampling,
                 cache_mb: float = 0.0) -> None:
        self.clips_path, self.sampling = Path(clips), sampling
        self.cache = ClipCache(int(cache_mb * 2**20))  # decoded clips, per process (clip_cache.py)
        self.targets_path = Path(targets) if targets is not None else None
        store = open_clips(self.clips_path)
        self.frames_shape = tuple(store["frames"].shape)
        self.rows = train_rows(store)
        if not len(self.rows):
            raise StageError(f"{self.clips_path}: no train-split clips to pre-train on")
        need_targets = sampling.codes or sampling.rgb_diff
        self.info: TargetsInfo | None = None
        if self.targets_path is not None and (need_targets or self.targets_path.exists()):
            group = open_targets(self.targets_path, self.frames_shape)
            self.info = TargetsInfo(int(group.attrs["downsample"]), int(group.attrs["codebook_size"]))
            if sampling.rgb_diff and "rgb_diff" not in group:
                raise StageError(f"{self.targets_path}: no rgb_diff array to read (recompute the "
                                 "differences from the frames instead)")
        elif need_targets:
            raise StageError("the objective needs a targets store, and none was given")
        # Without codes any offset would do; keep the tokenizer's grid (or the patch grid) so that
        # every objective sees the same crops and comparisons stay fair.
        self.align = self.info.downsample if self.info else sampling.patch_size
        check_sampling(sampling, self.frames_shape, self.align)
        self.grid = grid_size(sampling.num_frames, sampling.input_size, sampling.input_size,
                              sampling.tubelet_size, sampling.patch_size)
        self._arrays: dict[str, zarr.Array] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> dict[str, zarr.Array]:
        """The Zarr arrays this process reads, opened on first use."""
        if self._arrays is None:
            share_cores_in_worker()
            arrays = {"frames": open_clips(self.clips_path)["frames"]}
            if self.info is not None:
                group = zarr.open_group(str(self.targets_path), mode="r")
                arrays.update({name: group[name] for name in TARGET_ARRAYS if name in group})
            self._arrays = arrays
        return self._arrays

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        return self.sample(int(self.rows[index]), seed)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """The samples of a whole batch (the DataLoader's one call per batch), equal to `__getitem__`'s:
        every read of the batch goes to Zarr at once (`read_together`)."""
        draws = [self.draw(int(self.rows[index]), seed) for index, seed in keys]
        reads = [self.reads(d) for d in draws]
        values = iter(self.read([read for r in reads for read in r.values()]))
        return [self.assemble(d, {name: next(values) for name in r})
                for d, r in zip(draws, reads, strict=True)]

    def read(self, reads: list[tuple[str, tuple]]) -> list[np.ndarray]:
        """The values of `reads` ((array name, selection) pairs), all of Zarr's at once; with the clip
        cache on, frame windows are cut from whole decoded clips (the same bytes)."""
        if not self.cache.budget:
            return read_together(self.arrays(), reads)
        def whole_clips(rows: list[int]) -> list[np.ndarray]:
            return read_together(self.arrays(), [("frames", (row,)) for row in rows])

        clips = self.cache.fetch((selection[0] for name, selection in reads if name == "frames"), whole_clips)
        others = iter(read_together(self.arrays(), [read for read in reads if read[0] != "frames"]))
        return [clips[selection[0]][selection[1:]] if name == "frames" else next(others)
                for name, selection in reads]

    def sample(self, row: int, seed: int) -> dict[str, Any]:
        """The sample of store row `row` augmented and masked as seed `seed` says."""
        draw = self.draw(row, seed)
        reads = self.reads(draw)
        return self.assemble(draw, dict(zip(reads, self.read(list(reads.values())), strict=True)))

    def draw(self, row: int, seed: int) -> Draw:
        """The crop and mask seed `seed` gives row `row`."""
        s = self.sampling
        rng = np.random.default_rng(seed)
        _, stored_frames, stored_size = self.frames_shape[:3]
        crop = draw_crop(rng, stored_frames, stored_size, s, self.align)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return Draw(row, crop, make_mask(s.mask_kind, 1, self.grid, s.mask_ratio, generator)[0])

    def reads(self, draw: Draw) -> dict[str, tuple[str, tuple]]:
        """What a sample reads: {field: (array name, selection)}."""
        s, (row, crop, _) = self.sampling, draw
        out = {"frames": ("frames", pixel_selection(row, crop, s.num_frames, s.input_size))}
        if s.rgb_diff:
            out["rgb_diff"] = ("rgb_diff", pixel_selection(row, crop, s.num_frames - 1, s.input_size))
        if s.codes:
            window = code_selection(row, crop, s.num_frames, s.input_size, self.frames_shape[2], self.align)
            out["codes"] = ("codes_flipped" if crop.flipped else "codes", window)
        return out

    def assemble(self, draw: Draw, values: dict[str, np.ndarray]) -> dict[str, Any]:
        """The sample from its draw and what was read for it (mirrored where the crop is flipped)."""
        out: dict[str, Any] = {"frames": torch.from_numpy(mirrored(values["frames"], draw.crop)),
                               "mask": draw.mask, "row": draw.row, "flipped": draw.crop.flipped}
        if "rgb_diff" in values:
            out["rgb_diff"] = torch.from_numpy(mirrored(values["rgb_diff"], draw.crop))
        if "codes" in values:
            out["codes"] = torch.from_numpy(np.asarray(values["codes"]))
        return out
