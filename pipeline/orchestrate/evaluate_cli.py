"""`mam2 evaluate <stage>`: score a stage's saved model again, without training, with the stage's own
evaluation code and the params it would run with (`--params`, `--set`).

- finetune: the classifier (artifacts/finetune/classifier.pt) on the `eval_split` of the clips, every
  stored clip x `eval_clips` windows x `eval_crops` crops averaged per video: top-1, top-5, the single-view
  top-1, per-class accuracy (and, in `--out`, the confusion matrix and per-video predictions);
- tokenizer: the VQGAN (artifacts/tokenizer/vqgan.pt) on the held-out frames: reconstruction PSNR
  against predicting the mean frame, codebook usage and perplexity;
- motion_pretrain: the flow model and tracker (artifacts/motion_pretrain/) on motion_gt: EPE, tracking
  error, delta_avg and AJ, beside zero motion's;
- refine: each target's refined models (artifacts/refine/<target>/) as the stage scores its "after":
  against the ground truth on motion_gt, label-free (cycle consistency, photometric error) on the clips.

pretrain has no held-out evaluation to rerun (its metrics are windows of the training losses beside
their trivial baselines): the command says so. `--from` scores another file or folder of the same kind
(`mam2 evaluate motion_pretrain --from artifacts/refine/motion_gt`); for finetune that may be a
classifier exported by `mam2 export` (safetensors, or VideoMAE's layout) or a published fine-tuned
VideoMAE checkpoint (read at `finetune.videomae_num_frames` x `videomae_input_size`, its classes taken in
the store's order): a checkpoint is evaluated without any training step. The scores go to stdout as a table,
with the value the stage recorded beside each (from reports/<stage>/results.json or metrics/<stage>.json)
and, with `--out FILE.json`, to a file. Nothing the pipeline tracks is written: no DVC output, no MLflow
run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoint_io import read_weights
from models.classifier import FORMAT as CLASSIFIER_FORMAT
from models.classifier import VideoClassifier, load_classifier
from models.video_vit import ENCODER_SIZES
from models.videomae_convert import load_videomae_classifier
from models.vqgan import CheckpointError, load_vqgan
from pipeline.classify.data import store_info
from pipeline.classify.evaluate import classification_metrics
from pipeline.core import stage_cli
from pipeline.core.atomic import write_json
from pipeline.core.errors import StageError, require
from pipeline.core.params import ParamsError, Paths
from pipeline.core.progress import setup_logging
from pipeline.core.registry import STAGES
from pipeline.core.stores import open_clips
from pipeline.motion.checkpoints import load_flow, load_point_tracker
from pipeline.orchestrate.cli_support import add_params_arguments, load_sections, table

log = logging.getLogger(__name__)

NO_EVALUATION = {
    "pretrain": "pretrain has no held-out evaluation to rerun: its metrics are windows of the training "
                "losses beside their trivial baselines (reports/pretrain/, metrics/pretrain.json). Rate a "
                "pre-trained encoder by fine-tuning it: mam2 finetune, then mam2 evaluate finetune",
}


@dataclass
class Evaluation:
    """One evaluation: the model files scored, on what, the flat scores, and what else --out keeps."""

    models: list[Path]
    data: str
    scores: dict[str, Any]
    recorded_keys: dict[str, str] = field(default_factory=dict)  # score -> its key in the stage's record
    details: dict[str, Any] = field(default_factory=dict)


def evaluate_finetune(sections: dict, paths: Paths, source: Path | None) -> Evaluation:
    """The classifier on the evaluation split, as the finetune stage scores it after training."""
    from stages import finetune

    params = sections["finetune"]
    path = require(source or paths.artifacts_of("finetune") / "classifier.pt", "classifier", "finetune")
    info = store_info(paths.clips, params.clip_spec())
    try:
        model, class_names = saved_classifier(path, params, info.class_names)
    except ValueError as err:  # CheckpointError, VideoMAEConversionError: the file names itself
        raise StageError(str(err)) from err
    if list(class_names) != info.class_names:
        raise StageError(f"{path} was trained on classes {class_names}, {paths.clips} has {info.class_names}")
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    views = finetune.evaluate(model, paths.clips, params, params.train)
    summary = classification_metrics(views, info.class_names)
    shown = {key: value for key, value in summary.items() if key not in ("confusion", "class_names")}
    return Evaluation([path], f"{paths.clips} ({params.eval_split} split)", flatten(shown),
                      details={"confusion": summary["confusion"], "class_names": summary["class_names"],
                               "predictions": finetune.predictions(views, info.class_names)})


def saved_classifier(path: Path, params, store_classes: list[str]) -> tuple[VideoClassifier, list[str]]:
    """The classifier in `path` and its class names: ours (`load_classifier`, or its safetensors export),
    or a fine-tuned VideoMAE checkpoint: one `mam2 export` wrote (its config and classes travel with it)
    or a published one, read at `videomae_num_frames` x `videomae_input_size` with its classes taken in
    the store's order."""
    from stages import finetune

    state = read_weights(path)
    if isinstance(state, dict) and state.get("format") == CLASSIFIER_FORMAT:
        model, config = load_classifier(path)
        trained = (config["encoder"].get("num_frames"), config["encoder"].get("img_size"))
        if trained != (params.num_frames, params.input_size):
            log.warning("%s was trained on clips of %s frames at %s px; evaluating at %d frames, %d px "
                        "(finetune params)", path, *trained, params.num_frames, params.input_size)
        return model, list(config["class_names"])
    ours = state.get("mam2", {}).get("config") if isinstance(state, dict) else None
    if ours:  # our classifier in VideoMAE's layout: read back at the size it was exported at
        encoder = ours["encoder"]
        heads = encoder.get("num_heads") or ENCODER_SIZES[encoder["name"]]["num_heads"]
        source = {"source_num_frames": encoder["num_frames"], "source_img_size": encoder["img_size"],
                  "num_heads": heads, "input_norm": ours["input_norm"]}
        names = list(ours["class_names"])
    else:
        log.warning("%s: a VideoMAE checkpoint; its classes are taken to be the store's, in its order", path)
        source = {"source_num_frames": params.videomae_num_frames,
                  "source_img_size": params.videomae_input_size, "num_heads": params.videomae_num_heads,
                  "input_norm": finetune.input_norm(params, "imagenet")}
        names = store_classes
    model, _, report = load_videomae_classifier(path, img_size=params.input_size,
                                                num_frames=params.num_frames, **source)
    log.info("%s", report.summary())
    if model.num_classes != len(names):
        raise StageError(f"{path}: a head of {model.num_classes} classes; the store has {len(names)}")
    return model, names


