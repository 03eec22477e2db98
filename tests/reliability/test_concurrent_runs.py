"""Two runs on one output: the second is refused at once, naming the holder, and the first's output
is complete; shards share the lock with each other but never with a whole-stage run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.locks import output_lock_path
from tests.reliability.helpers import REPO, decode_sets, error_lines, run_stage, stage_command, stage_env

HOLD = ("import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.core.locks import output_lock\n"
        "with output_lock(Path(sys.argv[1]), shared=sys.argv[2] == 'shared'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")


def hold_lock(path: Path, shared: bool = False) -> subprocess.Popen:
    """A process holding the outputs lock at `path`, as a running stage would."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "shared" if shared else "alone"],
                               cwd=REPO, stdout=subprocess.PIPE, text=True, env=stage_env())
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_is_refused_at_once_and_touches_nothing(video_project):
    holder = hold_lock(output_lock_path(video_project / "runs", "decode"))
    try:
        started = time.perf_counter()
        result = run_stage(video_project, "decode", *decode_sets(video_project))
        took = time.perf_counter() - started
    finally:
        holder.kill()
        holder.wait()
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "in use by a run" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert took < 30, "refused at once, not after planning"
    assert not (video_project / "clips.zarr").exists()
    assert not (video_project / ".clips.zarr.partial").exists()


def test_shards_share_the_lock_but_a_whole_run_waits_for_them(video_project):
    holder = hold_lock(output_lock_path(video_project / "runs", "decode"), shared=True)
    try:
        shard = run_stage(video_project, "decode", *decode_sets(video_project), extra=("--shard", "0/2"))
        whole = run_stage(video_project, "decode", *decode_sets(video_project))
    finally:
        holder.kill()
        holder.wait()
    assert shard.returncode == 0, shard.stderr
    assert whole.returncode == 1 and "in use by a shard run" in error_lines(whole.stderr)[0]
    finished = run_stage(video_project, "decode", *decode_sets(video_project))  # the holder is gone
    assert finished.returncode == 0, finished.stderr


def test_two_runs_started_together_leave_one_complete_store(video_project):
    reference = run_stage(video_project, "decode", *decode_sets(video_project, "ref.zarr"),
                          f"paths.runs={video_project / 'ref_runs'}")
    assert reference.returncode == 0, reference.stderr
    command = stage_command("decode", *decode_sets(video_project))
    runs = [subprocess.Popen(command, cwd=video_project, env=stage_env(), stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    codes = [run.wait(timeout=300) for run in runs]
    errors = [run.stderr.read() for run in runs]
    assert 0 in codes, errors
    for code, stderr in zip(codes, errors, strict=True):
        assert code == 0 or "in use by" in error_lines(stderr)[0], stderr
    ref = zarr.open_group(str(video_project / "ref.zarr"), mode="r")
    out = zarr.open_group(str(video_project / "clips.zarr"), mode="r")
    for name in ("frames", "label", "video", "start", "split"):
        assert np.array_equal(ref[name][:], out[name][:]), name
    assert not (video_project / ".clips.zarr.partial").exists()
