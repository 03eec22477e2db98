"""bench/summary.py: each figure with a target is read from the newest results of each device kind and
marked met or not met; a figure no result file has is shown as not run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.summary import rows  # noqa: E402


def test_figures_are_read_per_device_and_judged_against_their_targets(tmp_path):
    (tmp_path / "decode-cpu2-x86_64.json").write_text(json.dumps(
        {"ratio_stage_1_worker_vs_bare": 0.95, "speedup_workers_2": 1.25}))
    (tmp_path / "targets-cuda-H100.json").write_text(json.dumps({"ratio_stage_vs_bare": 0.85}))
    table = {(what, device): (value, verdict) for what, device, value, _, verdict in rows(tmp_path)}
    assert table["decode: stage / bare decord, 1 worker", "cpu2-x86_64"] == ("0.95", "met")
    assert table["decode: 2 workers / 1 worker", "cpu2-x86_64"] == ("1.25", "NOT met")  # target 1.8
    assert table["targets: stage / bare encoder", "cuda-H100"] == ("0.85", "met")  # the GPU's target: 0.8
    assert table["targets: stage / bare encoder", "cpu"] == ("not run", "")  # no CPU targets file here
    assert table["pretrain: stage / bare step, ViT-B", "cuda"] == ("not run", "")
