"""A user's video as the motion commands (`mam2 flow`, `mam2 track`) read it.

A frame range and stride of the file, shrunk so that the long side is at most `size` px (both sides
even, as H.264 needs), without cropping. `VideoSelection` keeps the mapping between the file's frame
numbers and pixels and the resized frames', so results are reported in the video's own terms.
Pixel coordinates follow the rest of the project: (x, y), pixel centres at integer coordinates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.video import VideoInfo, probe, read_frames

DEFAULT_SIZE = 256  # the motion models were trained at 128 px; 256 keeps CPU runs short
MIN_SIZE = 16


@dataclass(frozen=True)
class VideoSelection:
    """The frames of `path` a command works on: file frame numbers `indices`, resized to `size`."""

    path: Path
    info: VideoInfo
    indices: np.ndarray  # (T,) frame numbers in the file, increasing
    size: tuple[int, int]  # (width, height) of the resized frames

    @property
    def stride(self) -> int:
        """Frames of the file between two selected frames."""
        return int(self.indices[1] - self.indices[0]) if len(self.indices) > 1 else 1

    @property
    def fps(self) -> float:
        """The frame rate that plays the selected frames at the video's speed."""
        return (self.info.fps or 25.0) / self.stride

    def _scale(self) -> np.ndarray:
        return np.array([self.size[0] / self.info.width, self.size[1] / self.info.height])

    def to_resized(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) pixel coordinates of the video -> of the resized frames."""
        return (np.asarray(xy, np.float64) + 0.5) * self._scale() - 0.5

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) pixel coordinates of the resized frames -> of the video."""
        return (np.asarray(xy, np.float64) + 0.5) / self._scale() - 0.5

    def nearest_frame(self, frame: int) -> int:
        """The position in `indices` of the selected frame nearest to file frame `frame`."""
        return int(np.abs(self.indices - frame).argmin())

    def read(self) -> np.ndarray:
        """The selected frames, resized: (T, H, W, 3) uint8."""
        return read_frames(self.path, self.info, self.indices.tolist(), *self.size)

    def describe(self) -> str:
        """`bikes.mp4: frames 0-249 every 1 (250), 640x272 -> 256x108`."""
        first, last = int(self.indices[0]), int(self.indices[-1])
        return (f"{self.path}: frames {first}-{last} every {self.stride} ({len(self.indices)}), "
                f"{self.info.width}x{self.info.height} -> {self.size[0]}x{self.size[1]}")


def resized_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) shrunk so the long side is at most `long_side` px (0: the native size), both
    rounded to even."""
    scale = 1.0 if long_side == 0 else min(long_side / max(width, height), 1.0)
    return tuple(max(2, 2 * round(side * scale / 2)) for side in (width, height))


def select_indices(num_frames: int, start: int, end: int | None, stride: int, min_frames: int) -> np.ndarray:
    """File frame numbers start, start + stride, ... before `end` (None: the last frame); ValueError
    with the reason when they are fewer than `min_frames`."""
    chosen = f"--start {start}" + (f" --end {end}" if end is not None else "") + f" --stride {stride}"
    if start < 0 or stride < 1 or (end is not None and end <= start):
        raise ValueError(f"{chosen}: need 0 <= start < end and stride >= 1")
    stop = num_frames if end is None else min(end, num_frames)
    indices = np.arange(start, stop, stride)
    if len(indices) < min_frames:
        raise ValueError(f"{chosen} selects {len(indices)} of the video's {num_frames} frames; need at "
                         f"least {min_frames}")
    return indices


def open_video(path: Path, *, size: int, start: int = 0, end: int | None = None, stride: int = 1,
               min_frames: int = 2) -> VideoSelection:
    """Probe `path` and select its frames. `VideoReadError` if it cannot be read, `ValueError` if the
    options select too few frames or an impossible size."""
    if size != 0 and size < MIN_SIZE:
        raise ValueError(f"--size {size}: at least {MIN_SIZE} px (or 0 for the native size)")
    info = probe(Path(path))
    indices = select_indices(info.num_frames, start, end, stride, min_frames)
    return VideoSelection(Path(path), info, indices, resized_size(info.width, info.height, size))


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both motion commands take to choose and size the frames."""
    parser.add_argument("video", type=Path, help="the video file (anything ffmpeg reads)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="PX",
                        help=f"shrink so the long side is at most PX pixels (default {DEFAULT_SIZE}; 0 "
                             "keeps the video's size); the models run on the resized frames")
    parser.add_argument("--start", type=int, default=0, metavar="N", help="first frame (default 0)")
    parser.add_argument("--end", type=int, default=None, metavar="N",
                        help="stop before this frame (default: the end of the video)")
    parser.add_argument("--stride", type=int, default=1, metavar="K",
                        help="use every K-th frame (default 1); the motion between used frames grows K-fold")
