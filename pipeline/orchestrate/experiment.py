"""The MAM2-vs-VideoMAE experiment: does MAM2 match VideoMAE with half the pre-training epochs?

    python -m pipeline.orchestrate.experiment mam2-vs-videomae [--epochs E] [--set section.key=value ...]

Pre-trains with `objective: mam2` and `objective: videomae` for E and E/2 epochs on the same data
(`stages.pretrain.run`), fine-tunes each encoder identically (`stages.finetune.run`, `init: pretrain`),
adds a from-scratch fine-tune of the same architecture, and writes a table of top-1 / top-5 and wall
times to `reports/mam2_vs_videomae.md`. Settings come from `params.yaml` (`pretrain`, `finetune`,
`paths`) with `--set` overrides; E is `--epochs`, else `pretrain.epochs`; when neither is set, E is
`pretrain.train.steps` optimiser steps and E/2 half of them. Each variant works in its own folder
`runs/experiment/<variant>/` (artifacts, metrics, reports, resumable state), so variants never clash and
a killed experiment resumes: finished variants are kept (their `result.json`), the others continue from
their checkpoints. Every stage execution is an MLflow run tagged experiment=mam2_vs_videomae and
variant=<name>; a final run `experiment` holds the table.

This module orchestrates stages, so it sits above them (like the Prefect flows).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.core.atomic import atomic_file, write_json
from pipeline.core.errors import StageError, require
from pipeline.core.fingerprint import fingerprint
from pipeline.core.mlflow_runs import current_run, mlflow_run
from pipeline.core.params import (
    DEFAULT_PARAMS_FILE,
    ParamsError,
    Paths,
    StageParams,
    apply_overrides,
    read_params_file,
    validate_section,
)
from pipeline.core.progress import setup_logging
from pipeline.core.results import RESULTS_FILE
from stages import finetune, pretrain

log = logging.getLogger(__name__)

EXPERIMENT = "mam2_vs_videomae"
COMMAND = "mam2-vs-videomae"
# Architecture fields the finetune section shares with pretrain: the scratch run copies them.
ARCHITECTURE = ("model", "depth", "embed_dim", "num_heads", "patch_size", "tubelet_size")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a pre-training objective and length, or no pre-training (scratch)."""

    name: str
    objective: str | None
    fraction: float  # of E; 0 for scratch


VARIANTS = (Variant("mam2_E", "mam2", 1.0), Variant("mam2_E/2", "mam2", 0.5),
            Variant("videomae_E", "videomae", 1.0), Variant("videomae_E/2", "videomae", 0.5),
            Variant("scratch", None, 0.0))


class Settings(StageParams):
    """What the experiment run itself logs (the stages log their own params)."""

    epochs: float | None = Field(None, gt=0, description="E (null: pretrain.epochs, else train steps)")
    variants: list[str] = Field([v.name for v in VARIANTS], description="variants run")
    modes: list[Literal["full", "linear"]] = Field(["full"], min_length=1, description="how each encoder "
                                                   "is evaluated: full fine-tuning and/or a linear probe "
                                                   "(frozen encoder)")
    root: Path = Field(Path("runs/experiment"), description="one sub-folder per variant")
    report: Path = Field(Path(f"reports/{EXPERIMENT}.md"), description="the markdown table")