def evaluate_tokenizer(sections: dict, paths: Paths, source: Path | None) -> Evaluation:
    """The VQGAN on the held-out frames, as the tokenizer stage scores it."""
    from stages import tokenizer

    params = sections["tokenizer"]
    path = require(source or paths.artifacts_of("tokenizer") / "vqgan.pt", "tokenizer", "tokenizer")
    try:
        model = load_vqgan(path)
    except CheckpointError as err:
        raise StageError(str(err)) from err
    store = open_clips(paths.clips)
    tokenizer.check_model(model, store["frames"].shape[2], where=str(path))
    frames = tokenizer.evaluation_frames(store, params, model, where=paths.clips)
    summary, _ = tokenizer.evaluate(model, frames, params.eval_batch)
    return Evaluation([path], f"{paths.clips} (held-out frames)", summary)


def evaluate_motion_pretrain(sections: dict, paths: Paths, source: Path | None) -> Evaluation:
    """The flow model and the tracker on motion_gt, as the motion_pretrain stage scores them."""
    from stages import motion_pretrain

    params = sections["motion_pretrain"]
    folder = source or paths.artifacts_of("motion_pretrain")
    flow = load_flow(folder / "flow.pt", params.flow_model).eval()
    tracker = load_point_tracker(folder / "tracker.pt").eval()
    gt = require(paths.ground_truth(), "motion ground truth", "demo_data")
    scores = {**motion_pretrain.evaluate_flow(flow, gt, params),
              **motion_pretrain.evaluate_tracks(tracker, gt, params)}
    return Evaluation([folder / "flow.pt", folder / "tracker.pt"], str(gt), scores)


