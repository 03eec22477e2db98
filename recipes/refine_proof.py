"""The refinement claim, measured: pseudo-label refinement against the photometric baseline on
motion_gt, at the paper's budget, over seeds.

    python recipes/refine_proof.py [--recipe recipes/refine_proof.yaml] [--seeds 0 1 2]

`recipes/refine_proof.yaml` is the full protocol (flow model and tracker, for a GPU);
`recipes/refine_proof_cpu.yaml` refines the flow model only, which fits 2 CPU cores in about an hour.
Needs the demo's motion branch (`dvc repro densify@motion_gt`): the starting models in
`artifacts/motion_pretrain/` and motion_gt's densified pseudo-labels, made from its frames alone.
For each seed and method it refines the models on those labels with the refine stage's own training
(`stages.refine.refine_model`, the recipe's `refine` section), writing under `runs/refine_proof/` only
(never a DVC output; a finished run's `result.json` is reused by a rerun). The flow model is trained
in chunks of `--chunk` steps (the loop resumes exactly, so the chunks are one run) and scored on
motion_gt after each, for the curve of EPE against refinement step. Then it writes
`reports/refine_proof.md` (before / pseudo-labels / photometric: EPE, 1 px accuracy, the shrinkage
diagnostics, delta_avg and AJ in both query modes, mean +- std over seeds, wall time) and
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
from pipeline.motion.checkpoints import load_flow, load_point_tracker  # noqa: E402
from pipeline.motion.evaluate import (  # noqa: E402
    evaluate_flow_clip,
    evaluate_ground_truth,
    evenly_spaced,
    label_quality,
    mean_over_videos,
    open_ground_truth,
    zero_motion_flow_scores,
)
from stages import refine  # noqa: E402

METHODS = ("pseudo_labels", "photometric")
ROWS = (("flow EPE (px)", ("flow", "epe")), ("flow 1 px accuracy", ("flow", "acc_1px")),
        ("flow EPE, moving pixels (px)", ("flow", "epe_moving")),
        ("flow EPE, static pixels (px)", ("flow", "epe_static")),
        ("mean predicted flow (px)", ("flow", "mean_flow_px")),
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


def refine_in_chunks(kind: str, params: refine.Params, labels, models: Path, out: Path, key: str,
                     chunk: int, score=None) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Fine-tune `kind` with the refine stage's own training (`refine.refine_model`), stopping every
    `chunk` steps (the loop resumes exactly, so the chunks are one run) to call `score(step)`."""
    train = params.flow_train if kind == "flow" else params.track_train
    field = "flow_train" if kind == "flow" else "track_train"
    curve = []
    for done in range(chunk, train.steps + chunk, chunk):
        stop = min(done, train.steps)
        chunked = params.model_copy(update={field: train.model_copy(
            update={"stop_after": chunk if stop < train.steps else None})})
        model = load_flow(models / "flow.pt") if kind == "flow" else load_point_tracker(models / "tracker.pt")
        try:
            model = refine.refine_model(kind, model, labels, chunked, out / "runs" / kind, key,
                                        out / "reports", "motion_gt")
        except refine._Stopped:
            pass
        if score is not None:
            curve.append((stop, score(stop)))
    return model, curve


def one_run(params: refine.Params, paths: Paths, out: Path, chunk: int) -> dict:
    """Refine the models once (one seed, one method) on motion_gt's labels; scores and EPE curve.

    Only what the recipe refines is trained and scored (`refine_flow`, `refine_tracker`)."""
    models = paths.artifacts_of("motion_pretrain")
    labels = refine.target_labels("motion_gt", {"motion_gt": paths.train_label_store("motion_gt")}, params)
    key = refine.work_fingerprint(params, labels, models / "flow.pt", models / "tracker.pt")
    (out / "reports").mkdir(parents=True, exist_ok=True)
    gt = open_ground_truth(paths.motion_gt)
    flow, tracker = load_flow(models / "flow.pt"), load_point_tracker(models / "tracker.pt")
    scored = (flow if params.refine_flow else None, tracker if params.refine_tracker else None)
    before = evaluate_ground_truth(gt, *scored, params.flow_updates, params.tracker_iters,
                                   params.eval_pairs_per_clip)
    started = time.perf_counter()
    curve = [(0, before["flow"]["epe"])] if params.refine_flow else []
    if params.refine_flow:
        checkpoint = out / "runs" / "flow" / "checkpoint.pt"
        flow, steps = refine_in_chunks("flow", params, labels, models, out, key, chunk, lambda _: flow_epe(
            models / "flow.pt", checkpoint, paths.motion_gt, params.flow_updates, params.eval_pairs_per_clip))
        curve += steps
        print(f"  {params.method} seed {params.flow_train.seed}: flow EPE "
              + ", ".join(f"{epe:.3f} @ {step}" for step, epe in curve), flush=True)
    if params.refine_tracker:
        tracker, _ = refine_in_chunks("tracker", params, labels, models, out, key, params.track_train.steps)
    seconds = time.perf_counter() - started
    after = evaluate_ground_truth(gt, flow if params.refine_flow else None,
                                  tracker if params.refine_tracker else None, params.flow_updates,
                                  params.tracker_iters, params.eval_pairs_per_clip)
    return {"before": before, "after": after, "labels": {**refine.label_summary(labels),
                                                         **label_quality(labels, gt)},
            "curve": curve, "seconds": seconds}


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def pick(scores: dict, keys: tuple[str, str]) -> float | None:
    return float(scores[keys[0]][keys[1]]) if keys[0] in scores else None