def run_experiment(*, params_file: Path | str = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None,
                   epochs: float | None = None, root: Path | str = Path("runs/experiment"),
                   report: Path | str = Path(f"reports/{EXPERIMENT}.md"), variants: list[str] | None = None,
                   modes: list[str] | None = None) -> Path:
    """Run every variant (or those named in `variants`), write the markdown table, return its path.
    Each row is also in `root`/<variant>/result.json."""
    doc = apply_overrides(read_params_file(params_file), list(overrides or []))
    paths = validate_section(doc, "paths", Paths)
    pre = validate_section(doc, "pretrain", pretrain.Params)
    fine = validate_section(doc, "finetune", finetune.Params)
    chosen = select_variants(variants)
    settings = Settings(epochs=epochs, variants=[v.name for v in chosen], root=Path(root),
                        report=Path(report), modes=list(modes or ["full"]))
    check_inputs(chosen, pre, paths)
    rows = [run_variant(v, pre, fine, paths, settings) for v in chosen]
    table = render_table(rows, pre, fine, settings)
    with atomic_file(settings.report) as tmp:
        tmp.write_text(table)
    with mlflow_run("experiment", settings, tags={"experiment": EXPERIMENT, "variant": "summary"}):
        for row in rows:
            key = row["variant"].replace("/", "_")
            top1 = {f"{key}/top1_{mode}": row[f"top1_{mode}"] for mode in settings.modes}
            current_run().log_metrics({**top1, f"{key}/wall_seconds": row["wall_seconds"]})
        current_run().log_artifact(settings.report)
    log.info("experiment %s: table in %s\n%s", EXPERIMENT, settings.report, table)
    return settings.report


def select_variants(names: list[str] | None) -> list[Variant]:
    if not names:
        return list(VARIANTS)
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StageError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in names]


def check_inputs(chosen: list[Variant], pre: pretrain.Params, paths: Paths) -> None:
    """Fail before any training when an input some variant needs is missing (not hours later)."""
    require(paths.clips, "clips store", "decode")
    targets = paths.targets
    needing = [v.name for v in chosen if needs_targets(v, pre)]
    if needing and not targets.exists():
        raise FileNotFoundError(f"targets store not found: {targets}, needed by {', '.join(needing)} "
                                "(run `mam2 tokenizer` and `mam2 targets` first, "
                                "or pick --variants without them)")


def needs_targets(variant: Variant, pre: pretrain.Params) -> bool:
    """Whether the variant's pre-training reads targets.zarr (codes, or stored RGB differences)."""
    if variant.objective is None:
        return False
    sampling = pretrain.sampling_for(pre.model_copy(update={"objective": variant.objective}))
    return sampling.codes or sampling.rgb_diff


def variant_params(variant: Variant, pre: pretrain.Params, fine: finetune.Params, epochs: float | None
                   ) -> tuple[pretrain.Params | None, finetune.Params]:
    """The pretrain params (None for scratch) and finetune params of one variant."""
    if variant.objective is None:
        return None, fine.model_copy(update={"init": "scratch", **{k: getattr(pre, k) for k in ARCHITECTURE}})
    full = epochs or pre.epochs
    update: dict = {"objective": variant.objective}
    if full is not None:
        update["epochs"] = full * variant.fraction
    else:  # no epochs anywhere: E is the configured number of steps
        update["train"] = pre.train.model_copy(
            update={"steps": max(1, math.ceil(pre.train.steps * variant.fraction))})
    return pre.model_copy(update=update), fine.model_copy(update={"init": "pretrain"})


# Per-target results of pre-training copied into each row: final losses beside their trivial baselines.
PRETRAIN_TARGETS = ("loss_appearance", "appearance_acc", "appearance_acc_baseline", "motion_mse",
                    "motion_mse_baseline", "loss_pixel", "pixel_mse_baseline")
# Where each evaluation mode works inside a variant's folder (full keeps the stage's own name).
MODE_FOLDERS = {"full": "finetune", "linear": "linear"}


