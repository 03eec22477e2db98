"""Fixtures of the reliability cases: a project folder with a few real videos."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def video_project(tmp_path: Path, make_video) -> Path:
    """`tmp_path` with `raw/<class>/v<i>.mp4`: six small real videos in two classes."""
    for i in range(6):
        make_video(f"raw/c{i % 2}/v{i}.mp4", num_frames=40, height=96, width=128, seed=i)
    return tmp_path
