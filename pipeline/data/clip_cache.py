"""Decoded stored clips kept in memory for the pre-training loader.

A stored clip is one Zarr chunk (16 x 128^2 x 3 bytes = 786 KB at the demo's size), so every sample
decompresses a whole clip to keep a crop of it. When the clips a process samples fit in memory, keeping
them decoded turns every later read into a slice: the first epoch reads as before, the others read
nothing. The cache is per process (each loader worker holds its own), least recently used out first,
and serves exactly the bytes Zarr would.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np


class ClipCache:
    """Whole decoded clips by store row, up to `budget_bytes` (0: off)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget, self.used = int(budget_bytes), 0
        self.clips: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:  # a worker process starts with an empty cache of its own
        return {**self.__dict__, "clips": OrderedDict(), "used": 0, "hits": 0, "misses": 0}

    def fetch(self, rows: Iterable[int], read: Callable[[list[int]], list[np.ndarray]]
              ) -> dict[int, np.ndarray]:
        """{row: clip} for `rows`, reading the missing ones with `read(missing rows)` in one call. The
        returned clips stay valid even when keeping them would exceed the budget."""
        rows = list(dict.fromkeys(rows))
        missing = [row for row in rows if row not in self.clips]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        found = {row: self.clips[row] for row in rows if row in self.clips}
        for row in found:
            self.clips.move_to_end(row)
        for row, clip in zip(missing, read(missing) if missing else [], strict=True):
            found[row] = clip
            self._keep(row, clip)
        return found

    def _keep(self, row: int, clip: np.ndarray) -> None:
        if clip.nbytes > self.budget:
            return
        self.clips[row], self.used = clip, self.used + clip.nbytes
        while self.used > self.budget:
            _, old = self.clips.popitem(last=False)
            self.used -= old.nbytes
