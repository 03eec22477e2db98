"""Worker pools in which the calling process is one of the workers.

`WorkerPool(workers)` spawns `workers - 1` helper processes (none for 0 or 1): the stage process is
the last worker, so one worker starts no process at all, and with more the helpers' start (a fresh
interpreter importing the stage's modules, half a second or more) overlaps work already under way
instead of delaying all of it. `run_jobs` runs a function over a list of jobs: the helpers take jobs
from the front, one at a time once started and then as each finishes, and the calling process takes
them from the back, so all finish within about one job of each other; results come as they finish.

Helpers are spawned (decord and zarr threads do not survive fork) and die with the stage
(pipeline/core/processes.py).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from pipeline.core.processes import die_with_parent

J = TypeVar("J")
R = TypeVar("R")


class WorkerPool:
    """`workers` workers, this process included: `helpers` spawned processes in `pool` (None when
    this process works alone). A context manager that closes the helpers."""

    def __init__(self, workers: int) -> None:
        self.helpers = max(0, workers - 1)
        self.pool = (ProcessPoolExecutor(self.helpers, mp_context=get_context("spawn"),
                                         initializer=die_with_parent)
                     if self.helpers else None)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # After an error, wait for the jobs already running; after success every job is done and
        # the helpers only have to exit, which they do while this process goes on.
        if self.pool is not None:
            self.pool.shutdown(wait=exc_type is not None, cancel_futures=True)


def _started(fn: Callable) -> None:
    """A helper's first call: returns once the helper is up, spawned and with the module of the
    job function `fn` imported (receiving `fn` imports it)."""


def run_jobs(workers: WorkerPool | None, fn: Callable[[J], R], jobs: Sequence[J]
             ) -> Iterator[tuple[int, R]]:
    """`(index, fn(job))` for every job, in the order they finish: the helpers take the jobs from
    the front (each is handed the next as it finishes one), this process from the back.

    `fn` must be picklable (a module-level function). An exception from `fn` propagates, wherever
    it ran, and no further job is started.
    """
    if workers is None or workers.pool is None:
        for index, job in enumerate(jobs):
            yield index, fn(job)
        return
    pool = workers.pool
    todo, lock = deque(enumerate(jobs)), threading.Lock()
    finished: queue.SimpleQueue[tuple[int, Future | BaseException]] = queue.SimpleQueue()

    def feed_helper(_: Future | None = None) -> None:
        """Hand the first job left to the pool: when a helper has started, then from each job's
        done-callback (in the pool's thread). No job waits in a queue for a helper, where this
        process could not take it back."""
        with lock:
            if not todo:
                return
            index, job = todo.popleft()
        try:
            future = pool.submit(fn, job)
        except RuntimeError as err:  # the pool broke or is closing
            finished.put((index, err))
            return
        future.add_done_callback(lambda done: (finished.put((index, done)), feed_helper()))

    try:
        for _ in range(workers.helpers):
            pool.submit(_started, fn).add_done_callback(feed_helper)
        for _ in range(len(jobs)):
            try:
                index, outcome = finished.get_nowait()
            except queue.Empty:
                with lock:
                    mine = todo.pop() if todo else None
                if mine is not None:  # no helper result waiting: do the last job left here
                    yield mine[0], fn(mine[1])
                    continue
                index, outcome = finished.get()
            if isinstance(outcome, BaseException):
                raise outcome
            yield index, outcome.result()
    finally:
        with lock:
            todo.clear()  # after an error (or an abandoned loop) start nothing more
