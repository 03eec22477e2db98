"""Reading many windows of Zarr arrays at once gives what reading them one by one gives."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import zarr

from pipeline.data import batch_reads
from pipeline.data.batch_reads import read_together


def test_reads_together_equal_reads_one_by_one(tmp_path):
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    rng = np.random.default_rng(0)
    a = group.create_array("a", shape=(4, 6, 8), chunks=(1, 3, 8), dtype="uint8")
    b = group.create_array("b", shape=(4, 5), chunks=(2, 5), dtype="int16")
    a[:] = rng.integers(0, 256, a.shape, dtype=np.uint8)
    b[:] = rng.integers(-99, 99, b.shape, dtype=np.int16)
    arrays = {"a": a, "b": b}
    reads = [("a", (1, slice(2, 5), slice(0, 8))), ("b", (3, slice(1, 4))), ("a", (0, slice(None), 3)),
             ("b", (slice(0, 4), 2))]  # windows across chunks, a point, a column
    got = read_together(arrays, reads)
    for (name, selection), value in zip(reads, got, strict=True):
        want = arrays[name][selection]
        assert isinstance(value, np.ndarray) and value.dtype == want.dtype
        np.testing.assert_array_equal(value, want)


def test_workers_share_the_cores_in_zarrs_pool(monkeypatch):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with zarr.config.set({"threading.max_workers": None}):  # restored on leaving
        batch_reads.share_cores_in_worker()  # not in a worker: left alone
        assert zarr.config.get("threading.max_workers") is None
        for workers in (1, 2, 64):
            info = SimpleNamespace(num_workers=workers)
            monkeypatch.setattr(batch_reads, "get_worker_info", lambda info=info: info)
            batch_reads.share_cores_in_worker()
            assert zarr.config.get("threading.max_workers") == max(1, cores // workers)
