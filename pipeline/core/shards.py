"""Shards: split a data stage's work into disjoint parts that fill one shared Zarr store.

A sharded stage (decode, targets; pseudo_labels writes one small store per clip in its work
directory and merges them at the end) works in three steps, all on the stage's partial store
(`.<name>.partial`, see pipeline.core.atomic):

1. Plan, once: the store's layout is deterministic from the inputs and params, so whichever process
   comes first creates the partial store and writes its plan under a file lock (`plan_once`); the
   others find the plan with the same signature and reuse it.
2. Shard `i/n` (`mam2 <stage> --shard i/n`) processes its own items (`Shard.select`, or
   `Shard.chunk_rows` where several rows share a chunk), writes only their rows, and marks each item
   done or failed (`ProgressMarkers`), so shards never write the same chunk and a killed shard resumes.
3. Finalise: the stage run without `--shard` resumes the partial store, finds every item settled,
   and only checks failures, compacts and commits it: the same code path as an unsharded run, so
   two shards and one unsharded run give the same store.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pipeline.core.atomic import atomic_file, remove_path, write_json
from pipeline.core.locks import file_lock

T = TypeVar("T")
PROGRESS_DIR = "_progress"


class ShardError(ValueError):
    """A malformed shard spec (`--shard 3/2`); the message says what is expected."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based: `0/2` and `1/2` together cover everything)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"shard {self.index}/{self.count}: expected i/n with 0 <= i < n")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items: every count-th from index, so sorted inputs (classes, sizes) spread
        evenly over the shards."""
        return list(items[self.index::self.count])

    def chunk_rows(self, num_rows: int, rows_per_chunk: int) -> list[range]:
        """Row ranges of the whole chunks this shard owns, for stores with several rows per chunk:
        two shards never write into the same chunk, so they never race on one chunk file."""
        if rows_per_chunk < 1:
            raise ShardError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
        starts = range(0, num_rows, rows_per_chunk)
        return [range(s, min(s + rows_per_chunk, num_rows)) for s in self.select(starts)]


def parse_shard(text: str) -> Shard:
    """Parse `i/n` (0-based i, 0 <= i < n), e.g. `--shard 0/4`."""
    index, sep, count = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError
        return Shard(int(index), int(count))
    except ValueError as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"shard {text!r}: expected i/n, e.g. 0/4 (0-based i, 0 <= i < n)") from None


def supports_shards(module: ModuleType) -> bool:
    """Whether a stage module's `run_from_paths` takes a `shard` argument (`mam2 <stage> --shard i/n`)."""
    entry = getattr(module, "run_from_paths", None)
    return entry is not None and "shard" in inspect.signature(entry).parameters


def lock_path(partial: Path) -> Path:
    """The lock file that guards planning a partial store: a hidden sibling that outlives it."""
    return partial.with_name(f"{partial.name}.lock")


def read_plan(partial: Path, signature: str) -> dict[str, Any] | None:
    """The plan of `partial` if it was made for `signature` and completed, else None."""
    marker = partial / PROGRESS_DIR / "signature"
    if not marker.exists() or marker.read_text() != signature:
        return None
    return json.loads((partial / PROGRESS_DIR / "plan.json").read_text())


def plan_once(partial: Path, signature: str, create: Callable[[Path], dict[str, Any]]
              ) -> tuple[dict[str, Any], bool]:
    """Return the plan of the partial store for `signature`, creating store and plan only once.

    Under the planning lock: a plan with the same signature is reused (returns `(plan, True)`);
    otherwise the partial directory is wiped and `create(partial)` builds the store and returns a
    JSON-able plan, which is saved with the signature written last, so a process killed while
    planning leaves no plan and the next one starts afresh (returns `(plan, False)`).
    """
    with file_lock(lock_path(partial)):
        plan = read_plan(partial, signature)
        if plan is not None:
            return plan, True
        remove_path(partial)
        partial.mkdir(parents=True)
        plan = create(partial)
        progress = partial / PROGRESS_DIR
        write_json(progress / "plan.json", plan)
        ProgressMarkers(partial)  # creates done/ and failed/
        (progress / "signature").write_text(signature)
        return plan, False


def finish_plan(partial: Path) -> None:
    """Drop the plan and markers from a finished store (before committing it) and its lock file."""
    remove_path(partial / PROGRESS_DIR)
    with contextlib.suppress(OSError):
        lock_path(partial).unlink()


class ProgressMarkers:
    """Per-item `done` and `failed` markers inside a partial store (`_progress/done/<key>`,
    `_progress/failed/<key>` holding the reason); files, so concurrent shards never conflict."""

    def __init__(self, partial: Path) -> None:
        self.done_dir = partial / PROGRESS_DIR / "done"
        self.failed_dir = partial / PROGRESS_DIR / "failed"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)

    def mark_done(self, key: object) -> None:
        (self.done_dir / str(key)).touch()

    def mark_failed(self, key: object, reason: str) -> None:
        with atomic_file(self.failed_dir / str(key)) as tmp:
            tmp.write_text(reason)

    def settled(self, key: object) -> bool:
        """Done or failed: nothing left to do for this item."""
        return (self.done_dir / str(key)).exists() or (self.failed_dir / str(key)).exists()

    def pending(self, items: Sequence[T], key: Callable[[T], object]) -> list[T]:
        """The items not yet settled, in order."""
        return [item for item in items if not self.settled(key(item))]

    def failures(self) -> dict[str, str]:
        """Reason of every failed item, by key."""
        return {path.name: path.read_text() for path in sorted(self.failed_dir.iterdir())
                if not path.name.startswith(".")}  # skip a killed writer's temporary file
