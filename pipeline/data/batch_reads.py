"""Read many windows of Zarr arrays at once: one round trip to Zarr's I/O loop for a whole batch.

Each read of a Zarr (v3) array from synchronous code is handed to Zarr's event-loop thread, which hands
the chunk's decompression to its thread pool and the result back: three threads and two hand-offs per
read, about 1 ms of overhead on a 2 KB codes chunk. `read_together` gives Zarr every read of a batch in
one call, so the hand-offs are paid once and the chunks decompress side by side on Zarr's pool. The
values are the ones `array[selection]` returns.

In a loader worker the pool gets the worker's share of the cores (`share_cores_in_worker`: one thread
each when there are as many workers as cores): workers times a pool the size of the machine would
oversubscribe it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import zarr
from torch.utils.data import get_worker_info
from zarr.core.sync import sync

from pipeline.core.processes import available_cores


def read_together(arrays: Mapping[str, zarr.Array], reads: Sequence[tuple[str, tuple]]) -> list[np.ndarray]:
    """`[np.asarray(arrays[name][selection]) for name, selection in reads]`, read concurrently."""

    async def gather() -> list:
        return await asyncio.gather(*(arrays[name].async_array.getitem(sel) for name, sel in reads))

    return [np.asarray(value) for value in sync(gather())]


def share_cores_in_worker() -> None:
    """In a DataLoader worker, before it first touches Zarr: size Zarr's thread pool to the worker's
    share of the cores this process may run on."""
    info = get_worker_info()
    if info is not None:
        zarr.config.set({"threading.max_workers": max(1, available_cores() // info.num_workers)})
