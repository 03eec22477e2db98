"""Worker processes that never outlive the stage that started them, and the cores processes share.

A stage killed with SIGKILL cannot stop its pool, and spawned workers blocked on their task queue
would otherwise sleep forever. `die_with_parent`, run as a pool's initializer, asks Linux to send
the worker SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere it does nothing.
`available_cores` is what this process may run on; `thread_env` the environment that gives a child
process a number of compute threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this process receive SIGKILL when its parent dies (Linux); exit at once if it already has."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that give a child process `threads` compute threads: OpenMP's and
    MKL's, which torch's intra-op pool follows."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
