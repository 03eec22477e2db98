"""Shard helpers: specs parse strictly, shards split work disjointly and completely, the store is
planned exactly once however many shards start together, and markers survive across processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import stages.decode
import stages.demo_data
from pipeline.core.locks import file_lock
from pipeline.core.shards import (
    ProgressMarkers,
    Shard,
    ShardError,
    finish_plan,
    lock_path,
    parse_shard,
    plan_once,
    read_plan,
    supports_shards,
)

REPO = Path(__file__).resolve().parents[3]


def test_parse_shard_accepts_i_of_n_and_rejects_the_rest():
    assert parse_shard("0/4") == Shard(0, 4) and str(parse_shard(" 3/4 ")) == "3/4"
    for bad in ("4/4", "-1/2", "1/0", "1", "a/b", "1/2/3", ""):
        with pytest.raises(ShardError, match="expected i/n"):
            parse_shard(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_item(count):
    items = list(range(20))
    parts = [Shard(i, count).select(items) for i in range(count)]
    assert sorted(x for part in parts for x in part) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1, "shards are balanced"


def test_chunk_rows_never_split_a_chunk_between_shards():
    num_rows, per_chunk = 23, 4
    owned = [Shard(i, 3).chunk_rows(num_rows, per_chunk) for i in range(3)]
    rows = sorted(r for ranges in owned for rng in ranges for r in rng)
    assert rows == list(range(num_rows))
    chunks_of = [{r // per_chunk for rng in ranges for r in rng} for ranges in owned]
    assert not (chunks_of[0] & chunks_of[1]) and not (chunks_of[1] & chunks_of[2])
    assert not (chunks_of[0] & chunks_of[2])
    assert all(rng.start % per_chunk == 0 for ranges in owned for rng in ranges)


def test_file_lock_excludes_threads(tmp_path):
    inside, overlaps = [0], []

    def worker():
        for _ in range(5):
            with file_lock(tmp_path / "x.lock"):
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(0.01)
                inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 20 and set(overlaps) == {1}


def test_file_lock_excludes_other_processes(tmp_path):
    lock = tmp_path / "y.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from pipeline.core.locks import file_lock\n"
         "with file_lock(sys.argv[2]):\n print('held', flush=True); time.sleep(1.0)",
         str(REPO), str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with file_lock(lock):
        waited = time.perf_counter() - start
    holder.wait()
    assert waited > 0.5, "the lock was taken while another process held it"


def test_plan_once_plans_once_for_concurrent_shards(tmp_path):
    partial, calls, results = tmp_path / ".store.partial", [], []

    def create(directory: Path) -> dict:
        calls.append(directory)
        time.sleep(0.2)  # long enough for the other shards to arrive while planning
        (directory / "data").write_text("layout")
        return {"rows": 10}

    def shard():
        results.append(plan_once(partial, "sig-1", create))

    threads = [threading.Thread(target=shard) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert [plan for plan, _ in results] == [{"rows": 10}] * 4
    assert sorted(resumed for _, resumed in results) == [False, True, True, True]
    assert read_plan(partial, "sig-1") == {"rows": 10} and read_plan(partial, "sig-2") is None


def test_plan_once_replans_for_new_signature_or_after_a_failed_plan(tmp_path):
    partial = tmp_path / ".store.partial"
    plan_once(partial, "a", lambda d: (d / "old").write_text("x") and {"v": 1})
    ProgressMarkers(partial).mark_done(3)

    def broken(directory: Path) -> dict:
        (directory / "half").write_text("x")
        raise RuntimeError("killed while planning")

    with pytest.raises(RuntimeError):
        plan_once(partial, "b", broken)
    assert read_plan(partial, "b") is None and read_plan(partial, "a") is None
    plan, resumed = plan_once(partial, "b", lambda d: {"v": 2})
    assert plan == {"v": 2} and not resumed
    assert not (partial / "old").exists() and not (partial / "half").exists()
    assert not ProgressMarkers(partial).settled(3), "markers of the old plan are gone"
    finish_plan(partial)
    assert not (partial / "_progress").exists() and not lock_path(partial).exists()


def test_progress_markers(tmp_path):
    markers = ProgressMarkers(tmp_path)
    markers.mark_done(1)
    markers.mark_failed(2, "decode failed: truncated")
    assert markers.settled(1) and markers.settled(2) and not markers.settled(3)
    assert markers.pending([1, 2, 3, 4], key=lambda x: x) == [3, 4]
    assert ProgressMarkers(tmp_path).failures() == {"2": "decode failed: truncated"}


def test_supports_shards_reads_run_from_paths_signature():
    assert supports_shards(stages.decode)
    assert not supports_shards(stages.demo_data)


def test_cli_rejects_bad_shard_and_hides_it_where_unsupported(capsys):
    from pipeline.core import stage_cli

    with pytest.raises(SystemExit) as exit_info:
        stage_cli.main(stages.decode, ["--shard", "2/2"])
    assert exit_info.value.code == 2
    assert "--shard: shard 2/2: expected i/n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage_cli.main(stages.demo_data, ["--shard", "0/2"])
    assert "unrecognized arguments: --shard" in capsys.readouterr().err
