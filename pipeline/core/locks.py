"""File locks: a short critical section (`file_lock`) and the lock a stage run holds on its outputs
(`output_lock`), so two runs of one stage never write the same outputs at once.

Both are `flock` locks: they belong to an open file and are released when the process dies, so a
killed holder never leaves a stale lock behind, and the lock files themselves are never deleted
(deleting a lock file while someone waits on it would hand out a second, unrelated lock).

`output_lock` is taken by every run of a stage, whoever starts it (`mam2 <stage>`, `python -m
stages.<stage>`, `dvc repro`, the Prefect flow: all go through `pipeline.core.stage_cli`), for the
whole run, from planning to the final commit. Shards of one stage (`--shard i/n`) share it with each
other; a whole-stage run holds it alone. A second run is refused at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import StageError


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block, waiting for it.

    flock locks belong to an open file, so this serialises threads of one process as well as
    processes (also over NFSv4).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


class OutputsBusy(StageError):
    """Another run of the same stage holds its outputs."""


def output_lock_path(runs: Path, stage: str) -> Path:
    """Where the lock of `stage`'s outputs lives (`stage` may carry a source: `pseudo_labels@clips`)."""
    return Path(runs) / "locks" / f"{stage}.lock"


def holder_line(shared: bool) -> str:
    """Who holds a lock, for the message a refused run prints."""
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    kind = "a shard run" if shared else "a run"
    return (f"{kind} (pid {os.getpid()} on {socket.gethostname()}, `{command}`, "
            f"since {time.strftime('%H:%M:%S')})")


@contextlib.contextmanager
def output_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold the outputs lock at `path` for the block, or raise `OutputsBusy` at once.

    `shared=True` for shards: they write disjoint parts of one partial store and may run together,
    but never beside a whole-stage run (which plans, finalises and commits the outputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputsBusy(f"its outputs are in use by {_holders(path)}; wait for it to finish "
                              f"(lock: {path})") from None
        line = holder_line(shared) + "\n"
        if shared:
            with open(path, "a") as handle:  # every shard adds its line
                handle.write(line)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode(), 0)
        yield
    finally:
        os.close(fd)


def _holders(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "another run"
