"""The targets stage's reads and writes, in worker processes beside the encoder.

The stage's own process only encodes. `TargetsIO` runs `writers + 1` worker processes: `read` has a
worker copy a batch of clips from `clips.zarr` into a slot of a ring buffer the processes share, and
returns the slot's frames for the encoder; `write` has a worker compute that batch's RGB differences
from the same slot, compress and write its three arrays (`codes`, `codes_flipped`, `rgb_diff`) and
then its done marker (so a marker means the batch's chunks are whole), and frees the slot.

Why processes: Zarr's Python side (chunk bookkeeping, the hand-offs to its codec threads) holds the
GIL for 1-2 ms per array read or write, four calls per batch. Beside a GPU encoder (itself a Python
loop launching kernels) that was the pace in threads; in processes it runs beside it, and the frames
never travel through a pipe. Why fork, not spawn: the workers run only numpy, Zarr and Blosc (never
torch or CUDA), and a spawned worker re-imports the stage's `__main__` (torch: seconds each). Zarr
resets its event loop in a forked child, and `die_with_parent` ends the workers with the stage.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.processes import die_with_parent
from pipeline.core.shards import ProgressMarkers

PREFETCH = 2  # batches read ahead of the encoder
TARGET_ARRAYS = ("codes", "codes_flipped", "rgb_diff")


@dataclass(frozen=True)
class Batch:
    """A batch of clips read into ring slot `slot`: rows `rows` of the clips store, `frames` its
    (B, T, H, W, 3) uint8 view of the slot (valid until the batch is written)."""

    rows: range
    slot: int
    frames: np.ndarray


class TargetsIO:
    """Worker processes that read batches of `clips` and write the targets of `store_dir`.

    At most `writers` writes and PREFETCH reads are in flight (the caller waits on its write futures
    before submitting more), so the ring has `writers + PREFETCH` slots of `clips_per_batch` clips.
    """

    def __init__(self, clips: Path, store_dir: Path, clip_shape: tuple[int, ...], clips_per_batch: int,
                 writers: int) -> None:
        slots = writers + PREFETCH
        shape = (slots, clips_per_batch, *clip_shape)
        self._buffer = mmap.mmap(-1, int(np.prod(shape)))  # anonymous and shared: forked workers see it
        self.ring = np.frombuffer(self._buffer, np.uint8).reshape(shape)
        self._free = deque(range(slots))
        self._pool = ProcessPoolExecutor(writers + 1, mp_context=get_context("fork"),
                                         initializer=_start_worker,
                                         initargs=(self.ring, str(clips), str(store_dir)))

    def __enter__(self) -> TargetsIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(cancel_futures=True)  # the ring's memory goes with its last view

    def read(self, rows: range) -> Future[Batch]:
        """Read clips `rows` into a free slot (the first call starts the workers)."""
        if not self._free:
            raise RuntimeError("targets IO: every ring slot is in use (more reads or writes in "
                               "flight than the ring holds)")  # defensive: the caller bounds them
        slot = self._free.popleft()
        batch = Batch(rows, slot, self.ring[slot, :len(rows)])
        done: Future[Batch] = Future()
        reading = self._pool.submit(_read, slot, rows.start, rows.stop)
        reading.add_done_callback(lambda f: _settle(done, f, lambda: batch))
        return done

    def write(self, batch: Batch, codes: np.ndarray, flipped: np.ndarray) -> Future[int]:
        """Write a read batch's codes, mirrored codes and RGB differences, then its done marker; the
        future gives the number of frames written, and the slot is free again once it is done."""
        done: Future[int] = Future()
        writing = self._pool.submit(_write, batch.slot, batch.rows.start, batch.rows.stop, codes, flipped)

        def free_then_settle(f: Future) -> None:  # the slot is free before anyone sees the write done
            self._free.append(batch.slot)
            _settle(done, f, f.result)

        writing.add_done_callback(free_then_settle)
        return done


def _settle(done: Future, source: Future, value: Callable[[], object]) -> None:
    """Resolve `done` with `value()` once `source` is done, or with `source`'s error."""
    if source.cancelled():
        done.cancel()
    elif error := source.exception():
        done.set_exception(error)
    else:
        done.set_result(value())


_worker: dict = {}  # per worker process: the ring, the clips' frames, the target arrays, the markers


def _start_worker(ring: np.ndarray, clips: str, store_dir: str) -> None:
    die_with_parent()
    group = zarr.open_group(store_dir, mode="r+")
    _worker.update(ring=ring, frames=zarr.open_group(clips, mode="r")["frames"],
                   arrays={name: group[name] for name in TARGET_ARRAYS},
                   markers=ProgressMarkers(Path(store_dir)))


def _read(slot: int, start: int, stop: int) -> None:
    _worker["ring"][slot, :stop - start] = _worker["frames"][start:stop]


def _write(slot: int, start: int, stop: int, codes: np.ndarray, flipped: np.ndarray) -> int:
    clips, arrays = _worker["ring"][slot, :stop - start], _worker["arrays"]
    arrays["codes"][start:stop] = codes
    arrays["codes_flipped"][start:stop] = flipped
    arrays["rgb_diff"][start:stop] = rgb_difference(clips)
    _worker["markers"].mark_done(start)
    return clips.shape[0] * clips.shape[1]


def rgb_difference(clips: np.ndarray) -> np.ndarray:
    """(..., T, H, W, 3) uint8 -> (..., T-1, H, W, 3) int16, exactly frame[t+1] - frame[t]."""
    return np.diff(clips.astype(np.int16), axis=-4)
