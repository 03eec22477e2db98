"""motion_pretrain: train the flow model (RAFT) and the point tracker on synthetic data, or load them.

No weights can be downloaded, so both motion models are trained supervised on synthetic clips with
exact motion, rendered on the fly (`pipeline.motion.synthetic_data`, `PRETRAIN_STYLE`: textured objects under
affine motion with occlusion, the FlyingChairs/Kubric recipe). This is the paper's starting point: a
model trained on synthetic data, to be refined on the user's video. Given `flow_checkpoint` (a
torchvision .pth, an original RAFT checkpoint or our own format) or `tracker_checkpoint` (our
format), that model is loaded instead of trained.

Inputs: `paths.motion_gt` (gt.zarr, for evaluation only). Outputs: `artifacts/motion_pretrain/`
(flow.pt in `models.flow_io` format, tracker.pt in `models.tracker.save_tracker` format),
`metrics/motion_pretrain.json` (flow EPE and tracking delta_avg on motion_gt next to the zero-motion
baseline), `reports/motion_pretrain/` (results.json: every score; training curves). Training resumes
from `runs/motion_pretrain/`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from pydantic import Field

from models.flow import CheckpointError, build_flow_model, estimate_flow, flow_sequence_loss
from models.flow_io import load_flow_model, save_flow_model
from models.tracker import (
    TRACKER_FORMAT,
    PointTracker,
    TrackerConfig,
    load_tracker,
    save_tracker,
    score_map_loss,
    track_sequence_loss,
    visibility_loss,
)
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir
from pipeline.core.errors import StageError, require
from pipeline.core.fingerprint import fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.progress import progress
from pipeline.core.results import write_results
from pipeline.core.training import TrainParams, stage_train_params, train, write_history
from pipeline.motion.evaluate import (
    evaluate_flow_clip,
    evaluate_tracker_clip,
    evenly_spaced,
    flow_metrics,
    mean_over_videos,
    open_ground_truth,
    tapvid_metrics,
)
from pipeline.motion.synthetic_data import SyntheticFlowPairs, SyntheticTrackWindows

log = logging.getLogger(__name__)


# RAFT's recipe (AdamW, one-cycle, lr 4e-4) at the CPU demo budget, which leaves RAFT from scratch no
# better than zero motion on motion_gt; bench/flow_budget.py sweeps recipes, and README gives the budget
# that is clearly better and what it costs.
FLOW_TRAIN = TrainParams(steps=200, batch_size=4, base_lr=4e-4, lr_scaling="none", schedule="onecycle",
                         warmup_steps=20, weight_decay=1e-4, betas=(0.9, 0.999), clip_grad=1.0,
                         checkpoint_every=50, log_every=10)
TRACKER_TRAIN = FLOW_TRAIN.model_copy(update={"base_lr": 1e-3})
FlowTrainParams = stage_train_params(FLOW_TRAIN)
TrackerTrainParams = stage_train_params(TRACKER_TRAIN)
# metrics/motion_pretrain.json (DVC's columns): each model's score on motion_gt beside zero motion's; the
# other scores (accuracies, moving/static EPE, Jaccard, sources) are in reports/motion_pretrain/results.json
HEADLINE = ("flow_epe", "flow_epe_zero_motion", "track_delta_avg", "track_delta_avg_zero_motion")


class Params(StageParams):
    flow_model: Literal["raft_small", "raft_large"] = Field("raft_small", description="RAFT variant")
    flow_checkpoint: Path | None = Field(None, description="load these flow weights instead of training "
                                         "(torchvision .pth, original RAFT .pth or our flow.pt)")
    tracker_checkpoint: Path | None = Field(None, description="load this tracker (our tracker.pt "
                                            "format) instead of training")
    size: int = Field(128, ge=128, description="side of the square synthetic training clips (RAFT "
                      "needs >= 128)")
    flow_clip_frames: int = Field(4, ge=2, description="frames rendered per flow sample; one random "
                                  "consecutive pair of them is used")
    flow_updates: int = Field(8, ge=1, description="RAFT updates per training forward pass")
    tracker_points: int = Field(64, ge=1, description="tracks per training window (queried in frame 0)")
    tracker_iters: int = Field(4, ge=1, description="tracker updates per training forward pass")
    # PIPs' training loss (its train.py): coordinates x 1 + balanced visibility BCE x 10 + score maps x 1.
    visibility_weight: float = Field(10.0, ge=0, description="weight of the balanced visibility "
                                     "cross-entropy (PIPs: 10)")
    score_weight: float = Field(1.0, ge=0, description="weight of the score-map cross-entropy (PIPs: 1)")
    eval_flow_updates: int = Field(8, ge=1, description="RAFT updates when evaluating on motion_gt "
                                   "(refine's flow_updates, so this score is refine's 'before')")
    eval_tracker_iters: int = Field(6, ge=1, description="tracker updates when evaluating on motion_gt")
    eval_clips: int | None = Field(None, ge=1, description="evaluate on the first N motion_gt clips "
                                   "(null: all)")
    eval_pairs_per_clip: int | None = Field(8, ge=1, description="flow pairs scored per motion_gt clip, "
                                            "evenly spaced (null: every consecutive pair)")
    flow_train: FlowTrainParams = Field(FLOW_TRAIN, description="optimisation of the flow model "
                                        "(RAFT's recipe: AdamW, one-cycle)")
    tracker_train: TrackerTrainParams = Field(TRACKER_TRAIN, description="optimisation of the point tracker")


def run(params: Params, *, motion_gt: Path, artifacts: Path, metrics: Path, reports: Path,
        runs: Path) -> dict[str, Path]:
    """Obtain both models (train or load), save them to `artifacts`, evaluate them on `motion_gt`."""
    gt_store = motion_gt / "gt.zarr"
    require(gt_store, "motion ground truth", "demo_data")
    reports.mkdir(parents=True, exist_ok=True)
    # A given tracker is read first, so a bad file fails the stage before the flow model trains.
    given_tracker = obtain_tracker(params, runs / "tracker", reports) if params.tracker_checkpoint else None
    started = time.perf_counter()
    flow_model = obtain_flow_model(params, runs / "flow", reports)
    flow_seconds = time.perf_counter() - started
    tracker = given_tracker or obtain_tracker(params, runs / "tracker", reports)
    tracker_seconds = time.perf_counter() - started - flow_seconds
    with atomic_dir(artifacts) as tmp:
        save_flow_model(flow_model, params.flow_model, tmp / "flow.pt")
        save_tracker(tracker, tmp / "tracker.pt")
    results = {**evaluate_flow(flow_model, gt_store, params), **evaluate_tracks(tracker, gt_store, params),
               "flow_source": "checkpoint" if params.flow_checkpoint else "trained",
               "tracker_source": "checkpoint" if params.tracker_checkpoint else "trained"}
    current_run().log_metrics({f"val/{k}": v for k, v in results.items() if isinstance(v, float)})
    current_run().log_metrics({"time/flow_seconds": flow_seconds, "time/tracker_seconds": tracker_seconds})
    current_run().log_model(artifacts / "flow.pt", "flow", model_type=params.flow_model)
    current_run().log_model(artifacts / "tracker.pt", "tracker", model_type="point-tracker")
    written = write_results(results, reports=reports, metrics=metrics, headline=HEADLINE)
    current_run().log_artifact(written["results"], "motion_pretrain")
    log.info("motion_gt flow EPE %.3f px (zero motion %.3f); tracking error %.3f px (zero motion %.3f)",
             results["flow_epe"], results["flow_epe_zero_motion"], results["track_error_px"],
             results["track_error_px_zero_motion"])
    if not (results["flow_epe"] < results["flow_epe_zero_motion"]
            and results["track_error_px"] < results["track_error_px_zero_motion"]):
        log.warning("a motion model is no better than predicting no motion on %s; train longer", gt_store)
    return {"flow": artifacts / "flow.pt", "tracker": artifacts / "tracker.pt", **written}


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, motion_gt=paths.motion_gt, artifacts=paths.artifacts_of("motion_pretrain"),
               metrics=paths.metrics_of("motion_pretrain"), reports=paths.reports_of("motion_pretrain"),
               runs=paths.runs_of("motion_pretrain"))


# ------------------------------------------------------------------------------------- training


def obtain_flow_model(params: Params, run_dir: Path, reports: Path) -> torch.nn.Module:
    """The flow model from `flow_checkpoint`, or trained on synthetic pairs (resuming in `run_dir`)."""
    if params.flow_checkpoint is not None:
        return _load(load_flow_model, params.flow_checkpoint, params.flow_model)
    torch.manual_seed(params.flow_train.seed)
    model = build_flow_model(params.flow_model)
    dataset = SyntheticFlowPairs(params.size, params.flow_clip_frames,
                                 length=params.flow_train.steps * params.flow_train.batch_size)
    updates = params.flow_updates

    def loss_fn(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        preds = estimate_flow(net, batch["img0"], batch["img1"], updates, return_all=True)
        epe = torch.linalg.vector_norm(preds[-1].detach() - batch["flow"], dim=1)
        return {"loss": flow_sequence_loss(preds, batch["flow"], batch["valid"]), "epe": epe.mean()}

    fingerprint = work_fingerprint(params, "flow_model", "size", "flow_clip_frames", "flow_updates")
    result = train(model, dataset, loss_fn, params.flow_train, run_dir, fingerprint=fingerprint, unit="pair")
    if result.history:
        write_history(result.history, reports / "flow_history.csv")
    return result.model.cpu().eval()


def obtain_tracker(params: Params, run_dir: Path, reports: Path) -> PointTracker:
    """The tracker from `tracker_checkpoint`, or trained on synthetic windows (resuming in `run_dir`)."""
    if params.tracker_checkpoint is not None:
        return _load(lambda path, _: load_tracker(path), params.tracker_checkpoint, None)
    torch.manual_seed(params.tracker_train.seed)
    model = PointTracker(TrackerConfig())
    dataset = SyntheticTrackWindows(params.size, model.config.window, params.tracker_points,
                                    length=params.tracker_train.steps * params.tracker_train.batch_size)
    iters, vis_weight, score_weight = params.tracker_iters, params.visibility_weight, params.score_weight

    def loss_fn(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        preds, vis, maps = net(batch["video"], batch["tracks"][:, 0], iters=iters, return_score_maps=True)
        coords = track_sequence_loss(preds, batch["tracks"], batch["valid"])
        visibility = visibility_loss(vis, batch["visible"])
        scores = score_map_loss(maps, batch["tracks"], batch["visible"], batch["valid"])
        error = torch.linalg.vector_norm(preds[-1].detach() - batch["tracks"], dim=-1)
        error = (error * batch["valid"]).sum() / batch["valid"].sum().clamp(min=1)
        return {"loss": coords + vis_weight * visibility + score_weight * scores, "coords": coords,
                "visibility": visibility, "score_maps": scores, "error_px": error}

    # the architecture too: a checkpoint of another tracker design or size is not resumed from
    key = fingerprint(work_fingerprint(params, "size", "tracker_points", "tracker_iters", "visibility_weight",
                                       "score_weight"), TRACKER_FORMAT, asdict(model.config))
    result = train(model, dataset, loss_fn, params.tracker_train, run_dir, fingerprint=key,
                   unit="window")
    if result.history:
        write_history(result.history, reports / "tracker_history.csv")
    return result.model.cpu().eval()


def work_fingerprint(params: Params, *keys: str) -> str:
    """Hash of the settings that shape one model's training (a checkpoint made otherwise is not resumed)."""
    return fingerprint(params.model_dump(mode="json", include=set(keys)))


