"""Reading weight files safely: `torch.load(weights_only=True)` only, with one clear error.

Every model loader of the project reads files through `read_weights`, so a text file, a truncated
download or a pickle with code in it gives one line naming the file and the reason, never torch's
advice to retry with `weights_only=False`.

safetensors files are read too (recognised by their header, whatever their name): one written by
`write_safetensors` with our metadata comes back as the dict our torch checkpoints hold ({"format",
"config", ..., "state_dict"}), so every loader accepts it; any other comes back as its flat tensor dict,
as a bare torch state_dict would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SAFETENSORS_META_KEY = "mam2"  # the metadata entry holding our checkpoint's non-tensor fields (JSON)


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model (the message names the file or keys)."""


def read_weights(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on CPU (or `read_safetensors` for a safetensors file); any
    failure becomes a ``CheckpointError`` naming the file."""
    if is_safetensors(path):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a directory, not a checkpoint file") from None
    except Exception as exc:  # pickle errors, truncated files, non-tensor objects refused by weights_only
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({load_failure(exc)})") from exc


def load_failure(exc: BaseException) -> str:
    """The reason in torch.load's error, without its advice to retry with weights_only=False (this
    project never unpickles code)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = lines[0] if lines else ""
    return f"{type(exc).__name__}: {reason}"[:200] if reason else type(exc).__name__


# ----------------------------------------------------------------------------- safetensors
def is_safetensors(path: str | Path) -> bool:
    """Whether `path` is a safetensors file: named `*.safetensors`, or starting as one does (an 8-byte
    little-endian header length, then the JSON header's opening brace)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file: {**our metadata, "state_dict": tensors} when `write_safetensors` wrote it,
    else its flat {name: tensor} dict. Raises `CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({load_failure(exc)})") from exc
    if SAFETENSORS_META_KEY not in metadata:
        return tensors
    try:
        fields = json.loads(metadata[SAFETENSORS_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: bad {SAFETENSORS_META_KEY!r} metadata ({exc})") from exc
    return {**fields, "state_dict": tensors}


def write_safetensors(state: dict[str, Tensor], path: str | Path,
                      fields: dict[str, Any] | None = None) -> Path:
    """Write `state` (name -> tensor) as safetensors, atomically; `fields` (JSON-able: our checkpoint's
    format, config, ...) travel in the metadata so `read_safetensors` returns the checkpoint dict."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    metadata = {SAFETENSORS_META_KEY: json.dumps(fields, sort_keys=True)} if fields else None
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
