"""One-block collation: the same batch as `default_collate`, bit for bit, and one hand-over from a worker."""

from __future__ import annotations

import multiprocessing.reduction
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (importing it registers torch's tensor reducers)
from torch.utils.data import default_collate

from pipeline.data import shared_batch
from pipeline.data.shared_batch import SharedBatch, collate_shared


def samples(count: int = 3) -> list[dict]:
    """Samples with every kind of field a dataset here returns (and odd sizes, to exercise alignment)."""
    rng = np.random.default_rng(0)
    return [{"frames": torch.from_numpy(rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)),
             "mask": torch.from_numpy(rng.random(7) < 0.5),
             "codes": rng.integers(-50, 50, (3, 2, 2), dtype=np.int16),
             "strided": rng.random((2, 6)).astype(np.float32)[:, ::2],  # a non-contiguous view
             "row": int(rng.integers(100)), "flipped": bool(i % 2), "weight": 0.25 * i}
            for i in range(count)]


def assert_same(batch: dict, reference: dict) -> None:
    assert list(batch) == list(reference)
    for key, value in reference.items():
        assert batch[key].dtype == value.dtype and batch[key].shape == value.shape, key
        assert torch.equal(batch[key], value), key


def test_in_process_batch_equals_default_collate():
    batch = collate_shared(samples())
    assert isinstance(batch, dict)
    assert_same(batch, default_collate(samples()))
    # every field is a view of one block, each at an aligned offset
    storages = {value.untyped_storage().data_ptr() for value in batch.values()}
    assert len(storages) == 1
    assert all(value.storage_offset() * value.element_size() % shared_batch.ALIGN == 0
               for value in batch.values())


def test_worker_batch_crosses_processes_as_one_block(monkeypatch):
    """In a worker the batch is one shared block: pickled as torch's worker queues pickle it, it arrives
    as the default_collate dict and takes one file-descriptor hand-over; default_collate's takes one per
    field."""
    handed_over = []
    dup_fd = multiprocessing.reduction.DupFd

    def counting(fd):  # torch's reducer wraps each storage's descriptor in one DupFd
        handed_over.append(fd)
        return dup_fd(fd)

    monkeypatch.setattr(multiprocessing.reduction, "DupFd", counting)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a loader worker
    monkeypatch.setattr(shared_batch, "get_worker_info", lambda: object())
    monkeypatch.setattr(shared_batch, "_pool", [])
    packed = collate_shared(samples())
    assert isinstance(packed, SharedBatch) and packed.block.is_shared()
    received = ForkingPickler.loads(ForkingPickler.dumps(packed))
    assert len(handed_over) == 1
    reference = default_collate(samples())
    assert_same(received, reference)
    handed_over.clear()
    ForkingPickler.loads(ForkingPickler.dumps(reference))
    assert len(handed_over) == len(reference) == 7


def test_worker_reuses_a_block_once_the_training_process_lets_it_go(monkeypatch):
    monkeypatch.setattr(shared_batch, "get_worker_info", lambda: object())
    monkeypatch.setattr(shared_batch, "_pool", [])
    first = collate_shared(samples())
    batch = ForkingPickler.loads(ForkingPickler.dumps(first))
    address = first.block.data_ptr()
    assert int(first.block[0]) == shared_batch.HELD
    held = collate_shared(samples(2))  # the first block is still in use: another one
    assert held.block.data_ptr() != address
    frames = batch.pop("frames")
    del batch
    assert int(first.block[0]) == shared_batch.HELD  # one field is still alive
    del frames
    assert int(first.block[0]) == shared_batch.FREE
    again = collate_shared(samples(2))  # a smaller batch fits the freed block
    assert again.block.data_ptr() == address
    assert_same(ForkingPickler.loads(ForkingPickler.dumps(again)), default_collate(samples(2)))
    # `again` was received and dropped, so its block is free but too small for 5 samples: a new block
    # takes its place in the pool
    bigger = collate_shared(samples(5))
    assert bigger.block.data_ptr() not in (address, held.block.data_ptr())
    assert [b.data_ptr() for b in shared_batch._pool] == [bigger.block.data_ptr(), held.block.data_ptr()]


@pytest.mark.parametrize("batch", [
    [{"name": "a", "x": np.zeros(2)}, {"name": "b", "x": np.ones(2)}],  # strings
    [{"x": np.zeros(2)}, {"x": np.zeros(3)}],  # ragged: default_collate's own error
    [(np.zeros(2), 1), (np.ones(2), 2)],  # tuples, not dicts
])
def test_what_it_cannot_pack_goes_to_default_collate(batch):
    try:
        expected = default_collate(batch)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            collate_shared(batch)
        return
    got = collate_shared(batch)
    assert type(got) is type(expected)
    assert repr(got) == repr(expected)
