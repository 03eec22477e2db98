"""Reading weight files safely: `torch.load(weights_only=True)` only, with one clear error.

Every model loader of the project reads files through `read_weights`, so a text file, a truncated
download or a pickle with code in it gives one line naming the file and the reason, never torch's
advice to retry with `weights_only=False`.
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model (the message names the file or keys)."""


def read_weights(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on CPU; any failure becomes a ``CheckpointError`` naming
    the file."""
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