def run_variant(variant: Variant, pre: pretrain.Params, fine: finetune.Params, paths: Paths,
                settings: Settings) -> dict:
    """Pre-train (unless scratch), then fine-tune and/or linearly probe one variant in its own folder;
    return its table row."""
    pre_v, fine_v = variant_params(variant, pre, fine, settings.epochs)
    folder = settings.root / variant.name.replace("/", "_")
    signature = work_fingerprint(pre_v, fine_v, paths, settings.modes)
    done = folder / "result.json"
    if done.exists() and json.loads(done.read_text()).get("signature") == signature:
        log.info("%s: already done (%s)", variant.name, done)
        return json.loads(done.read_text())
    # `objective` as `mam2 <stage>` tags it, so these runs line up with single-stage runs in the UI
    tags = {"experiment": EXPERIMENT, "variant": variant.name, "objective": variant.objective or "none"}
    row: dict = {"variant": variant.name, "objective": variant.objective or "none", "signature": signature,
                 "pretrain_seconds": 0.0, "pretrain_epochs": None, "pretrain_steps": 0,
                 "pretrain_gflops_per_clip": 0.0, "pretrain_tflops": 0.0}
    encoder = folder / "artifacts" / "pretrain" / "encoder.pt"
    if pre_v is not None:
        tick = time.perf_counter()
        stats = pretrain_in(folder, pre_v, paths, tags)
        row["pretrain_seconds"] = round(time.perf_counter() - tick, 1)
        gflops = stats["train_gflops_per_clip"]
        row.update(pretrain_epochs=round(stats["epochs"], 2), pretrain_steps=stats["steps"],
                   pretrain_gflops_per_clip=gflops,
                   pretrain_tflops=gflops * stats["steps"] * stats["batch_size"] / 1e3,
                   **{key: stats[key] for key in PRETRAIN_TARGETS if key in stats})
    row["finetune_seconds"] = 0.0
    for mode in settings.modes:
        name = MODE_FOLDERS[mode]
        fine_mode = fine_v.model_copy(update={"mode": mode})
        tick = time.perf_counter()
        with mlflow_run("finetune", fine_mode, tags={**tags, "mode": mode}):
            finetune.run(fine_mode, clips=paths.clips, encoder=encoder,
                         artifacts=folder / "artifacts" / name, run_dir=folder / "runs" / name,
                         metrics=folder / "metrics" / f"{name}.json", reports=folder / "reports" / name)
            seconds = round(time.perf_counter() - tick, 1)
            current_run().log_metrics({"experiment/pretrain_seconds": row["pretrain_seconds"],
                                       "experiment/finetune_seconds": seconds})
        scores = json.loads((folder / "reports" / name / RESULTS_FILE).read_text())
        k = min(5, len(scores["class_names"]))
        row.update({f"top1_{mode}": scores["top1"], f"top{k}_{mode}": scores[f"top{k}"], "k": k,
                    f"{mode}_seconds": seconds, "top1_majority": scores["top1_majority"],
                    "videos": scores["videos"]})
        row["finetune_seconds"] += seconds
    first = settings.modes[0]
    row.update(top1=row[f"top1_{first}"], topk=row[f"top{row['k']}_{first}"],
               wall_seconds=round(row["pretrain_seconds"] + row["finetune_seconds"], 1))
    write_json(done, row)
    return row


def pretrain_in(folder: Path, params: pretrain.Params, paths: Paths, tags: dict[str, str]) -> dict:
    """Pre-train with `params` inside `folder` (its artifacts/, runs/, metrics/ and reports/ hold the
    stage's outputs), as one MLflow run tagged `tags`; return the run's results.json."""
    with mlflow_run("pretrain", params, tags=tags):
        pretrain.run(params, clips=paths.clips, targets=paths.targets,
                     tokenizer=paths.artifacts_of("tokenizer") / "vqgan.pt",
                     artifacts=folder / "artifacts" / "pretrain", run_dir=folder / "runs" / "pretrain",
                     metrics=folder / "metrics" / "pretrain.json", reports=folder / "reports" / "pretrain")
    return json.loads((folder / "reports" / "pretrain" / RESULTS_FILE).read_text())


def work_fingerprint(pre: pretrain.Params | None, fine: finetune.Params, paths: Paths,
                     modes: list[str] = ("full",)) -> str:
    """Identifies a variant's settings: a result made with other settings is recomputed."""
    return fingerprint(pre, fine, paths, list(modes))


