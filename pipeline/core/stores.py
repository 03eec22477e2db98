"""Zarr v3 layouts shared by the stages (docs/design.md section 5).

`clips.zarr` holds decoded clips: `frames` (N, T, H, W, 3) uint8 with one chunk per clip,
Blosc-zstd compressed, and per-clip `label`, `video`, `start`, `split`; the `videos` table maps
`video` to source paths; attrs keep fps, frame stride, class and split names and the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.core.errors import require

SPLITS = ("train", "val", "test")


def compressor() -> BloscCodec:
    """Blosc-zstd at a level that keeps decompression well ahead of training."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def difference_compressor() -> BloscCodec:
    """Blosc-zstd level 1 with bit-shuffle, for signed differences stored wide (the targets store's
    int16 RGB differences, within [-255, 255]): their high bytes are nearly all 0x00 or 0xFF, which
    bit-shuffle groups. On the demo's differences it compresses about 6 times faster than
    `compressor()`, decompresses faster and stores about 15% less (bench/targets_codecs.py); lossless,
    and Zarr records the codec per array, so stores written with either setting read the same."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


def create_clips_store(path: Path, *, num_clips: int, num_frames: int, size: int,
                       labels: np.ndarray, videos: np.ndarray, starts: np.ndarray,
                       splits: np.ndarray, video_paths: list[str], attrs: dict[str, Any]) -> zarr.Group:
    """Create a clips store with all per-clip metadata written and `frames` still to be filled."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("frames", shape=(num_clips, num_frames, size, size, 3),
                       chunks=(1, num_frames, size, size, 3), dtype="uint8",
                       compressors=compressor(), fill_value=0)
    write_clip_table(group, labels=labels, videos=videos, starts=starts, splits=splits)
    table = group.create_array("videos", shape=(len(video_paths),), dtype=str,
                               chunks=(max(1, len(video_paths)),))
    if video_paths:
        table[:] = np.asarray(video_paths)
    group.attrs.update({"split_names": list(SPLITS), **attrs})
    return group


def write_clip_table(group: zarr.Group, *, labels: np.ndarray, videos: np.ndarray,
                     starts: np.ndarray, splits: np.ndarray) -> None:
    """(Re)write the per-clip arrays `label`, `video`, `start`, `split`."""
    columns = {"label": (labels, "int32"), "video": (videos, "int32"),
               "start": (starts, "int32"), "split": (splits, "int8")}
    for name, (values, dtype) in columns.items():
        values = np.asarray(values, dtype=dtype)
        array = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),),
                                   dtype=dtype, compressors=compressor(), overwrite=True)
        if len(values):
            array[:] = values


def train_rows(store: zarr.Group) -> np.ndarray:
    """Store rows used for pre-training: the train split plus unlabelled clips (all rows without splits)."""
    n = store["frames"].shape[0]
    if "split" not in store:
        return np.arange(n)
    keep = store["split"][:] == SPLITS.index("train")
    if "label" in store:
        keep |= store["label"][:] < 0  # no label: nothing to evaluate on, so nothing leaks
    return np.flatnonzero(keep)


def open_clips(path: Path | str, mode: str = "r") -> zarr.Group:
    """Open a clips store, with a clear error when it is missing or not a clips store."""
    path = Path(path)
    require(path, "clips store", "decode")
    group = zarr.open_group(str(path), mode=mode)
    if "frames" not in group:
        raise FileNotFoundError(f"{path} is not a clips store (no `frames` array)")
    return group
