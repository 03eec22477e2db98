"""Our flow-model checkpoint format: the RAFT variant's name travels with its weights.

`save_flow_model` writes {"format": "mam2.flow", "name": "raft_small", "state_dict": ...} (plain
types and tensors, loadable with weights_only=True). `load_flow_model` rebuilds the model from such
a file, and also accepts the outside formats `models.flow.load_flow_checkpoint` reads (a torchvision
state_dict or an original RAFT checkpoint), for which the variant must be named.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models.optical_flow import RAFT

from models.flow import (
    FLOW_MODELS,
    CheckpointError,
    build_flow_model,
    check_fits,
    load_flow_checkpoint,
    read_weights,
)

FLOW_FORMAT = "mam2.flow"


def save_flow_model(model: RAFT, name: str, path: str | Path) -> None:
    """Write `model` (a `name` variant, one of FLOW_MODELS) in our format."""
    if name not in FLOW_MODELS:
        raise ValueError(f"unknown flow model {name!r}; choose one of {sorted(FLOW_MODELS)}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FLOW_FORMAT, "name": name, "state_dict": state}, path)


def load_flow_model(path: str | Path, name: str = "raft_small") -> RAFT:
    """Build and load a flow model from `path`: our format (its own name), else outside weights as `name`.

    Raises `CheckpointError` naming the file when it cannot be read or does not fit.
    """
    obj = read_weights(path)
    if isinstance(obj, dict) and obj.get("format") == FLOW_FORMAT:
        if obj.get("name") not in FLOW_MODELS:
            raise CheckpointError(f"{path}: unknown flow model name {obj.get('name')!r}")
        model = build_flow_model(obj["name"])
        check_fits(obj["state_dict"], model.state_dict(), f"{path}: checkpoint does not fit {obj['name']}")
        model.load_state_dict(obj["state_dict"])
        return model
    return load_flow_checkpoint(build_flow_model(name), path)
