"""Errors a user can act on. The CLI prints their message alone, without a traceback."""

from __future__ import annotations

from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot proceed for a reason in its inputs (bad files, too many failures, ...)."""


def require(path: Path | str, what: str, made_by: str) -> Path:
    """`path` when it exists; otherwise a FileNotFoundError naming what is missing and the stage
    that makes it: "tracker not found: artifacts/motion_pretrain/tracker.pt (run `mam2
    motion_pretrain` first)"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (run `mam2 {made_by}` first)")
    return path


class OutputWriteError(OSError):
    """Writing an output failed (disk full, read-only, no permission): a system error that fails the
    stage, never a bad input to skip. Built as `OutputWriteError(errno, strerror, filename)` so it
    crosses process boundaries intact."""