def _load(loader, path: Path, name: str | None):
    try:
        return loader(path, name).eval()
    except CheckpointError as err:
        raise StageError(str(err)) from err


# ----------------------------------------------------------------------------------- evaluation


def _gt_clips(gt_store: Path, params: Params) -> tuple[zarr.Group, int]:
    group = open_ground_truth(gt_store.parent)
    n = group["frames"].shape[0]
    return group, min(n, params.eval_clips or n)


def evaluate_flow(model: torch.nn.Module, gt_store: Path, params: Params) -> dict[str, float]:
    """EPE and 1/3/5 px accuracy over every consecutive pair of the motion_gt clips, and zero motion's."""
    group, n = _gt_clips(gt_store, params)
    per_clip, zero = [], []
    pairs = evenly_spaced(group["flow"].shape[1], params.eval_pairs_per_clip)
    for i in progress(range(n), desc="evaluate flow", unit="clip"):
        gt = group["flow"][i]
        scores, _ = evaluate_flow_clip(model, group["frames"][i], gt, params.eval_flow_updates, pairs=pairs)
        target = torch.from_numpy(gt[pairs]).permute(0, 3, 1, 2)
        per_clip.append(scores), zero.append(flow_metrics(torch.zeros_like(target), target))
    out = {f"flow_{k}": v for k, v in mean_over_videos(per_clip).items()}
    out["flow_epe_zero_motion"] = mean_over_videos(zero)["epe"]
    return out


