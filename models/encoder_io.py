"""Save and load a pre-trained video encoder in our own format: the config that builds it + weights.

`artifacts/pretrain/encoder.pt` holds {"format": "mam2.encoder", "config": build_encoder kwargs,
"input_norm": the input normalisation it was trained with, "state_dict": encoder weights}. Loading uses
`torch.load(weights_only=True)`; a file without "input_norm" (older ones) was trained on [0, 1] clips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from models.checkpoint_io import CheckpointError, read_weights
from models.video_vit import VideoViT, build_encoder

FORMAT = "mam2.encoder"


class EncoderCheckpointError(ValueError):
    """The file is not one of our encoder checkpoints, or its weights do not fit its config."""


def save_encoder(encoder: VideoViT, config: dict[str, Any], path: Path | str,
                 input_norm: str = "none") -> Path:
    """Write the encoder, the `build_encoder` kwargs that rebuild it and the input normalisation it was
    trained with (a key of `INPUT_NORMS`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save({"format": FORMAT, "config": dict(config), "input_norm": input_norm,
                "state_dict": encoder.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_encoder(path: Path | str, **overrides: Any) -> tuple[VideoViT, dict[str, Any]]:
    """Rebuild the encoder saved at `path`; `overrides` change build kwargs (e.g. num_frames,
    img_size, drop_path_rate): the 3-D sin-cos position table is regenerated for the new grid."""
    if not Path(path).exists():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    try:
        state = read_weights(path)
    except CheckpointError as err:
        raise EncoderCheckpointError(str(err)) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EncoderCheckpointError(f"{path}: not a mam2 encoder checkpoint (format {FORMAT!r})")
    config = {**state["config"], **overrides}
    encoder = build_encoder(**config)
    weights = {k: v for k, v in state["state_dict"].items() if "pos_embed" not in k}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "pos_embed" not in k]
    if missing or unexpected:
        raise EncoderCheckpointError(f"{path}: weights do not fit the config; missing {missing[:8]}, "
                                     f"unexpected {unexpected[:8]}")
    return encoder, config


def encoder_input_norm(path: Path | str) -> str:
    """The input normalisation the encoder saved at `path` was trained with ("none" for older files)."""
    state = read_weights(path)
    return str(state.get("input_norm", "none")) if isinstance(state, dict) else "none"
