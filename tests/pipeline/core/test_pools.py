"""Worker pools: the calling process works too (from the back of the job list), every job runs once,
results come with their index, and errors propagate."""

from __future__ import annotations

import os

import pytest

from pipeline.core.pools import WorkerPool, run_jobs


def double(job: int) -> tuple[int, int]:
    """The job's result and the process that computed it."""
    if job < 0:
        raise ValueError(f"bad job {job}")
    return job * 2, os.getpid()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_job_runs_once_and_this_process_takes_the_last(workers):
    jobs = list(range(40))
    with WorkerPool(workers) as pool:
        assert pool.helpers == max(0, workers - 1) and (pool.pool is None) == (workers < 2)
        results = list(run_jobs(pool, double, jobs))
    assert sorted(index for index, _ in results) == jobs
    assert all(value == 2 * jobs[index] for index, (value, _) in results)
    by_me = {index for index, (_, pid) in results if pid == os.getpid()}
    assert jobs[-1] in by_me  # this process starts at the back while the helper starts up
    if workers < 2:
        assert by_me == set(jobs)


def test_an_error_propagates_from_this_process_and_from_a_helper():
    with WorkerPool(2) as pool, pytest.raises(ValueError, match="bad job -1"):
        list(run_jobs(pool, double, [1, 2, -1]))  # the last job: this process runs it
    with WorkerPool(2) as pool, pytest.raises(ValueError, match="bad job -5"):
        list(run_jobs(pool, double, [-5] + [1] * 30))  # the first: a helper's (or this one's)
    assert list(run_jobs(None, double, [])) == []
