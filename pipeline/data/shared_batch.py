"""Collate a batch of samples into one memory block, which a loader worker hands over whole and reuses.

What a worker's batch costs beyond reading its samples, with `default_collate`:

- every field (`frames`, `mask`, `codes`, `row`, `flipped`) goes in its own shared-memory segment, and
  under torch's default `file_descriptor` sharing strategy the training process takes each segment's file
  descriptor from the worker through a socket connection with an authentication handshake, answered by a
  thread of the worker that must win the GIL from the worker's own sampling: five hand-overs a batch, each
  a string of context switches between the two processes;
- every segment is new: the kernel hands the worker fresh zeroed pages for each batch, which costs about
  ten times as much as filling pages it already has (5 ms against 0.5 ms for a 4.8 MB batch of 8 clips
  of 16 x 112^2, about a fifth of the worker's time per clip).

`collate_shared` stacks every field into one block (fields at 64-byte aligned offsets) and returns the
dict of tensors `default_collate` returns, as views of that block: same keys, dtypes, shapes and values,
bit for bit. Outside a worker the block is ordinary memory and the dict is returned as it is. In a worker
the block is shared memory from a small pool the worker keeps, and the batch travels as the block plus
its layout (`SharedBatch`): one hand-over per batch. The block's first byte says who holds it; the
training process marks it free when the last tensor of the batch is gone (`receive`), and the worker
then fills it again instead of asking for new pages. A batch the training process keeps only keeps its
block out of the pool. Batches it cannot pack (samples that are not dicts of tensors, NumPy arrays and
numbers) go to `default_collate`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

ALIGN = 64  # bytes: every field starts on a cache line, and any dtype's view of it is aligned
HEADER = ALIGN  # a block's first cache line; its first byte is HELD while the training process holds it
FREE, HELD = 0, 1
POOL = 4  # blocks a worker keeps for reuse: the DataLoader's default prefetch of 2 per worker, plus slack
SCALARS = {bool: torch.bool, int: torch.int64, float: torch.float64}  # as default_collate stacks them

_pool: list[torch.Tensor] = []  # this worker process's blocks


class Field(NamedTuple):
    """Where one stacked field sits in the block."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


def collate_shared(samples: Sequence[Any]) -> Any:
    """`default_collate(samples)` with every field a view of one block (in a worker: a `SharedBatch`)."""
    layout = plan(samples)
    if layout is None:
        return default_collate(samples)
    size = layout[-1].offset + _nbytes(layout[-1]) if layout else HEADER
    in_worker = get_worker_info() is not None
    block = _lend(size) if in_worker else torch.empty(size, dtype=torch.uint8)
    batch = unpack(block, layout)
    for field in layout:
        fill(batch[field.key], [sample[field.key] for sample in samples])
    return SharedBatch(block, layout) if in_worker else batch


class SharedBatch:
    """A collated batch in a worker: pickles as its block and layout, unpickles as the dict of views."""

    def __init__(self, block: torch.Tensor, layout: list[Field]) -> None:
        self.block, self.layout = block, layout

    def __reduce__(self) -> tuple:
        return receive, (self.block, self.layout)


def receive(block: torch.Tensor, layout: list[Field]) -> dict[str, torch.Tensor]:
    """In the training process: the batch as views of a worker's block, which is marked free for the
    worker to reuse once the last of them is gone."""
    holder = block.numpy()  # the block's memory as an object whose end we can see
    weakref.finalize(holder, _release, block)
    # frombuffer keeps `holder` alive for as long as any tensor uses this memory
    return unpack(torch.frombuffer(holder, dtype=torch.uint8), layout)


def plan(samples: Sequence[Any]) -> list[Field] | None:
    """The block layout of the stacked fields, or None when the samples are not dicts this can pack."""
    if not samples or not all(isinstance(s, Mapping) for s in samples):
        return None
    keys = list(samples[0])
    if any(list(s) != keys for s in samples) or not all(isinstance(k, str) for k in keys):
        return None
    layout, offset = [], HEADER
    for key in keys:
        spec = _stacked(samples[0][key], len(samples))
        if spec is None or any(_stacked(s[key], len(samples)) != spec for s in samples[1:]):
            return None
        dtype, shape = spec
        layout.append(Field(key, dtype, shape, offset))
        offset += -(-_nbytes(layout[-1]) // ALIGN) * ALIGN
    return layout


def unpack(block: torch.Tensor, layout: list[Field]) -> dict[str, torch.Tensor]:
    """The fields of a block as tensors (views: no copy)."""
    return {f.key: block[f.offset:f.offset + _nbytes(f)].view(f.dtype).view(f.shape) for f in layout}


def fill(out: torch.Tensor, values: list[Any]) -> None:
    """Stack `values` (tensors, NumPy arrays or numbers) into `out`, as default_collate stacks them.

    Arrays are copied by NumPy, on this thread: torch would split each copy over its intra-op threads, and
    on a busy machine every copy then waits for the slowest of them (copies of a few MB took 20-60 ms
    instead of 0.3 ms beside other work)."""
    first = values[0]
    if not torch.is_tensor(first) and not isinstance(first, np.ndarray):
        out.copy_(torch.tensor(values, dtype=out.dtype))
        return
    try:
        rows = out.numpy()
    except TypeError:  # a dtype NumPy lacks (bfloat16, ...)
        for row, value in zip(out, values, strict=True):
            row.copy_(value)
        return
    for index, value in enumerate(values):
        rows[index] = value.numpy() if torch.is_tensor(value) else value


def _lend(size: int) -> torch.Tensor:
    """A shared block of at least `size` bytes from this worker's pool (or new), marked HELD."""
    free = [i for i, block in enumerate(_pool) if int(block[0]) == FREE]
    fits = [i for i in free if _pool[i].numel() >= size]
    if fits:
        block = _pool[fits[0]]
    else:
        # torch's own collate allocates worker batches the same way: straight in shared memory
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        if free:  # a free block too small for this batch: the new one takes its place
            _pool[free[0]] = block
        elif len(_pool) < POOL:
            _pool.append(block)
    block[0] = HELD
    return block


def _release(block: torch.Tensor) -> None:
    block[0] = FREE


def _stacked(value: Any, count: int) -> tuple[torch.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of `count` values like `value` stacked as default_collate would, None if unsupported."""
    if torch.is_tensor(value):
        if value.device.type != "cpu" or value.layout != torch.strided:
            return None
        return value.dtype, (count, *value.shape)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return None
        return torch.from_numpy(np.empty(0, value.dtype)).dtype, (count, *value.shape)
    if type(value) in SCALARS:
        return SCALARS[type(value)], (count,)
    return None


def _nbytes(field: Field) -> int:
    return math.prod(field.shape) * field.dtype.itemsize
