"""Study: which flow pre-training recipe beats zero motion on motion_gt, and what it costs on CPU.

Each recipe (steps, RAFT updates per training pass, frames rendered per sample, learning rate, batch)
trains RAFT with the motion_pretrain stage's own code (`obtain_flow_model`: synthetic pre-training
pairs, the shared training loop, one-cycle AdamW) and is scored on `data/motion_gt/` exactly as the
stage scores it (`evaluate_flow`). The reference in the same run is zero motion: the figure is the
ratio EPE / zero-motion EPE (below 1 beats it). Recipes run as parallel processes sharing the device
(a GPU makes a sweep fast; the results carry over to CPU training step for step).

`--time-cpu` instead times a few training steps of each distinct (updates, frames, batch) on this
machine's CPU through the same loop, so step counts turn into CPU seconds for the demo's budget.

Writes bench/results/flow_budget-<device>.json (or flow_budget_cpu_steps-<device>.json); prints a
table last.

    python bench/flow_budget.py [--motion-gt data/motion_gt] [--parallel 8] [--recipe 600:4:2:1e-3:4 ...]
    python bench/flow_budget.py --recipe 200:8:4:4e-4:4:1@flow_model=raft_large   # other stage params after @
    python bench/flow_budget.py --time-cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

import torch  # noqa: E402

from bench.results_file import save_results  # noqa: E402

# The demo's recipe today, then cheaper steps (4 updates, 2-frame clips) at three budgets and rates.
DEFAULT_RECIPES = ("200:8:4:4e-4:4",
                   "300:4:2:4e-4:4", "300:4:2:1e-3:4", "300:4:2:2e-3:4",
                   "600:4:2:4e-4:4", "600:4:2:1e-3:4", "600:4:2:2e-3:4", "600:4:2:1e-3:8",
                   "1200:4:2:4e-4:4", "1200:4:2:1e-3:4")


@dataclass(frozen=True)
class Recipe:
    steps: int
    updates: int
    frames: int
    lr: float
    batch: int
    seed: int = 0
    extra: str = ""  # other motion_pretrain params, "key=value,key=value"

    @classmethod
    def parse(cls, text: str) -> Recipe:
        shape, _, extra = text.partition("@")
        try:
            steps, updates, frames, lr, batch, *seed = shape.split(":")
            recipe = cls(int(steps), int(updates), int(frames), float(lr), int(batch), *map(int, seed),
                         extra=extra)
            recipe.params(0)  # a bad extra param fails here, naming the key
            return recipe
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(f"recipe {text!r} is not steps:updates:frames:lr:batch[:seed]"
                                             f"[@key=value,...]: {err}") from err

    def params(self, workers: int, precision: str = "auto"):
        """The stage's params for this recipe; the @ part is applied on top as `--set
        motion_pretrain.<key>=<value>` would be (nested keys too: flow_train.warmup_steps=5)."""
        from pipeline.core.params import apply_overrides
        from stages.motion_pretrain import Params

        recipe = {"flow_updates": self.updates, "flow_clip_frames": self.frames,
                  "flow_train": {"steps": self.steps, "batch_size": self.batch, "base_lr": self.lr,
                                 "workers": workers, "checkpoint_every": self.steps,
                                 "log_every": max(1, self.steps // 10), "system_metrics_every": None,
                                 "seed": self.seed, "precision": precision}}
        extra = [f"motion_pretrain.{item}" for item in self.extra.split(",") if item]
        return Params(**apply_overrides({"motion_pretrain": recipe}, extra)["motion_pretrain"])


def train_and_score(recipe: Recipe, motion_gt: Path, workers: int, eval_updates: tuple[int, ...],
                    precision: str = "auto") -> dict:
    """Train one recipe in a scratch directory and score it on motion_gt with each number of RAFT
    updates in `eval_updates` (the first is the headline); runs in a child process."""
    from stages.motion_pretrain import evaluate_flow, obtain_flow_model

    torch.set_num_threads(1)
    params = recipe.params(workers, precision)
    with tempfile.TemporaryDirectory(prefix="flow-budget-") as work:
        (Path(work) / "reports").mkdir()
        start = time.perf_counter()
        model = obtain_flow_model(params, Path(work) / "run", Path(work) / "reports")
        train_s = time.perf_counter() - start
        by_updates = {u: evaluate_flow(model, motion_gt / "gt.zarr", params.model_copy(
            update={"eval_flow_updates": u})) for u in eval_updates}
    scores = by_updates[eval_updates[0]]
    return {**asdict(recipe), "train_s": round(train_s, 1), "epe": scores["flow_epe"],
            **{f"epe_at_{u}_updates": s["flow_epe"] for u, s in by_updates.items()},
            "epe_zero_motion": scores["flow_epe_zero_motion"],
            "epe_ratio": scores["flow_epe"] / scores["flow_epe_zero_motion"],
            "acc_1px": scores["flow_acc_1px"]}


def time_cpu_steps(recipe: Recipe, steps: int = 8) -> float:
    """CPU seconds per training step of `recipe`'s shape, through the stage's training code."""
    from stages.motion_pretrain import obtain_flow_model

    params = replace(recipe, steps=steps, seed=0).params(0)
    with tempfile.TemporaryDirectory(prefix="flow-budget-") as work:
        run_dir = Path(work) / "run"
        (Path(work) / "reports").mkdir()
        obtain_flow_model(params, run_dir, Path(work) / "reports")
        rows = (run_dir / "history.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    column = next(i for i, name in enumerate(header) if name.endswith("_per_s"))
    return recipe.batch / float(last[column])  # the last step's throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motion-gt", type=Path, default=Path("data/motion_gt"))
    parser.add_argument("--recipe", type=Recipe.parse, action="append",
                        help="steps:updates:frames:lr:batch[:seed][@key=value,...] (repeatable; the @ part "
                        "sets other motion_pretrain params, e.g. @flow_model=raft_large; default: a built-in "
                        "sweep)")
    parser.add_argument("--parallel", type=int, default=None, help="recipes at once (default: 1 on CPU, "
                        "all on a GPU)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per recipe")
    parser.add_argument("--eval-updates", default="8", help="comma-separated RAFT updates when scoring "
                        "(the first is the headline; the stage uses eval_flow_updates, 8)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="training precision (auto: bf16 autocast on a GPU, fp32 on CPU as the stage "
                        "trains)")
    parser.add_argument("--time-cpu", action="store_true", help="time CPU training steps instead")
    args = parser.parse_args()
    recipes = args.recipe or [Recipe.parse(r) for r in DEFAULT_RECIPES]
    if args.time_cpu:
        shapes = {(r.updates, r.frames, r.batch): r for r in recipes}  # the rate does not change the cost
        rows = [{"updates": u, "frames": f, "batch": b, "cpu_step_s": time_cpu_steps(r)}
                for (u, f, b), r in sorted(shapes.items())]
        device = save_results("flow_budget_cpu_steps",
                              {"torch_threads": torch.get_num_threads(), "rows": rows})
        print(f"flow training step on {device} ({torch.get_num_threads()} threads)")
        for row in rows:
            print(f"  updates {row['updates']}  frames {row['frames']}  batch {row['batch']}: "
                  f"{row['cpu_step_s']:.3f} s/step")
        return
    if not (args.motion_gt / "gt.zarr").exists():
        raise SystemExit(f"{args.motion_gt}/gt.zarr not found: run `mam2 demo_data` first")
    cuda = torch.cuda.is_available()
    parallel = args.parallel or (len(recipes) if cuda else 1)
    start = time.perf_counter()
    with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
        eval_updates = tuple(int(u) for u in args.eval_updates.split(","))
        n = len(recipes)
        rows = list(pool.map(train_and_score, recipes, [args.motion_gt] * n, [args.workers] * n,
                             [eval_updates] * n, [args.precision] * n))
    results = {"torch": torch.__version__, "precision": args.precision, "parallel": parallel,
               "wall_s": round(time.perf_counter() - start, 1), "rows": rows}
    device = save_results("flow_budget", results, cuda=cuda)
    print(f"flow pre-training recipes on {device}, scored on {args.motion_gt} (zero-motion EPE "
          f"{rows[0]['epe_zero_motion']:.3f} px), {parallel} at once, {results['wall_s']} s")
    others = [k for k in rows[0] if k.startswith("epe_at_")][1:]
    print(f"  {'steps':>6} {'updates':>7} {'frames':>6} {'lr':>8} {'batch':>5} {'seed':>4} {'train_s':>8} "
          f"{'EPE':>7} {'EPE/zero':>8} {'acc1px':>7}"
          + "".join(f" {k.removeprefix('epe_'):>16}" for k in others))
    for r in rows:
        print(f"  {r['steps']:>6} {r['updates']:>7} {r['frames']:>6} {r['lr']:>8.0e} {r['batch']:>5} "
              f"{r['seed']:>4} {r['train_s']:>8.1f} {r['epe']:>7.3f} {r['epe_ratio']:>8.3f} "
              f"{r['acc_1px']:>7.3f}"
              + "".join(f" {r[k]:>16.3f}" for k in others) + (f"  {r['extra']}" if r["extra"] else ""))


if __name__ == "__main__":
    main()
