"""refine: fine-tune the pre-trained flow model and point tracker on a target domain's pseudo-labels.

The second stage of "Refining pre-trained motion models" (Sun, Harley, Guibas 2024): the motion
models reproduce their own cycle-consistent, densified labels under augmentation (random crops,
colour jitter, flips with the labels flipped too), with the L1 sequence losses (gamma 0.85 flow,
0.8 tracks) on valid labels only, AdamW and a one-cycle schedule, all weights trainable, through
the shared training loop. `method: photometric` is the paper's self-supervised baseline instead
(flow: warp + edge-aware smoothness; tracks: colour constancy along the track), which it found to
make good models worse.

Refinement is per target domain; each target gets its own refined models:
- `motion_gt`: the rendered evaluation clips, refined on `paths.motion_gt_train_labels`: the
  pseudo_labels and densify stages run on their frames alone (`pseudo_labels@motion_gt` and
  `densify@motion_gt` in dvc.yaml), never on their ground truth; before and after refinement the
  models are scored against the ground truth on the same clips: flow EPE and 1/3/5 px accuracy,
  TAP-Vid delta_avg, occlusion accuracy and AJ (first and strided queries).
- `clips`: the decoded (real) clips, refined on `paths.train_labels`; without ground truth they
  are scored by the fraction of cycle-consistent flow and the photometric error.

This stage only reads labels; it never makes them.

Losses are in `models.motion_losses`, metrics in `pipeline.motion.evaluate`, pictures in
`pipeline.motion.pictures`. The demo budget (a few dozen steps per model and target) shows the
machinery on CPU; the paper's 1,000 steps of batch 12 per video need a GPU.

Inputs: `artifacts/motion_pretrain/{flow.pt,tracker.pt}`, the train labels of each target (and the
frames store they name), `paths.motion_gt/gt.zarr`.
Outputs: `artifacts/refine/<target>/{flow.pt,tracker.pt}`, `metrics/refine.json` (motion_gt's EPE and
delta_avg before/after), `reports/refine/` (results.json: every score before/after per target, with zero
motion's on motion_gt; training curves, flow colour images, track overlay videos,
`<target>_before_after.png` bar charts of the scores; also logged to MLflow); resumable state in
`runs/refine/`.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import zarr
from pydantic import BeforeValidator, Field, field_validator

from models.flow import read_weights
from models.flow_io import save_flow_model
from models.motion_losses import (
    flow_label_loss,
    photometric_flow_loss,
    photometric_track_loss,
    track_label_loss,
)
from models.tracker import PointTracker, save_tracker
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir, save_png
from pipeline.core.errors import StageError
from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.results import write_results
from pipeline.core.training import TrainParams, init_distributed, stage_train_params, train, write_history
from pipeline.motion.augment import AugmentParams, FramePairs, LabelFlowPairs, LabelTrackSamples
from pipeline.motion.checkpoints import load_flow, load_point_tracker
from pipeline.motion.cycle import grid_queries
from pipeline.motion.evaluate import (
    consecutive_pairs,
    evaluate_ground_truth,
    label_quality,
    open_ground_truth,
    unlabelled_flow_metrics,
    zero_motion_flow_scores,
    zero_motion_track_scores,
)
from pipeline.motion.label_store import check_recorded_count, open_label_store
from pipeline.motion.pictures import before_after_chart, save_comparison

log = logging.getLogger(__name__)

# metrics/refine.json (DVC's columns): motion_gt's flow EPE and delta_avg (first queries) before and after
# refinement; every score of every target is in reports/refine/results.json
HEADLINE = {f"motion_gt_{name}_{phase}": f"motion_gt.{phase}.{group}.{name}"
            for group, name in (("flow", "epe"), ("tracks_first", "delta_avg"))
            for phase in ("before", "after")}

Method = Literal["pseudo_labels", "photometric"]
Target = Literal["motion_gt", "clips"]
# Paper: AdamW lr 1e-4 (flow) / 1e-5 (tracker), wd 1e-4, one-cycle with 10% warm-up, clip 5, batch 12,
# 1,000 iterations per scene. The CPU demo takes a few dozen small steps; the tracker's lr is raised
# because the demo's tracker is pre-trained briefly and 1e-5 would barely move it.
FLOW_TRAIN = TrainParams(steps=40, batch_size=4, base_lr=1e-4, lr_scaling="none", min_lr=1e-6,
                         weight_decay=1e-4, betas=(0.9, 0.999), warmup_steps=4, schedule="onecycle",
                         clip_grad=5.0, checkpoint_every=20, log_every=5)
TRACK_TRAIN = FLOW_TRAIN
# Paper: crops of 256x512 from larger frames. RAFT needs 128 px, so demo flow crops are whole frames
# (flips and jitter still apply); track crops cut 112 of 128 px.
FLOW_AUGMENT = AugmentParams(crop=(128, 128))
TRACK_AUGMENT = AugmentParams(crop=(112, 112))


def _augment_params(defaults: AugmentParams):
    """An AugmentParams field type whose partial blocks override `defaults`, not the generic ones."""
    return Annotated[AugmentParams, BeforeValidator(
        lambda value: {**defaults.model_dump(), **value} if isinstance(value, dict) else value)]


class Params(StageParams):
    method: Method = Field("pseudo_labels", description="pseudo_labels: the paper's recipe; "
                           "photometric: the self-supervised baseline (warp + smoothness)")
    targets: tuple[Target, ...] = Field(("motion_gt", "clips"), min_length=1,
                                        description="domains to refine on (each gets its own models)")
    refine_flow: bool = Field(True, description="fine-tune the flow model")
    refine_tracker: bool = Field(True, description="fine-tune the point tracker")
    flow_updates: int = Field(8, ge=1, description="RAFT updates in training and evaluation (the count "
                              "the labels were made with, checked)")
    tracker_iters: int = Field(6, ge=1, description="tracker updates in training and evaluation (the "
                               "count the labels were made with, checked)")
    flow_gamma: float = Field(0.85, gt=0, le=1, description="flow sequence-loss decay")
    track_gamma: float = Field(0.8, gt=0, le=1, description="track sequence-loss decay")
    smoothness_weight: float = Field(0.5, ge=0, description="photometric method: flow smoothness weight")
    flow_augment: _augment_params(FLOW_AUGMENT) = Field(FLOW_AUGMENT, description="flow sample augmentation")
    track_augment: _augment_params(TRACK_AUGMENT) = Field(TRACK_AUGMENT,
                                                          description="track sample augmentation")
    eval_pairs_per_clip: int | None = Field(8, ge=1, description="motion_gt: flow pairs scored per "
                                            "clip, evenly spaced (null: every consecutive pair)")
    eval_pairs: int = Field(16, ge=1, description="clips target: frame pairs scored, evenly "
                            "spaced over the pseudo-labelled clips")
    cycle_alpha: float | None = Field(None, ge=0, description="clips target: the cycle check "
                                      "|f + b| < alpha (|f| + |b|) + beta that scores consistency "
                                      "(null: the pseudo-labels' own, from train_labels.zarr)")
    cycle_beta: float | None = Field(None, ge=0, description="clips target: see cycle_alpha (px)")
    flow_train: stage_train_params(FLOW_TRAIN) = Field(FLOW_TRAIN,
                                                       description="flow fine-tuning (shared loop)")
    track_train: stage_train_params(TRACK_TRAIN) = Field(TRACK_TRAIN,
                                                         description="tracker fine-tuning (shared loop)")

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"targets repeat: {value}")
        return value


def run(params: Params, *, motion_models: Path, train_labels: dict[str, Path], motion_gt: Path,
        artifacts: Path, run_dir: Path, metrics: Path, reports: Path) -> dict[str, Path]:
    """Refine the models in `motion_models` on each target's pseudo-labels (`train_labels[target]`,
    made by pseudo_labels and densify for that target); write models, metrics and reports."""
    place = init_distributed()
    flow_ckpt, tracker_ckpt = motion_models / "flow.pt", motion_models / "tracker.pt"
    outputs = {"artifacts": artifacts, "metrics": metrics, "reports": reports}
    try:
        summary = refine_targets(params, flow_ckpt, tracker_ckpt, train_labels, motion_gt, artifacts,
                                 run_dir, reports, place.is_main)
    except _Stopped as stop:  # nothing is committed; the next run resumes from runs/refine
        log.info("%s (train.stop_after); rerun to continue", stop)
        return outputs
    if place.is_main:
        outputs.update(write_results(summary, reports=reports, metrics=metrics, headline=HEADLINE))
        current_run().log_artifact(metrics)
        current_run().log_artifact(reports, "refine")
        for target in params.targets:  # flow.pt and tracker.pt refined on that target's labels
            current_run().log_model(artifacts / target, f"refined_{target}", model_type="flow+tracker")
    return outputs


def refine_targets(params: Params, flow_ckpt: Path, tracker_ckpt: Path, train_labels: dict[str, Path],
                   motion_gt: Path, artifacts: Path, run_dir: Path, reports: Path, is_main: bool) -> dict:
    """For each target: labels, scores before, fine-tuning, scores after, models and pictures."""
    summary: dict = {"method": params.method}
    with atomic_dir(artifacts) as art, atomic_dir(reports) as rep:
        for target in params.targets:
            started = time.perf_counter()
            labels = target_labels(target, train_labels, params)
            pre_flow, pre_tracker = load_models(flow_ckpt, tracker_ckpt)
            flow, tracker = copy.deepcopy(pre_flow), copy.deepcopy(pre_tracker)
            before = evaluate(target, params, pre_flow, pre_tracker, labels, motion_gt) if is_main else {}
            key = work_fingerprint(params, labels, flow_ckpt, tracker_ckpt)
            if params.refine_flow:
                flow = refine_model("flow", flow, labels, params, run_dir / target / "flow", key, rep, target)
            if params.refine_tracker:
                tracker = refine_model("tracker", tracker, labels, params, run_dir / target / "tracker", key,
                                       rep, target)
            if not is_main:
                continue
            after = evaluate(target, params, flow, tracker, labels, motion_gt)
            summary[target] = {"before": before, "after": after, "labels": label_summary(labels)}
            if target == "motion_gt":
                ground_truth_extras(summary[target], labels, motion_gt, params)
            log_comparison(target, before, after)
            (art / target).mkdir()
            save_flow_model(flow, flow_name(flow_ckpt), art / target / "flow.pt")
            save_tracker(tracker, art / target / "tracker.pt")
            draw_pictures(target, params, (pre_flow, flow), (pre_tracker, tracker), labels, motion_gt, rep)
            draw_chart(target, params, summary[target], rep)
            current_run().log_metrics({f"time/{target}_seconds": time.perf_counter() - started})
    return summary


def ground_truth_extras(scores: dict, labels: zarr.Group, motion_gt: Path, params: Params) -> None:
    """Beside motion_gt's scores: zero motion's, and how good the labels were against the ground truth
    (diagnostics, never used to train or to choose a model)."""
    gt = open_ground_truth(motion_gt)
    scores["zero_motion"] = {"flow": zero_motion_flow_scores(gt, params.eval_pairs_per_clip),
                             **zero_motion_track_scores(gt)}
    quality = label_quality(labels, gt)
    scores["labels"].update(quality)
    current_run().log_metrics({f"val/motion_gt/{k}": v for k, v in quality.items() if np.isfinite(v)})


def label_summary(labels: zarr.Group) -> dict:
    """How many labels the target was refined on, and the kept fractions of the cycle checks."""
    kept = {k: float(v) for k, v in labels.attrs.items() if k.startswith("kept_fraction")}
    return {"flow_pairs": int(labels["flow/pairs"].shape[0]),
            "track_samples": int(labels["tracks/clip"].shape[0]), **kept}


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, motion_models=paths.artifacts_of("motion_pretrain"),
               train_labels={target: paths.train_label_store(target) for target in params.targets},
               motion_gt=paths.motion_gt, artifacts=paths.artifacts_of("refine"),
               run_dir=paths.runs_of("refine"), metrics=paths.metrics_of("refine"),
               reports=paths.reports_of("refine"))


class _Stopped(Exception):
    """Training ended early on `stop_after`; a rerun continues it."""


def target_labels(target: str, train_labels: dict[str, Path], params: Params) -> zarr.Group:
    """The pseudo-labels to refine on: the densify stage's store of the target's frames, made with
    the RAFT update and tracker iteration counts this stage trains and scores with."""
    labels = open_label_store(train_labels[target])
    check_recorded_count(labels, "flow_updates", params.flow_updates, "refine.flow_updates")
    check_recorded_count(labels, "tracker_iters", params.tracker_iters, "refine.tracker_iters")
    return labels


# ----------------------------------------------------------------------------------- inputs


def load_models(flow_ckpt: Path, tracker_ckpt: Path) -> tuple[torch.nn.Module, PointTracker]:
    """The pre-trained flow model and tracker; unreadable or misfitting weights are a StageError."""
    return load_flow(flow_ckpt), load_point_tracker(tracker_ckpt)


def flow_name(path: Path) -> str:
    """The RAFT variant a `mam2.flow` checkpoint holds (raft_small for outside formats)."""
    state = read_weights(path)
    return state.get("name", "raft_small") if isinstance(state, dict) else "raft_small"


def frames_source(labels: zarr.Group) -> zarr.Array:
    """The frames array the labels index into (attrs["clips"]: a clips.zarr or gt.zarr group)."""
    path = Path(labels.attrs["clips"])
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"frames source of {labels.store} not found: {path}")
    return zarr.open_group(str(path), mode="r")["frames"]


def work_fingerprint(params: Params, labels: zarr.Group, flow_ckpt: Path, tracker_ckpt: Path) -> str:
    """Identifies a fine-tuning run: other settings, labels or starting weights are not resumed from."""
    shapes = {k: list(labels[k].shape) for k in ("flow/flow", "tracks/coords")}
    return fingerprint(params.model_dump(mode="json", exclude={"flow_train", "track_train", "targets"}),
                       str(labels.store), shapes, dict(labels.attrs), file_digest(flow_ckpt),
                       file_digest(tracker_ckpt))


# ----------------------------------------------------------------------------------- evaluation


def evaluate(target: str, params: Params, flow: torch.nn.Module, tracker: PointTracker, labels: zarr.Group,
             motion_gt: Path) -> dict:
    """Before/after scores: against ground truth on motion_gt, label-free on the clips."""
    if target == "motion_gt":
        return evaluate_ground_truth(open_ground_truth(motion_gt), flow, tracker, params.flow_updates,
                                     params.tracker_iters, params.eval_pairs_per_clip)
    img0, img1 = consecutive_pairs(frames_source(labels), labelled_clips(labels), params.eval_pairs)
    alpha = params.cycle_alpha if params.cycle_alpha is not None else float(labels.attrs.get("alpha", 0.002))
    beta = params.cycle_beta if params.cycle_beta is not None else float(labels.attrs.get("beta", 0.1))
    return {"flow": unlabelled_flow_metrics(flow, img0, img1, params.flow_updates, alpha, beta)}


def labelled_clips(labels: zarr.Group) -> np.ndarray:
    """The clips of the frames source that were pseudo-labelled (the refined-on videos), whichever
    labels survived the filters."""
    if "labelled_clips" in labels.attrs:
        return np.asarray(labels.attrs["labelled_clips"], np.int64)
    return np.arange(frames_source(labels).shape[0])


def log_comparison(target: str, before: dict, after: dict) -> None:
    """MLflow metrics val/<target>/<before|after>/<group>/<metric>, and a log line per metric."""
    for phase, scores in (("before", before), ("after", after)):
        current_run().log_metrics({f"val/{target}/{phase}/{group}/{name}": value
                               for group, values in scores.items() for name, value in values.items()
                               if np.isfinite(value)})
    for group, values in after.items():
        for name in ("epe", "acc_1px", "delta_avg", "average_jaccard", "occlusion_accuracy",
                     "cycle_consistent_fraction", "photometric_error"):
            if name in values:
                log.info("%s %s %s: %.4f -> %.4f", target, group, name, before[group][name], values[name])


# ----------------------------------------------------------------------------------- fine-tuning


def refine_model(kind: str, model: torch.nn.Module, labels: zarr.Group, params: Params, run_dir: Path,
                 key: str, reports: Path, target: str) -> torch.nn.Module:
    """Fine-tune the flow model or the tracker on `labels` through the shared loop; returns it."""
    dataset, loss, train_params = training_setup(kind, labels, params)
    if kind == "tracker" and dataset.window > model.config.window:
        raise StageError(f"{labels.store}: track samples have {dataset.window} frames, the tracker's "
                         f"window is {model.config.window}")
    if len(dataset) == 0:  # a pipeline run goes on; the metrics show "no change" and the count
        log.warning("%s: no %s labels: the %s stays as pre-trained (loosen the pseudo-label thresholds)",
                    labels.store, kind, kind)
        return model
    log.info("refining the %s on %s: %d samples, %d steps of %d (%s)", kind, target, len(dataset),
             train_params.steps, train_params.batch_size, params.method)
    current_run().log_metrics({f"data/{target}_{kind}_samples": len(dataset)})
    result = train(model, dataset, loss, train_params, run_dir, fingerprint=key)
    if not result.completed:
        raise _Stopped(f"{target} {kind}: stopped after step {result.step} of {train_params.steps}")
    write_history(result.history, reports / f"{target}_{kind}_history.csv")
    return result.model


def training_setup(kind: str, labels: zarr.Group, params: Params) -> tuple:
    """The dataset, loss function and train params that fine-tune `kind` under `params.method`."""
    photometric = params.method == "photometric"
    augment = params.flow_augment if kind == "flow" else params.track_augment
    if photometric:  # colour constancy is what the loss measures: jitter all frames alike
        augment = augment.model_copy(update={"per_frame_jitter_prob": 0.0})
    frames = frames_source(labels)
    if kind == "flow" and photometric:  # the pseudo-label method's pairs, their labels unused
        dataset = FramePairs(labels, frames, augment)
        loss = functools.partial(photometric_flow_loss, smoothness=params.smoothness_weight,
                                 updates=params.flow_updates, gamma=params.flow_gamma)
        return dataset, loss, params.flow_train
    if kind == "flow":
        return (LabelFlowPairs(labels, frames, augment),
                functools.partial(flow_label_loss, updates=params.flow_updates, gamma=params.flow_gamma),
                params.flow_train)
    loss = photometric_track_loss if photometric else track_label_loss
    return (LabelTrackSamples(labels, frames, augment),
            functools.partial(loss, iters=params.tracker_iters, gamma=params.track_gamma), params.track_train)


# ----------------------------------------------------------------------------------- pictures


def draw_pictures(target: str, params: Params, flows: tuple, trackers: tuple, labels: zarr.Group,
                  motion_gt: Path, reports: Path) -> None:
    """Flow colour image (frame | [ground truth |] before | after) and a track overlay video
    ([ground truth |] before | after) of one refined-on clip; saved in `reports`, logged to MLflow."""
    if target == "motion_gt":
        gt = open_ground_truth(motion_gt)
        frames, reference = np.asarray(gt["frames"][0]), np.asarray(gt["flow"][0])
        tracks, visible = np.asarray(gt["tracks"][0]), np.asarray(gt["visible"][0])
    else:
        frames, reference = np.asarray(frames_source(labels)[int(labelled_clips(labels)[0])]), None
        tracks, visible = grid_queries(frames.shape[1:3], step=16).numpy(), None
    panel, _, video = save_comparison(frames, tracks, visible, reference, flows, trackers,
                                      flow_updates=params.flow_updates, tracker_iters=params.tracker_iters,
                                      stem=reports / target)
    current_run().log_image(panel, f"refine/{target}_flow.png")
    current_run().log_artifact(video, "refine")


def draw_chart(target: str, params: Params, scores: dict, reports: Path) -> Path:
    """`<target>_before_after.png` in `reports`: the target's scores before vs after refinement, with
    zero motion's where known (bars per metric); also logged to MLflow."""
    how = "against the ground truth" if target == "motion_gt" else "label-free, on the refined-on clips"
    image = before_after_chart(scores, f"refine on {target} ({params.method}): scores before vs after "
                                       f"refinement, {how}")
    path = save_png(image, reports / f"{target}_before_after.png")
    current_run().log_image(image, f"refine/{path.name}")
    return path


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