def evaluate_refine(sections: dict, paths: Paths, source: Path | None) -> Evaluation:
    """Each target's refined models, scored as the refine stage scores them after refinement."""
    from stages import refine

    params = sections["refine"]
    folder = source or paths.artifacts_of("refine")
    scores, recorded, models = {}, {}, []
    for target in params.targets:
        flow, tracker = refine.load_models(folder / target / "flow.pt", folder / target / "tracker.pt")
        models += [folder / target / "flow.pt", folder / target / "tracker.pt"]
        labels = (None if target == "motion_gt"  # scored against the ground truth, not the labels
                  else refine.target_labels(target, {target: paths.train_label_store(target)}, params))
        for key, value in flatten(refine.evaluate(target, params, flow, tracker, labels,
                                                  paths.motion_gt)).items():
            scores[f"{target}.{key}"] = value
            recorded[f"{target}.{key}"] = f"{target}.after.{key}"
    return Evaluation(models, ", ".join(params.targets), scores, recorded_keys=recorded)


EVALUATORS: dict[str, Callable[[dict, Paths, Path | None], Evaluation]] = {
    "finetune": evaluate_finetune,
    "tokenizer": evaluate_tokenizer,
    "motion_pretrain": evaluate_motion_pretrain,
    "refine": evaluate_refine,
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists are left out (confusion matrices belong in --out)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, list | tuple):
            flat[f"{prefix}{key}"] = value
    return flat


def recorded_scores(paths: Paths, stage: str) -> dict[str, Any]:
    """What the stage's last run recorded, flattened: its results file in reports/, else its metrics
    file; {} when there is neither."""
    for path in (paths.reports_of(stage) / "results.json", paths.metrics_of(stage)):
        if path.is_file():
            try:
                return flatten(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    return {}


def parser() -> argparse.ArgumentParser:
    stages = ", ".join(EVALUATORS)
    out = argparse.ArgumentParser(
        prog="mam2 evaluate", description=(__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  mam2 evaluate finetune\n  mam2 evaluate finetune --set finetune.eval_crops=1 "
               "--out /tmp/ft.json\n  mam2 evaluate motion_pretrain --from artifacts/refine/motion_gt "
               "--set motion_pretrain.eval_clips=4")
    out.add_argument("stage", help=f"the stage whose model to score: {stages} (pretrain: see above)")
    out.add_argument("--from", dest="source", type=Path, metavar="PATH",
                     help="score this model instead of the stage's output: a classifier (ours, exported, "
                          "or a fine-tuned VideoMAE checkpoint) or vqgan.pt file; "
                          "for motion_pretrain a folder with flow.pt and tracker.pt, for refine a folder "
                          "with <target>/flow.pt and tracker.pt")
    out.add_argument("--out", type=Path, metavar="FILE.json", help="also write the scores (and for finetune "
                     "the confusion matrix and per-video predictions) to this JSON file")
    add_params_arguments(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`mam2 evaluate`; returns the exit code (2: bad command line or params, 1: the evaluation failed)."""
    args = parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    name = args.stage
    if name in NO_EVALUATION:
        print(f"mam2 evaluate: {NO_EVALUATION[name]}", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    if name not in EVALUATORS:
        kind = "writes data, not a model" if name in STAGES else "is not a stage"
        print(f"mam2 evaluate: {name} {kind}; stages with a model to score: {', '.join(EVALUATORS)}",
              file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    try:
        sections, paths = load_sections(args.params, args.overrides, name)
    except ParamsError as err:
        print(f"mam2 evaluate: {err}", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    try:
        result = EVALUATORS[name](sections, paths, args.source)
    except (StageError, OSError) as err:
        print(f"mam2 evaluate {name}: error: {stage_cli.describe_error(err)}", file=sys.stderr)
        return stage_cli.ERROR_EXIT_CODE
    recorded = recorded_scores(paths, name) if args.source is None else {}
    rows = [(key, value, recorded.get(result.recorded_keys.get(key, key)))
            for key, value in result.scores.items()]
    print(f"mam2 evaluate {name}: {', '.join(map(str, result.models))} on {result.data}")
    print(table(("score", "now", "recorded"), rows))
    if args.out is not None:
        write_json(args.out, {"stage": name, "models": [str(p) for p in result.models], "data": result.data,
                              "scores": result.scores, **result.details})
        print(f"wrote {args.out}")
    return 0