def evaluate_tracks(model: PointTracker, gt_store: Path, params: Params) -> dict[str, float]:
    """Tracking on motion_gt ("first" queries): mean error (px) over visible scored frames and
    TAP-Vid delta_avg / AJ, next to zero motion (every point stays at its query)."""
    group, n = _gt_clips(gt_store, params)
    rows, static_rows, errors, static_errors = [], [], [], []
    for i in progress(range(n), desc="evaluate tracker", unit="clip"):
        frames, tracks, visible = group["frames"][i], group["tracks"][i], group["visible"][i]
        scores, (queries, pred, _) = evaluate_tracker_clip(model, frames, tracks, visible, "first",
                                                           params.eval_tracker_iters)
        points = np.flatnonzero(visible.any(0))
        gt, vis = tracks[:, points], visible[:, points]
        static = np.broadcast_to(gt[queries, np.arange(len(points))][None], gt.shape)
        scored = vis & (np.arange(len(frames))[:, None] > queries[None])
        errors.append(np.linalg.norm(pred - gt, axis=-1)[scored])
        static_errors.append(np.linalg.norm(static - gt, axis=-1)[scored])
        rows.append(scores)
        static_rows.append(tapvid_metrics(queries, gt, vis, static, np.ones_like(vis), "first",
                                          frames.shape[1:3]))
    scores, static_scores = mean_over_videos(rows), mean_over_videos(static_rows)
    return {"track_error_px": float(np.concatenate(errors).mean()),
            "track_error_px_zero_motion": float(np.concatenate(static_errors).mean()),
            "track_delta_avg": scores["delta_avg"], "track_average_jaccard": scores["average_jaccard"],
            "track_occlusion_accuracy": scores["occlusion_accuracy"],
            "track_delta_avg_zero_motion": static_scores["delta_avg"]}


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
