"""A stage's results on disk, split the way DVC compares them.

The full structured result (per-class lists, confusion matrices, paths, timings, nested before/after
tables) goes to `reports/<stage>/results.json`, a cached DVC output; its headline scalars go to
`metrics/<stage>.json`, a small git-tracked DVC metrics file that `dvc exp show` and
`dvc metrics diff` turn into columns. A stage names its headline as a list of keys of the result or as
a mapping `{metric name: dotted path into the result}` (`"motion_gt.after.flow.epe"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json

RESULTS_FILE = "results.json"
Headline = Sequence[str] | Mapping[str, str]


def lookup(result: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted `path` of a nested mapping, None where any part is missing."""
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def headline_metrics(result: Mapping[str, Any], headline: Headline) -> dict[str, float | int]:
    """The headline scalars of `result`, in `headline` order.

    Keys the result lacks (or holds as None) are left out: a stage's result depends on its settings
    (VideoMAE pre-training has no appearance accuracy). A value that is not a number is a ValueError:
    lists, strings and tables belong in the results file, never in a metrics column.
    """
    names = headline if isinstance(headline, Mapping) else {key: key for key in headline}
    metrics: dict[str, float | int] = {}
    for name, path in names.items():
        value = lookup(result, path)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"headline metric {name!r} ({path}) is not a number: {value!r}")
        metrics[name] = value
    return metrics


def write_results(result: Mapping[str, Any], *, reports: Path, metrics: Path, headline: Headline,
                  name: str = RESULTS_FILE) -> dict[str, Path]:
    """Write `result` to `reports`/`name` and its headline scalars to the metrics file `metrics`.

    Returns both paths ({"results": ..., "metrics": ...}). Each file is written atomically.
    """
    results = write_json(Path(reports) / name, dict(result))
    return {"results": results, "metrics": write_json(metrics, headline_metrics(result, headline))}
