"""The motion models a stage starts from: motion_pretrain's flow model and point tracker, loaded
with one clear error when a file is missing (which stage makes it) or does not fit (which file)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.flow import CheckpointError
from models.flow_io import load_flow_model
from models.tracker import PointTracker, load_tracker
from pipeline.core.errors import StageError, require


def load_flow(path: Path, name: str = "raft_small") -> torch.nn.Module:
    """The flow model in `path` (our format, or outside weights read as RAFT variant `name`)."""
    require(path, "flow model", "motion_pretrain")
    try:
        return load_flow_model(path, name)
    except CheckpointError as err:
        raise StageError(str(err)) from err


def load_point_tracker(path: Path) -> PointTracker:
    """The point tracker in `path`."""
    require(path, "tracker", "motion_pretrain")
    try:
        return load_tracker(path)
    except CheckpointError as err:
        raise StageError(str(err)) from err