def cells(values: list[float | None]) -> str:
    return "not refined" if None in values else mean_std(values)


def report(results: dict[str, list[dict]], seeds: list[int], recipe: Path, params: refine.Params,
           zero: dict[str, float]) -> str:
    steps = {"flow": params.flow_train.steps if params.refine_flow else 0,
             "tracker": params.track_train.steps if params.refine_tracker else 0}
    lines = [f"# Refinement on motion_gt: pseudo-labels vs photometric ({len(seeds)} seeds)", "",
             f"`python recipes/refine_proof.py --recipe {recipe}`: {steps['flow']} flow steps (batch "
             f"{params.flow_train.batch_size}) and {steps['tracker']} tracker steps per run, seeds "
             f"{', '.join(map(str, seeds))}; mean ± std over seeds. Before = the starting models (one "
             "value: no seed).", "",
             "| | before | pseudo-labels | photometric |", "|---|---|---|---|"]
    first = results[METHODS[0]][0]
    for name, keys in ROWS:
        if pick(first["before"], keys) is None:
            lines.append(f"| {name} | not scored (model not refined) | | |")
            continue
        row = [f"{pick(first['before'], keys):.3f}"]
        row += [cells([pick(r["after"], keys) for r in results[m]]) for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    seconds = [mean_std([r["seconds"] / 60 for r in results[m]]) for m in METHODS]
    lines.append(f"| training wall time (min) | | {seconds[0]} | {seconds[1]} |")
    labels = first["labels"]
    lines += [""]
    if params.refine_flow:
        before = pick(first["before"], ROWS[0][1])
        changes = {m: [100 * (pick(r["after"], ROWS[0][1]) / before - 1) for r in results[m]]
                   for m in METHODS}
        lines.append("EPE change: " + "; ".join(f"{m} {mean_std(changes[m])} %" for m in METHODS) + ".")
    true_mean = first["before"]["flow"]["mean_gt_flow_px"]
    lines.append(f"Zero motion scores EPE {zero['epe']:.3f} px and 1 px accuracy {zero['acc_1px']:.3f}; "
                 f"the true mean flow is {true_mean:.3f} px (diagnostics: moving pixels have |f| >= 1 px; "
                 "none of this is used to train or choose a model).")
    lines += [f"Labels: {labels.get('flow_pairs')} flow pairs, kept fraction "
              f"{labels.get('kept_fraction_flow', 0):.3f} "
              f"(kept-label EPE {labels.get('label_epe_kept', float('nan')):.3f} px against "
              f"{labels.get('label_epe_all', float('nan')):.3f} px for all), "
              f"{labels.get('track_samples')} track samples.", ""]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], zero_epe: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    before = results[METHODS[0]][0]["curve"][0][1]
    axis.axhline(before, color="grey", linestyle="--", label="before refinement")
    axis.axhline(zero_epe, color="black", linestyle=":", label="zero motion")
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
            if (out / "result.json").exists():  # finished before: a rerun goes on from the next run
                results[method].append(json.loads((out / "result.json").read_text()))
                continue
            results[method].append(one_run(params, paths, out, args.chunk))
            write_json(out / "result.json", results[method][-1])
    reports = paths.reports
    zero = zero_motion_flow_scores(open_ground_truth(paths.motion_gt), base.eval_pairs_per_clip)
    (reports / "refine_proof.md").write_text(report(results, args.seeds, args.recipe, base, zero))
    plot(results, zero["epe"], reports / "refine_proof.png")
    print((reports / "refine_proof.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