def render_table(rows: list[dict], pre: pretrain.Params, fine: finetune.Params, settings: Settings) -> str:
    """The report: a markdown table (one row per variant) and the setting it was measured in."""
    k = rows[0]["k"] if rows else 5
    lines = [f"# MAM2 vs VideoMAE ({EXPERIMENT})", "",
             "Pre-training objective and length vs fine-tuned accuracy, same data, encoder and fine-tuning "
             "recipe for every row. MAM2's claim (arXiv 2210.05234): MAM2 at E/2 epochs matches VideoMAE "
             "at E.",
             "",
             "| variant | objective | pre-train epochs | pre-train steps | GFLOP/clip | pre-train TFLOP "
             + "".join(f"| top-1 {mode} " for mode in settings.modes)
             + f"| top-{k} | pre-train s | evaluation s | total s |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(settings.modes) + "---:|---:|---:|---:|"]
    for r in rows:
        epochs = "-" if r["pretrain_epochs"] is None else f"{r['pretrain_epochs']:g}"
        lines.append(f"| {r['variant']} | {r['objective']} | {epochs} | {r['pretrain_steps']} "
                     f"| {r['pretrain_gflops_per_clip']:.2f} | {r['pretrain_tflops']:.3f} "
                     + "".join(f"| {r[f'top1_{mode}']:.3f} " for mode in settings.modes)
                     + f"| {r['topk']:.3f} | {r['pretrain_seconds']:.0f} "
                     f"| {r['finetune_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    if rows:
        lines += ["", f"Most frequent class: {rows[0]['top1_majority']:.3f} of {rows[0]['videos']} videos."]
    length = f"{fine.train.steps} steps" if fine.epochs is None else f"{fine.epochs:g} epochs"
    lines += ["", f"Encoder: {pre.model} (depth {pre.depth}, width {pre.embed_dim or 'default'}), "
              f"{pre.num_frames} frames at {pre.input_size}px for pre-training; fine-tuning: {fine.mode}, "
              f"{fine.num_frames} frames at {fine.input_size}px, {length}, batch {fine.train.batch_size}. "
              f"Top-1 is per video, averaged over every stored clip x {fine.eval_clips} temporal windows x "
              f"{fine.eval_crops} crops of the {fine.eval_split} split.",
              "Input normalisation: " + (
                  f"{pre.input_norm} (pretrain.input_norm) for the pre-trained encoders; ImageNet mean/std "
                  "from scratch." if fine.input_norm == "auto" else f"{fine.input_norm} for every row."),
              f"Runs: {settings.root}/<variant>/ (metrics, reports, artifacts).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.orchestrate.experiment mam2-vs-videomae [...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestrate.experiment",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[COMMAND])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, metavar="FILE",
                        help="params YAML file (pretrain, finetune and paths sections)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one param for every variant; repeatable")
    parser.add_argument("--epochs", type=float, default=None,
                        help="E (default: pretrain.epochs or its steps)")
    parser.add_argument("--root", type=Path, default=Path("runs/experiment"), help="one folder per variant")
    parser.add_argument("--report", type=Path, default=Path(f"reports/{EXPERIMENT}.md"),
                        help="markdown table")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of "
                        f"{','.join(v.name for v in VARIANTS)}")
    parser.add_argument("--modes", default="full", help="comma-separated evaluations of each encoder: "
                        "full (fine-tuning) and/or linear (a probe on the frozen encoder)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        path = run_experiment(params_file=args.params, overrides=args.overrides, epochs=args.epochs,
                              root=args.root, report=args.report,
                              variants=args.variants.split(",") if args.variants else None,
                              modes=args.modes.split(","))
    except ParamsError as err:
        print(f"{COMMAND}: {err}", file=sys.stderr)
        return 2
    except (StageError, FileNotFoundError) as err:
        print(f"{COMMAND}: error: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
