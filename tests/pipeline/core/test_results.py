"""A stage's result splits into the full results file (reports/) and its headline scalars (metrics/)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.results import headline_metrics, lookup, write_results

RESULT = {"top1": 0.5, "top5": 1.0, "videos": 16, "class_names": ["a", "b"], "confusion": [[1, 0], [0, 1]],
          "init": "artifacts/pretrain/encoder.pt", "motion_gt": {"after": {"flow": {"epe": 1.25}}}}


def test_lookup_follows_dotted_paths_and_misses_quietly():
    assert lookup(RESULT, "motion_gt.after.flow.epe") == 1.25
    assert lookup(RESULT, "motion_gt.before.flow.epe") is None
    assert lookup(RESULT, "top1.x") is None  # a scalar has no keys
    assert lookup(RESULT, "videos") == 16


def test_headline_keeps_only_the_named_scalars_in_order():
    assert list(headline_metrics(RESULT, ("top5", "top1", "videos"))) == ["top5", "top1", "videos"]
    renamed = headline_metrics(RESULT, {"epe_after": "motion_gt.after.flow.epe", "epe_before":
                                        "motion_gt.before.flow.epe"})
    assert renamed == {"epe_after": 1.25}, "absent keys (another objective, another target) are left out"


@pytest.mark.parametrize("key", ["class_names", "confusion", "init", "motion_gt"])
def test_a_structured_value_is_refused_as_a_headline(key):
    with pytest.raises(ValueError, match=key):
        headline_metrics(RESULT, (key,))


def test_write_results_writes_both_files(tmp_path):
    out = write_results(RESULT, reports=tmp_path / "reports" / "finetune",
                        metrics=tmp_path / "metrics" / "finetune.json", headline=("top1", "top5"))
    assert out == {"results": tmp_path / "reports" / "finetune" / "results.json",
                   "metrics": tmp_path / "metrics" / "finetune.json"}
    assert json.loads(out["results"].read_text()) == RESULT
    assert json.loads(out["metrics"].read_text()) == {"top1": 0.5, "top5": 1.0}
    named = write_results(RESULT, reports=tmp_path / "r", metrics=tmp_path / "m.json", headline=(),
                          name="stats.json")
    assert named["results"].name == "stats.json" and json.loads(named["metrics"].read_text()) == {}
