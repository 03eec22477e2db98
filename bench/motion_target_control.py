"""Study (run by hand, not part of `make bench`): a control for `bench/motion_target_study.py`. Does MAM2's
motion head beat predicting zero when the frames make the motion target predictable?

The study's reading is that a frame difference is motion times the local image gradient, and that on the
demo's random textures the gradient under a hidden tube cannot be inferred from the visible ones, so zero
is close to the best guess. This control changes that one thing: the labelled videos are rendered with
`demo_data.textures=[flat]` (every object and the background one uniform colour: no pattern, grain or
brightness field), so a frame difference is non-zero only along moving edges, whose shape and motion the
visible tubes show. Everything else is the demo's: the same motions, seeds, decode, the shipped VQGAN's
codes, and `pretrain` with params.yaml, for `--steps` steps and each of `--seeds`.

Both arms are rendered without the real sample videos (`include_samples=false`), so they differ in the
textures alone: `mix` (the demo's texture families) and `flat`. Each runs the real stages (`demo_data`,
`decode`, `targets`, `pretrain`) into a scratch folder, MLflow off. The figures are pretrain's own
(metrics/pretrain.json: the mean over its last logged steps' batches): motion MSE against zero's on the same
batches, and code accuracy against the batch's most frequent code's.

Needs the tokenizer stage's output (artifacts/tokenizer/vqgan.pt: `dvc repro tokenizer` or `make demo`).
Writes bench/results/motion_target_control-<steps>steps-<device>.json; prints the figures last.

    python bench/motion_target_control.py [--steps 150] [--seeds 0 1 2] [--arms mix flat] [--threads 2]
                                          [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import print_figures, save_results  # noqa: E402
from pipeline.core.processes import thread_env  # noqa: E402
from pipeline.core.registry import module_name  # noqa: E402

ARMS = {"mix": "[noise, stripes, checker, dots, rings]", "flat": "[flat]"}
FIGURES = ("motion_mse", "motion_mse_baseline", "appearance_acc", "appearance_acc_baseline")


def run_stage(stage: str, sets: list[str], workdir: Path, threads: int) -> float:
    """One stage as `python -m stages.<stage>` in the project root, every path under `workdir`."""
    paths = {"raw": "raw", "motion_gt": "motion_gt", "clips": "clips.zarr", "targets": "targets.zarr",
             "reports": "reports", "metrics": "metrics", "artifacts": "artifacts", "runs": "runs"}
    command = [sys.executable, "-m", module_name(stage),
               *(arg for key, name in paths.items() for arg in ("--set", f"paths.{key}={workdir / name}")),
               *(arg for item in sets for arg in ("--set", item))]
    env = {**os.environ, "MAM2_MLFLOW": "0", **thread_env(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed in {workdir}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def run_arm(name: str, textures: str, root: Path, steps: int, seeds: list[int], threads: int) -> dict:
    """Render, decode and make targets once for the arm, then pre-train once per seed."""
    workdir = root / name
    (workdir / "artifacts").mkdir(parents=True, exist_ok=True)
    (workdir / "artifacts" / "tokenizer").symlink_to(ROOT / "artifacts" / "tokenizer")
    seconds = {"demo_data": run_stage("demo_data", [f"demo_data.textures={textures}",
                                                    "demo_data.include_samples=false",
                                                    "demo_data.motion_gt_clips=0"], workdir, threads)}
    for stage in ("decode", "targets"):
        seconds[stage] = run_stage(stage, [], workdir, threads)
    runs = []
    for seed in seeds:
        shutil.rmtree(workdir / "runs" / "pretrain", ignore_errors=True)
        seconds[f"pretrain_seed{seed}"] = run_stage(
            "pretrain", [f"pretrain.train.steps={steps}", f"pretrain.train.seed={seed}"], workdir, threads)
        metrics = json.loads((workdir / "metrics" / "pretrain.json").read_text())
        runs.append({"seed": seed, **{key: metrics[key] for key in FIGURES}})
        print(f"{name} seed {seed}: motion MSE {metrics['motion_mse']:.4f} (zero "
              f"{metrics['motion_mse_baseline']:.4f}), code accuracy {metrics['appearance_acc']:.3f} "
              f"(most frequent {metrics['appearance_acc_baseline']:.3f})", flush=True)
    return {"textures": textures, "runs": runs, "seconds": seconds}


def summary(arm: str, runs: list[dict]) -> dict:
    """Mean and std over seeds of each figure, and of motion MSE as a fraction of zero's."""
    out = {}
    ratio = [r["motion_mse"] / r["motion_mse_baseline"] for r in runs]
    for key, values in (*((k, [r[k] for r in runs]) for k in FIGURES), ("motion_mse_over_zero", ratio)):
        out[f"{arm}_{key}_mean"] = statistics.fmean(values)
        out[f"{arm}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="pre-training steps (the demo's: 150)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pre-training seeds")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of each stage")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS),
                        help="which arms to run")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a "
                        "temporary one)")
    args = parser.parse_args()
    if not (ROOT / "artifacts" / "tokenizer" / "vqgan.pt").exists():
        raise SystemExit("artifacts/tokenizer/vqgan.pt is missing: run `dvc repro tokenizer` (or make "
                         "demo) first")
    root = args.keep or Path(tempfile.mkdtemp(prefix="motion_target_control-"))
    try:
        arms = {name: run_arm(name, textures, root, args.steps, args.seeds, args.threads)
                for name, textures in ARMS.items() if name in args.arms}
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    figures = {"steps": args.steps, "seeds": len(args.seeds),
               **{k: v for name, arm in arms.items() for k, v in summary(name, arm["runs"]).items()}}
    record = {"steps": args.steps, "seeds": args.seeds, "threads": args.threads, "arms": arms,
              "figures": figures}
    device = save_results(f"motion_target_control-{args.steps}steps", record)
    print(f"\nmotion_target_control ({device}; mean and std over {len(args.seeds)} pre-training seeds)")
    print_figures(figures, width=40)


if __name__ == "__main__":
    main()
