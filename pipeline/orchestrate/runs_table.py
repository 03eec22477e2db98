"""`mam2 runs`: a table of the MLflow runs in the store and their headline numbers.

One row per run, newest first: when it started, its id, its parent (the flow run that launched
it), stage, status, duration, the pre-training objective, and its headline metrics (the last logged
value of each), each beside what it is judged against:

  tokenizer        psnr against the mean frame's (baseline_psnr), codebook_usage
  pretrain         final losses; appearance_acc and motion_mse beside their trivial baselines
  finetune         top1 and top5 (against a baseline when the stage logs one)
  motion_pretrain  flow_epe and the tracker's delta_avg beside zero motion's
  refine           motion_gt flow EPE and delta_avg (first queries), before -> after

Other stages show their `val/`, `test/`, `train/loss` and `data/` metrics. `--metric KEY`
(repeatable) shows chosen metrics as columns instead, e.g. `mam2 runs --stage pretrain --metric
train/loss` to compare mam2 and videomae pre-training. `--stage` takes a stage of the registry or
`pipeline` (flow runs).
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
from pipeline.core.registry import STAGES
from pipeline.core.stage_cli import USAGE_EXIT_CODE

KEY_PREFIXES = ("val/", "test/", "train/loss", "data/", "flow/")
MAX_KEY_METRICS = 5
RUN_KINDS = (*STAGES, "pipeline", "experiment")  # the `stage` tags runs carry


@dataclass(frozen=True)
class Headline:
    """One headline number: `label=value`, with `(vs baseline)` after it when the run logged one,
    or `before->value` when `before` is a metric of the model it started from."""

    label: str
    key: str
    baseline: tuple[str, ...] = ()  # the first of these keys the run logged
    before: str | None = None


def _refine(group: str, name: str, label: str) -> Headline:
    after = f"val/motion_gt/after/{group}/{name}"
    return Headline(label, after, before=after.replace("/after/", "/before/"))


HEADLINES: dict[str, tuple[Headline, ...]] = {
    "tokenizer": (Headline("psnr", "val/psnr", ("val/baseline_psnr",)),
                  Headline("codebook_usage", "val/codebook_usage")),
    "pretrain": (Headline("loss", "train/loss"), Headline("loss_appearance", "train/loss_appearance"),
                 Headline("appearance_acc", "train/appearance_acc", ("train/appearance_acc_baseline",)),
                 Headline("motion_mse", "train/loss_motion", ("train/motion_mse_baseline",)),
                 Headline("pixel_mse", "train/loss_pixel", ("train/pixel_mse_baseline",))),
    "finetune": (Headline("top1", "val/top1", ("val/top1_baseline", "val/baseline_top1",
                                               "val/majority_top1", "val/chance_top1")),
                 Headline("top5", "val/top5", ("val/top5_baseline", "val/baseline_top5")),
                 Headline("train_loss", "train/loss")),
    "motion_pretrain": (Headline("flow_epe", "val/flow_epe", ("val/flow_epe_zero_motion",)),
                        Headline("track_delta_avg", "val/track_delta_avg",
                                 ("val/track_delta_avg_zero_motion",))),
    "refine": (_refine("flow", "epe", "motion_gt_epe"),
               _refine("tracks_first", "delta_avg", "motion_gt_delta_avg")),
}


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


def headline_text(stage: str, metrics: dict[str, float]) -> str | None:
    """The stage's headline numbers that the run logged (`psnr=16.8 (vs 13.5)`), or None when
    the stage has none or the run logged none of them (it failed early)."""
    parts = []
    for head in HEADLINES.get(stage, ()):
        if head.key not in metrics:
            continue
        value = format_value(metrics[head.key])
        if head.before and head.before in metrics:
            value = f"{format_value(metrics[head.before])}->{value}"
        baseline = next((metrics[k] for k in head.baseline if k in metrics), None)
        parts.append(f"{head.label}={value}" + (f" (vs {format_value(baseline)})"
                                                 if baseline is not None else ""))
    return "  ".join(parts) or None


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
            cells.append(headline_text(row.stage, row.metrics)
                         or " ".join(f"{k}={format_value(row.metrics[k])}"
                                     for k in key_metrics(row.metrics)) or "-")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def main(argv: list[str] | None = None) -> int:
    """`mam2 runs [--stage S] [--last N] [--metric KEY ...]`."""
    parser = argparse.ArgumentParser(prog="mam2 runs", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", metavar="STAGE",
                        help=f"only runs of this stage: {', '.join(RUN_KINDS)} (pipeline: flow runs)")
    parser.add_argument("--last", type=int, metavar="N", help="only the newest N runs")
    parser.add_argument("--metric", dest="metrics", action="append", default=[], metavar="KEY",
                        help="show this metric as a column (repeatable)")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error("--last must be at least 1")
    if args.stage is not None and args.stage not in RUN_KINDS:  # a typo would print "no runs"
        print(f"mam2 runs: error: --stage {args.stage!r} is not a stage; valid: {', '.join(RUN_KINDS)}",
              file=sys.stderr)
        return USAGE_EXIT_CODE
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
