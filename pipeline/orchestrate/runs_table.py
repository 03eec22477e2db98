"""`mam2 runs`: a table of the MLflow runs in the store and their key metrics.

One row per run, newest first: when it started, its id, its parent (the flow run that launched
it), stage, status, duration, the pre-training objective, and its key metrics (the last logged
value of each). Key metrics are, by default, the `val/` and `test/` metrics, then `train/loss`
and the `data/` counts; `--metric KEY` (repeatable) shows chosen metrics as columns instead, e.g.
`mam2 runs --stage pretrain --metric train/loss` to compare mam2 and videomae pre-training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.mlflow_runs import DEFAULT_EXPERIMENT, tracking_uri

KEY_PREFIXES = ("val/", "test/", "train/loss", "data/", "flow/")
MAX_KEY_METRICS = 5


@dataclass(frozen=True)
class RunRow:
    """What the table shows of one MLflow run."""

    run_id: str
    parent_id: str
    stage: str
    status: str
    started: dt.datetime
    seconds: float | None
    objective: str
    metrics: dict[str, float] = field(default_factory=dict)


def fetch_runs(*, stage: str | None = None, last: int | None = None, uri: str | None = None,
               experiment: str | None = None) -> list[RunRow]:
    """Runs of the experiment, newest first; `stage` keeps one stage's runs, `last` the newest N."""
    uri = uri or tracking_uri()
    if not store_exists(uri):
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment or experiment_name())
    if found is None:
        return []
    if stage is not None and not re.fullmatch(r"[\w-]+", stage):
        raise ValueError(f"stage {stage!r}: expected a stage name")  # it goes into a filter string
    query = f"tags.stage = '{stage}'" if stage else ""
    runs = client.search_runs([found.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"], max_results=last or 1000)
    return [_row(run) for run in runs]


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is missing (opening it would create an empty one)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).exists()
    return True


def _row(run) -> RunRow:
    info, tags = run.info, run.data.tags
    end = info.end_time
    return RunRow(run_id=info.run_id, parent_id=tags.get("mlflow.parentRunId", ""),
                  stage=tags.get("stage", info.run_name or ""), status=info.status,
                  started=dt.datetime.fromtimestamp(info.start_time / 1000),
                  seconds=(end - info.start_time) / 1000 if end else None,
                  objective=tags.get("objective", ""), metrics=dict(run.data.metrics))


def key_metrics(metrics: dict[str, float]) -> list[str]:
    """The metrics worth a glance, in KEY_PREFIXES order, at most MAX_KEY_METRICS of them."""
    keys = [k for prefix in KEY_PREFIXES for k in sorted(metrics) if k.startswith(prefix)]
    return list(dict.fromkeys(keys))[:MAX_KEY_METRICS]


def format_value(value: float) -> str:
    """Compact number: integers as such, others with 4 significant digits."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e12 else f"{value:.4g}"


def format_table(rows: Sequence[RunRow], metric_keys: Sequence[str] = ()) -> str:
    """Fixed-width text table; chosen `metric_keys` become columns, else one `metrics` column."""
    header = ["started", "run", "parent", "stage", "status", "time", "objective"]
    header += list(metric_keys) or ["metrics"]
    table = [header]
    for row in rows:
        cells = [row.started.strftime("%Y-%m-%d %H:%M:%S"), row.run_id[:8], row.parent_id[:8] or "-",
                 row.stage, row.status, f"{row.seconds:.1f}s" if row.seconds is not None else "-",
                 row.objective or "-"]
        if metric_keys:
            cells += [format_value(row.metrics[k]) if k in row.metrics else "-" for k in metric_keys]
        else:
            cells.append(" ".join(f"{k}={format_value(row.metrics[k])}"
                                  for k in key_metrics(row.metrics)) or "-")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def main(argv: list[str] | None = None) -> int:
    """`mam2 runs [--stage S] [--last N] [--metric KEY ...]`."""
    parser = argparse.ArgumentParser(prog="mam2 runs", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", help="only runs of this stage (`pipeline` for flow runs)")
    parser.add_argument("--last", type=int, metavar="N", help="only the newest N runs")
    parser.add_argument("--metric", dest="metrics", action="append", default=[], metavar="KEY",
                        help="show this metric as a column (repeatable)")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error("--last must be at least 1")
    uri = tracking_uri()
    try:
        rows = fetch_runs(stage=args.stage, last=args.last, uri=uri)
    except ValueError as err:
        parser.error(str(err))
    if not rows:
        what = f" of stage {args.stage!r}" if args.stage else ""
        print(f"no runs{what} in {uri} (experiment {experiment_name()!r})", file=sys.stderr)
        return 0
    print(format_table(rows, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
