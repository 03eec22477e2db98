"""Atomic outputs: build an output in a temporary sibling, then rename it into place.

A stage killed at any moment leaves either the previous complete output or no output, never a
half-written one. A directory output's temporary sibling has a fixed name (`.<name>.partial`) so a
stage that can resume finds its partial work on the next run (the stage's outputs lock,
pipeline.core.locks, keeps a second run out of it); a file's temporary name is unique to the process
and thread, so two writers of one file never write into each other's temporary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.processes import process_alive


def partial_path(final: Path | str) -> Path:
    """The temporary sibling where `final` is built before it is renamed into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, final: Path) -> None:
    """Move a finished `tmp` onto `final`, replacing any previous output.

    Directories cannot be renamed over a non-empty directory, so an old directory output is first
    renamed aside and deleted after the new one is in place.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        remove_path(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: Path | str, *, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` when the block exits without error.

    With `resume=True` an existing partial directory from a killed run is kept so the caller can
    continue it (the caller decides whether it is still valid); otherwise it is wiped first.
    """
    final = Path(final)
    tmp = partial_path(final)
    if tmp.exists() and not resume:
        remove_path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not resume:  # nothing to resume from: leave no debris beside the output
            remove_path(tmp)
        raise
    commit(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary file path that becomes `final` when the block exits without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_writers(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    remove_path(tmp)
    try:
        yield tmp
        commit(tmp, final)
    finally:
        if tmp.exists():
            remove_path(tmp)


def _sweep_dead_writers(final: Path) -> None:
    """Delete temporaries of `final` left by killed processes (their pid is in the name)."""
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        pid = stale.name[len(final.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                remove_path(stale)


    return True


def write_json(path: Path | str, data: Any) -> Path:
    """Write JSON atomically (sorted keys, indented) and return the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_png(image: Any, path: Path | str) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as a PNG, atomically; returns the path."""
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def save_figure(figure: Any, path: Path | str, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it; returns the path."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)
    return Path(path)
