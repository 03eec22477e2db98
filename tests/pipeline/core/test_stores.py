"""Store helpers: the input stamp that keeps training stages from resuming on rebuilt inputs."""

from __future__ import annotations

import os

import numpy as np

from pipeline.core.atomic import atomic_dir
from pipeline.core.fingerprint import input_stamp
from pipeline.core.stores import create_clips_store


def _store(path, seed):
    with atomic_dir(path) as tmp:
        store = create_clips_store(tmp, num_clips=1, num_frames=2, size=8, labels=np.zeros(1),
                                   videos=np.zeros(1), starts=np.zeros(1), splits=np.zeros(1),
                                   video_paths=["a"], attrs={"seed": seed})
        store["frames"][:] = seed
    return path


def test_stamp_changes_when_an_input_is_rebuilt_and_not_otherwise(tmp_path):
    clips = _store(tmp_path / "clips.zarr", 1)
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"v1")
    first = input_stamp(clips, weights, None)
    assert first == input_stamp(clips, weights, None), "reading changes nothing"
    assert first[2] is None and input_stamp(tmp_path / "missing")[0][1] is None

    mtime = (clips / "zarr.json").stat().st_mtime_ns
    _store(tmp_path / "clips.zarr", 2)  # an upstream stage rebuilt it
    os.utime(clips / "zarr.json", ns=(mtime + 10**9, mtime + 10**9))  # coarse filesystem clocks
    assert input_stamp(clips, weights, None) != first
    rebuilt = input_stamp(clips, weights, None)
    weights.write_bytes(b"v2 longer")
    assert input_stamp(clips, weights, None) != rebuilt
