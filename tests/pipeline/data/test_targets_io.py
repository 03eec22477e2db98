"""TargetsIO: worker processes read batches into ring slots and write the targets of each batch, slots
are reused, and a worker's error reaches the caller as itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data.targets_io import PREFETCH, TargetsIO, rgb_difference
from stages.targets import create_targets_store
from tests.stages.test_tokenizer import make_clips_store


def test_batches_round_trip_through_the_ring_and_errors_surface(tmp_path: Path):
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=7, num_frames=3, size=8)
    frames = zarr.open_group(str(clips), mode="r")["frames"][:]
    create_targets_store(tmp_path / "t.zarr", frames.shape, 4, {})
    codes = np.arange(7 * 3 * 2 * 2, dtype=np.int16).reshape(7, 3, 2, 2)
    batches = [range(s, min(s + 2, 7)) for s in range(0, 7, 2)]  # 4 batches, ring of 1 + PREFETCH slots
    with TargetsIO(clips, tmp_path / "t.zarr", frames.shape[1:], 2, writers=1) as io:
        assert len(io.ring) == 1 + PREFETCH < len(batches)
        for rows in batches:  # one at a time: every slot is reused
            batch = io.read(rows).result()
            assert np.array_equal(batch.frames, frames[rows.start:rows.stop])
            written = io.write(batch, codes[rows.start:rows.stop], -codes[rows.start:rows.stop]).result()
            assert written == len(rows) * 3
        batch = io.read(range(0, 2)).result()
        with pytest.raises(ValueError):  # codes of the wrong shape: raised in the worker, re-raised here
            io.write(batch, codes[:1, :2], codes[:1, :2]).result()
        reads = [io.read(rows) for rows in batches[:1 + PREFETCH]]  # every slot: the failed write's too
        assert [len(r.result().frames) for r in reads] == [2, 2, 2]
    store = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert np.array_equal(store["codes"][:], codes) and np.array_equal(store["codes_flipped"][:], -codes)
    assert np.array_equal(store["rgb_diff"][:], rgb_difference(frames))
    done = tmp_path / "t.zarr" / "_progress" / "done"
    assert sorted(p.name for p in done.iterdir()) == ["0", "2", "4", "6"]
