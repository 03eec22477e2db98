"""The MAM2 choices the paper does not settle, measured on the demo's pre-training: CAE's regressor
block, CAE's alignment loss, and the floor on the motion target's normalising std.

    python recipes/mam2_ablations.py [--seeds 0 1 2] [--variants default cae_block align ...]
                                     [--set section.key=value ...]

Pre-trains the demo's model (`pretrain` in params.yaml, with `--set` overrides) once per variant and
seed, each variant setting one choice to one value (a variant params.yaml already makes is the default
row itself and is not run twice), under `runs/mam2_ablations/<variant>/
seed_<n>/` (never a DVC output; a finished run with the same settings is reused). Needs the demo's
clips and targets (`dvc repro targets`). Each pre-training target is scored against its trivial
baseline on the same batches (code accuracy against the batch's most frequent code; motion MSE
against predicting zero), as `metrics/pretrain.json` is. Writes `reports/mam2_ablations.md`: mean +-
std over seeds per variant and, per ablation, its code accuracy minus the default's paired by seed.

The rule, fixed before the runs: an ablation is worth making the default only if its code accuracy
beats the default's on every seed. The downstream top-1 cannot decide it at the demo's size: on the
former demo style every encoder fine-tuned to chance, and on the current one every pre-trained encoder
fine-tunes worse than a random start (`reports/mam2_vs_videomae.md`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.atomic import atomic_file, write_json  # noqa: E402
from pipeline.core.fingerprint import fingerprint  # noqa: E402
from pipeline.core.params import Paths, apply_overrides, read_params_file, validate_section  # noqa: E402
from pipeline.core.progress import setup_logging  # noqa: E402
from pipeline.orchestrate.experiment import pretrain_in  # noqa: E402
from recipes.mam2_proof import cell  # noqa: E402
from stages import pretrain  # noqa: E402

log = logging.getLogger("mam2_ablations")


@dataclass(frozen=True)
class Ablation:
    name: str
    change: dict  # pretrain params changed from params.yaml's
    what: str


ABLATIONS = (
    Ablation("default", {}, "params.yaml's pretrain section"),
    Ablation("prenorm_block", {"regressor_block": "prenorm"}, "a pre-norm regressor block"),
    Ablation("cae_block", {"regressor_block": "cae"}, "CAE's regressor block (post-norm MLP branch)"),
    Ablation("align", {"align_weight": 2.0}, "CAE's alignment loss, weight 2"),
    Ablation("no_std_floor", {"motion_min_std": 0.0}, "no floor on the motion target's normalising std"),
)
SCORES = ("appearance_acc", "appearance_acc_baseline", "motion_mse", "motion_mse_baseline")


def run_one(ablation: Ablation, base: pretrain.Params, paths: Paths, seed: int, root: Path) -> dict:
    """Pre-train one variant with one seed (or reuse the finished run with the same settings)."""
    params = base.model_copy(update={**ablation.change,
                                     "train": base.train.model_copy(update={"seed": seed})})
    folder = root / ablation.name / f"seed_{seed}"
    signature = fingerprint(params, paths)
    done = folder / "result.json"
    if done.exists() and json.loads(done.read_text()).get("signature") == signature:
        log.info("%s seed %d: already done (%s)", ablation.name, seed, done)
        return json.loads(done.read_text())
    tick = time.perf_counter()
    stats = pretrain_in(folder, params, paths,
                        tags={"experiment": "mam2_ablations", "variant": ablation.name, "seed": str(seed)})
    row = {"variant": ablation.name, "seed": seed, "signature": signature,
           "seconds": round(time.perf_counter() - tick, 1), **{key: stats[key] for key in SCORES}}
    write_json(done, row)
    return row


def render(rows: dict[str, list[dict]], base: pretrain.Params, seeds: list[int]) -> str:
    settings = (f"regressor_block {base.regressor_block}, align_weight {base.align_weight:g}, "
                f"motion_min_std {base.motion_min_std:.4g}")
    lines = ["# MAM2 ablations: the choices the paper does not settle", "",
             f"`python recipes/mam2_ablations.py --seeds {' '.join(map(str, seeds))}`: the demo's "
             f"pre-training ({base.model}, depth {base.depth}, {base.num_frames} x {base.input_size}², "
             f"mask {base.mask} {base.mask_ratio}, {base.train.steps} steps of {base.train.batch_size}), "
             "one setting changed per row, mean ± std over seeds (sample std). Scores are the means of the "
             "last logged training batches, each beside its trivial baseline on the same batches. "
             f"The default row is params.yaml's ({settings}); a variant that params.yaml already sets is "
             "that row.", "",
             "| variant | change | code accuracy | most frequent code | motion MSE | zero motion | s / run |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for ablation in ABLATIONS:
        if ablation.name not in rows:
            continue
        r = rows[ablation.name]
        lines.append(f"| {ablation.name} | {ablation.what} | "
                     + " | ".join(cell([row[key] for row in r], 4) for key in SCORES)
                     + f" | {np.mean([row['seconds'] for row in r]):.0f} |")
    lines += ["", "## Each ablation against the default, paired by seed", ""]
    default = {row["seed"]: row for row in rows.get("default", [])}
    for ablation in ABLATIONS[1:]:
        if ablation.name not in rows or not default:
            continue
        pairs = [(row, default[row["seed"]]) for row in rows[ablation.name] if row["seed"] in default]
        diff = [a["appearance_acc"] - d["appearance_acc"] for a, d in pairs]
        wins = sum(d > 0 for d in diff)
        verdict = ("beats the default on every seed: worth making the default" if wins == len(pairs)
                   else "does not beat the default on every seed: the default stays")
        lines.append(f"- **{ablation.name}**: code accuracy minus the default's {cell(diff, 4)} "
                     f"(higher on {wins} of {len(pairs)} seeds); {verdict}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=[a.name for a in ABLATIONS],
                        default=[a.name for a in ABLATIONS])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "mam2_ablations")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "mam2_ablations.md")
    args = parser.parse_args()
    setup_logging()
    doc = apply_overrides(read_params_file(REPO / "params.yaml"), args.overrides)
    paths = validate_section(doc, "paths", Paths)
    base = validate_section(doc, "pretrain", pretrain.Params)
    rows: dict[str, list[dict]] = {}
    for ablation in (a for a in ABLATIONS if a.name in args.variants):
        if ablation.change and base.model_copy(update=ablation.change) == base:
            log.info("%s: params.yaml already sets %s: the default row", ablation.name, ablation.change)
            continue
        rows[ablation.name] = [run_one(ablation, base, paths, seed, args.root) for seed in args.seeds]
    report = render(rows, base, args.seeds)
    with atomic_file(args.report) as tmp:
        tmp.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
