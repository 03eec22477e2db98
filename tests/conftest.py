"""Shared fixtures: tiny real videos written with ffmpeg, and an offline, quiet environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.video import write_mp4

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MAM2_PROGRESS", "0")


def moving_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames with a textured background and a square that moves, so every frame differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     rng.integers(0, 256, (height, width)) // 4 + 96], axis=-1).astype(np.uint8)
    frames = np.repeat(base[None], num_frames, axis=0)
    side = max(4, min(height, width) // 4)
    for t in range(num_frames):
        x0, y0 = (3 * t) % (width - side), (2 * t) % (height - side)
        frames[t, y0:y0 + side, x0:x0 + side] = (255, 40 + (t * 7) % 200, 30)
    return frames


@pytest.fixture
def make_video(tmp_path: Path):
    """make_video(relpath, frames=.., height=.., width=.., fps=..) writes a real mp4 and returns its path."""

    def make(relpath: str, *, num_frames: int = 40, height: int = 64, width: int = 64,
             fps: float = 25.0, seed: int = 0, extra_args: tuple[str, ...] = ()) -> Path:
        path = tmp_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, moving_frames(num_frames, height, width, seed), fps=fps)
        if extra_args:  # re-mux with extra ffmpeg options (e.g. faststart)
            tmp = path.with_suffix(".remux.mp4")
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(path), "-c", "copy",
                            *extra_args, str(tmp)], check=True)
            tmp.replace(path)
        return path

    return make


def ffmpeg_reference(path: Path, vf: str | None = None) -> np.ndarray:
    """Every frame of `path` decoded by the ffmpeg binary to rgb24 (optionally through a filter)."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, check=True).stdout.strip()
    width, height = map(int, probe.split(","))
    command = ["ffmpeg", "-v", "error", "-i", str(path)]
    if vf:
        command += ["-vf", vf]
        width, height = (map(int, vf.rsplit("crop=", 1)[1].split(":")[:2]) if "crop=" in vf
                         else (width, height))
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended cores (and never stall on them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
