"""The refinement claim, measured: pseudo-label refinement against the photometric baseline on
motion_gt, at the paper's budget, over seeds.

    python recipes/refine_proof.py [--recipe recipes/refine_proof.yaml] [--seeds 0 1 2]

Needs the demo's motion branch (`dvc repro densify@motion_gt`): the starting models in
`artifacts/motion_pretrain/` and motion_gt's densified pseudo-labels, made from its frames alone.
For each seed and method it refines both models on those labels with the refine stage's own code
(`stages.refine.run`, the recipe's `refine` section), writing under `runs/refine_proof/` only (never
a DVC output). The flow model is trained in chunks of `--chunk` steps (the loop resumes exactly, so
the chunks are one run) and scored on motion_gt after each, for the curve of EPE against refinement
step. Then it writes `reports/refine_proof.md` (before / pseudo-labels / photometric: EPE, 1 px
accuracy, delta_avg and AJ in both query modes, mean +- std over seeds, wall time) and
`reports/refine_proof.png`. The evaluation domain is the committed motion_gt; nothing here tunes
towards a result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.atomic import save_figure, write_json  # noqa: E402
from pipeline.core.params import Paths, read_params_file, validate_section  # noqa: E402
from pipeline.motion.checkpoints import load_flow  # noqa: E402
from pipeline.motion.evaluate import evaluate_flow_clip, evenly_spaced, mean_over_videos, open_ground_truth  # noqa: E402
from stages import refine  # noqa: E402

METHODS = ("pseudo_labels", "photometric")
ROWS = (("flow EPE (px)", ("flow", "epe")), ("flow 1 px accuracy", ("flow", "acc_1px")),
        ("delta_avg, first queries", ("tracks_first", "delta_avg")),
        ("AJ, first queries", ("tracks_first", "average_jaccard")),
        ("delta_avg, strided queries", ("tracks_strided", "delta_avg")),
        ("AJ, strided queries", ("tracks_strided", "average_jaccard")))


def flow_epe(flow_ckpt: Path, checkpoint: Path | None, motion_gt: Path, updates: int,
             pairs_per_clip: int | None) -> float:
    """EPE on motion_gt of the starting flow model, or of the one in a training `checkpoint`."""
    model = load_flow(flow_ckpt)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    gt = open_ground_truth(motion_gt)
    pairs = evenly_spaced(gt["flow"].shape[1], pairs_per_clip)
    rows = [evaluate_flow_clip(model.eval(), gt["frames"][i], gt["flow"][i], updates, pairs=pairs)[0]
            for i in range(gt["frames"].shape[0])]
    return mean_over_videos(rows)["epe"]


def one_run(params: refine.Params, paths: Paths, out: Path, chunk: int) -> dict:
    """Refine both models once (one seed, one method); returns its metrics and EPE curve."""
    motion_models = paths.artifacts_of("motion_pretrain")
    checkpoint = out / "runs" / "motion_gt" / "flow" / "checkpoint.pt"
    steps = params.flow_train.steps
    curve = [(0, flow_epe(motion_models / "flow.pt", None, paths.motion_gt, params.flow_updates,
                          params.eval_pairs_per_clip))]
    started = time.perf_counter()
    for done in range(chunk, steps + chunk, chunk):
        stop = min(done, steps)
        chunked = params.model_copy(update={"flow_train": params.flow_train.model_copy(
            update={"stop_after": chunk if stop < steps else None})})
        refine.run(chunked, motion_models=motion_models,
                   train_labels={"motion_gt": paths.train_label_store("motion_gt")},
                   motion_gt=paths.motion_gt, artifacts=out / "artifacts", run_dir=out / "runs",
                   metrics=out / "refine.json", reports=out / "reports")
        curve.append((stop, flow_epe(motion_models / "flow.pt", checkpoint, paths.motion_gt,
                                     params.flow_updates, params.eval_pairs_per_clip)))
        print(f"  {params.method} seed {params.flow_train.seed}: step {stop}/{steps}, EPE {curve[-1][1]:.3f}",
              flush=True)
    metrics = json.loads((out / "refine.json").read_text())["motion_gt"]
    return {"before": metrics["before"], "after": metrics["after"], "labels": metrics["labels"],
            "curve": curve, "seconds": time.perf_counter() - started}


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def pick(scores: dict, keys: tuple[str, str]) -> float:
    return float(scores[keys[0]][keys[1]])


def report(results: dict[str, list[dict]], seeds: list[int], recipe: Path, steps: int) -> str:
    lines = [f"# Refinement on motion_gt: pseudo-labels vs photometric ({len(seeds)} seeds)", "",
             f"`python recipes/refine_proof.py --recipe {recipe}`: {steps} steps per model, seeds "
             f"{', '.join(map(str, seeds))}; mean ± std over seeds. Before = the starting models (one "
             "value: no seed).", "",
             "| | before | pseudo-labels | photometric |", "|---|---|---|---|"]
    first = results[METHODS[0]][0]
    for name, keys in ROWS:
        cells = [f"{pick(first['before'], keys):.3f}"]
        cells += [mean_std([pick(r["after"], keys) for r in results[m]]) for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seconds = [mean_std([r["seconds"] / 60 for r in results[m]]) for m in METHODS]
    lines.append(f"| wall time (min) | | {seconds[0]} | {seconds[1]} |")
    before = pick(first["before"], ROWS[0][1])
    changes = {m: [100 * (pick(r["after"], ROWS[0][1]) / before - 1) for r in results[m]] for m in METHODS}
    labels = first["labels"]
    lines += ["", "EPE change: " + "; ".join(f"{m} {mean_std(changes[m])} %" for m in METHODS) + ".",
              f"Labels: {labels.get('flow_pairs')} flow pairs, kept fraction "
              f"{labels.get('kept_fraction_flow', 0):.3f} "
              f"(kept-label EPE {labels.get('label_epe_kept', float('nan')):.3f} px against "
              f"{labels.get('label_epe_all', float('nan')):.3f} px for all), "
              f"{labels.get('track_samples')} track samples.", ""]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    before = results[METHODS[0]][0]["curve"][0][1]
    axis.axhline(before, color="grey", linestyle="--", label="before refinement")
    for method, colour in zip(METHODS, ("tab:blue", "tab:red"), strict=True):
        curves = np.array([[epe for _, epe in r["curve"]] for r in results[method]])
        steps = [s for s, _ in results[method][0]["curve"]]
        axis.plot(steps, curves.mean(0), color=colour, label=method.replace("_", "-"))
        if len(curves) > 1:
            axis.fill_between(steps, curves.min(0), curves.max(0), color=colour, alpha=0.2)
    axis.set_xlabel("refinement step")
    axis.set_ylabel("motion_gt flow EPE (px)")
    axis.set_title("Flow refinement on motion_gt (band: min-max over seeds)")
    axis.legend()
    save_figure(figure, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/refine_proof.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chunk", type=int, default=250, help="flow steps between EPE measurements")
    parser.add_argument("--out", type=Path, default=Path("runs/refine_proof"))
    args = parser.parse_args()
    doc = read_params_file(args.recipe)
    paths = validate_section(read_params_file("params.yaml"), "paths", Paths)
    base = validate_section(doc, "refine", refine.Params).model_copy(update={"targets": ("motion_gt",)})
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            params = base.model_copy(update={
                "method": method, "flow_train": base.flow_train.model_copy(update={"seed": seed}),
                "track_train": base.track_train.model_copy(update={"seed": seed})})
            out = args.out / f"{method}-seed{seed}"
            results[method].append(one_run(params, paths, out, args.chunk))
            write_json(out / "result.json", results[method][-1])
    reports = paths.reports
    (reports / "refine_proof.md").write_text(report(results, args.seeds, args.recipe, base.flow_train.steps))
    plot(results, reports / "refine_proof.png")
    print((reports / "refine_proof.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
