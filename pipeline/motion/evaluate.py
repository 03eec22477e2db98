"""Motion evaluation: optical-flow error, TAP-Vid point-tracking metrics, and label-free checks.

- Flow with ground truth: end-point error (EPE) and the fraction of pixels with EPE below 1, 3 and
  5 px.
- Tracks with ground truth, as TAP-Vid defines them: coordinates rescaled to 256x256; a point is
  within delta if its squared distance is strictly below delta^2, delta in {1, 2, 4, 8, 16};
  "first" queries each track at its first visible frame and scores only later frames, "strided"
  queries every 5th frame where the point is visible and scores every frame but the query frame;
  delta_avg over ground-truth-visible evaluated points (predicted visibility ignored); occlusion
  accuracy; Jaccard = TP / (TP + FP + FN); AJ = mean Jaccard over delta. Metrics are computed per
  video and then averaged over videos.
- Flow without ground truth (real clips): the fraction of pixels whose forward and backward flow
  agree (the pseudo-label cycle check, `pipeline.motion.cycle.flow_cycle_mask`), and the photometric error
  mean |I0 - warp(I1, f)| on images in [0, 1].

Pictures of the results (flow colours, track overlays) are in `pipeline.motion.pictures`.
Tensors follow models/flow.py: images (B, 3, H, W), flow (B, 2, H, W) in pixels, (x, y) order.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from torch import Tensor

from models.flow import estimate_flow, lands_inside
from models.motion_losses import photometric_error
from models.tracker import PointTracker, track_long
from pipeline.core.errors import StageError, require
from pipeline.core.progress import progress
from pipeline.core.tensors import image_to_tensor
from pipeline.motion.cycle import flow_cycle_mask

QueryMode = Literal["first", "strided"]
QUERY_MODES: tuple[str, ...] = ("first", "strided")
TAPVID_SIZE = (256, 256)  # (H, W) of the coordinate frame TAP-Vid scores in
TAPVID_THRESHOLDS = (1, 2, 4, 8, 16)
FLOW_THRESHOLDS = (1, 3, 5)
STRIDED_QUERY_STEP = 5


def evenly_spaced(span: int, count: int | None) -> np.ndarray:
    """Up to `count` distinct integers evenly spread over [0, span) (span >= 1); None: all of them."""
    if count is None or count >= span:
        return np.arange(span, dtype=np.int64)
    return np.unique(np.linspace(0, span - 1, count).round().astype(np.int64))


# ------------------------------------------------------------------------------------- flow metrics


def flow_metrics(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """EPE and 1/3/5 px accuracy of `pred` against `target`, both (..., 2, H, W), over `valid` pixels.

    `valid` (..., H, W) bool, or None for every pixel. Accuracy at d px is the fraction of pixels
    whose end-point error is strictly below d.
    """
    epe = torch.linalg.vector_norm(pred.float() - target.float(), dim=-3)  # (..., H, W)
    epe = epe[valid.bool()] if valid is not None else epe.flatten()
    if epe.numel() == 0:
        return {"epe": float("nan"), **{f"acc_{d}px": float("nan") for d in FLOW_THRESHOLDS}}
    out = {"epe": float(epe.mean())}
    out.update({f"acc_{d}px": float((epe < d).float().mean()) for d in FLOW_THRESHOLDS})
    return out


def cycle_consistent_fraction(fwd: Tensor, bwd: Tensor, alpha: float, beta: float) -> Tensor:
    """Per pair (B,): the fraction of pixels whose forward flow lands inside the frame that pass
    the forward-backward check `pipeline.motion.cycle.flow_cycle_mask(fwd, bwd, alpha, beta)`."""
    inside = lands_inside(fwd)
    consistent = flow_cycle_mask(fwd, bwd, alpha=alpha, beta=beta) & inside
    return consistent.sum((1, 2)).float() / inside.sum((1, 2)).clamp(min=1)


MOVING_PX = 1.0  # ground-truth motion at or above this many px counts as moving


def flow_diagnostics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """What a change in EPE is made of (diagnostics, never used for training or model choice): the EPE
    on moving (|gt| >= 1 px) and static pixels, and the mean |flow| predicted and true. A model that
    improves only by predicting less motion shows a lower static EPE and a shrinking mean |flow|."""
    epe = torch.linalg.vector_norm(pred.float() - target.float(), dim=-3)
    speed = torch.linalg.vector_norm(target.float(), dim=-3)
    moving = speed >= MOVING_PX
    nan = torch.tensor(float("nan"))
    return {"epe_moving": float(epe[moving].mean() if moving.any() else nan),
            "epe_static": float(epe[~moving].mean() if (~moving).any() else nan),
            "moving_fraction": float(moving.float().mean()),
            "mean_flow_px": float(torch.linalg.vector_norm(pred.float(), dim=-3).mean()),
            "mean_gt_flow_px": float(speed.mean())}


def label_quality(labels: zarr.Group, gt: zarr.Group) -> dict[str, float]:
    """How good the flow pseudo-labels of a ground-truth store's frames are (diagnostics, never used
    for training): the EPE against ground truth of the kept label pixels and of every pixel of the
    labelled pairs (what the filter had to choose from), and the kept fraction. A filter that cleans
    keeps pixels whose EPE is far below the unfiltered one."""
    kept_err, all_err, kept, total = 0.0, 0.0, 0, 0
    pairs = np.asarray(labels["flow/pairs"][:])
    for index, (clip, t0, t1) in enumerate(pairs):
        if t1 != t0 + 1:  # the ground truth holds consecutive pairs only
            continue
        flow = np.asarray(labels["flow/flow"][index], np.float32)  # (2, H, W)
        valid = np.asarray(labels["flow/valid"][index], bool)
        err = np.linalg.norm(flow.transpose(1, 2, 0) - np.asarray(gt["flow"][clip, t0]), axis=-1)
        kept_err, all_err = kept_err + float(err[valid].sum()), all_err + float(err.sum())
        kept, total = kept + int(valid.sum()), total + err.size
    nan = float("nan")
    return {"label_epe_kept": kept_err / kept if kept else nan,
            "label_epe_all": all_err / total if total else nan,
            "label_kept_fraction": kept / total if total else nan}


# ------------------------------------------------------------------------------- TAP-Vid metrics


def sample_queries(visible: np.ndarray, mode: QueryMode, step: int = STRIDED_QUERY_STEP
                   ) -> tuple[np.ndarray, np.ndarray]:
    """TAP-Vid queries of one video with ground-truth visibility `visible` (T, P) bool.

    Returns (query frame (N,), point index (N,)). "first": one query per track at its first visible
    frame (tracks never visible are dropped). "strided": a query at frames 0, step, 2 step, ... for
    every point visible there, so one track can give several queries.
    """
    if mode == "first":
        seen = visible.any(0)
        return visible.argmax(0)[seen].astype(np.int64), np.flatnonzero(seen)
    if mode == "strided":
        frames, points = [], []
        for t in range(0, visible.shape[0], step):
            idx = np.flatnonzero(visible[t])
            frames.append(np.full(len(idx), t)), points.append(idx)
        return np.concatenate(frames).astype(np.int64), np.concatenate(points).astype(np.int64)
    raise ValueError(f"unknown query mode {mode!r}; choose from {QUERY_MODES}")


def evaluation_mask(query_frames: np.ndarray, num_frames: int, mode: QueryMode) -> np.ndarray:
    """(T, N) bool: the frames scored for each query ("first": after it; "strided": all but it)."""
    t = np.arange(num_frames)[:, None]
    q = np.asarray(query_frames)[None, :]
    if mode == "first":
        return t > q
    if mode == "strided":
        return t != q
    raise ValueError(f"unknown query mode {mode!r}; choose from {QUERY_MODES}")


def tapvid_metrics(query_frames: np.ndarray, gt_tracks: np.ndarray, gt_visible: np.ndarray,
                   pred_tracks: np.ndarray, pred_visible: np.ndarray, mode: QueryMode,
                   size: tuple[int, int]) -> dict[str, float]:
    """TAP-Vid metrics of one video: N queries, tracks (T, N, 2) as (x, y) pixels of a (H, W) video.

    Returns occlusion_accuracy, delta_avg, average_jaccard, and pts_within_{d} / jaccard_{d} per
    threshold d. A metric with nothing to score is NaN.
    """
    scale = np.array([TAPVID_SIZE[1] / size[1], TAPVID_SIZE[0] / size[0]])
    evaluated = evaluation_mask(query_frames, gt_tracks.shape[0], mode)
    visible, pred_vis = np.asarray(gt_visible, bool), np.asarray(pred_visible, bool)
    dist2 = (((np.asarray(pred_tracks) - np.asarray(gt_tracks)) * scale) ** 2).sum(-1)  # (T, N)
    out = {"occlusion_accuracy": _ratio(((pred_vis == visible) & evaluated).sum(), evaluated.sum())}
    gt_positives = (visible & evaluated).sum()
    for d in TAPVID_THRESHOLDS:
        within = dist2 < d * d
        correct = within & visible
        true_pos = (correct & pred_vis & evaluated).sum()
        # predicted visible but occluded in the ground truth, or too far away
        false_pos = (pred_vis & (~visible | ~within) & evaluated).sum()
        out[f"pts_within_{d}"] = _ratio((correct & evaluated).sum(), gt_positives)
        # TP + FN = every ground-truth-visible evaluated point
        out[f"jaccard_{d}"] = _ratio(true_pos, gt_positives + false_pos)
    out["delta_avg"] = float(np.mean([out[f"pts_within_{d}"] for d in TAPVID_THRESHOLDS]))
    out["average_jaccard"] = float(np.mean([out[f"jaccard_{d}"] for d in TAPVID_THRESHOLDS]))
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def mean_over_videos(per_video: Iterable[dict[str, float]]) -> dict[str, float]:
    """Average each metric over videos, skipping videos where it is NaN (nothing to score)."""
    rows = list(per_video)
    if not rows:
        return {}
    with np.errstate(all="ignore"):
        return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows)
                else float("nan") for k in rows[0]}


# ------------------------------------------------------------------------- running the models


@torch.no_grad()
def predict_flow(model: torch.nn.Module, img0: Tensor, img1: Tensor, num_updates: int,
                 batch_size: int = 8) -> Tensor:
    """Flow for many pairs (N, 3, H, W) in batches; eval mode, no gradients -> (N, 2, H, W)."""
    was_training = model.training
    model.eval()
    try:
        out = [estimate_flow(model, img0[i:i + batch_size], img1[i:i + batch_size], num_updates)
               for i in range(0, len(img0), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate_flow_clip(model: torch.nn.Module, frames: np.ndarray, gt_flow: np.ndarray,
                       num_updates: int, batch_size: int = 8, *, pairs: np.ndarray | None = None
                       ) -> tuple[dict[str, float], Tensor]:
    """Flow metrics over consecutive pairs of one clip: frames (T, H, W, 3) uint8, gt (T-1, H, W, 2).

    `pairs` picks the first frames t of the pairs (t, t+1) to score (default: all). Returns the
    metrics and the predicted flow (len(pairs), 2, H, W) (for pictures).
    """
    t0 = np.arange(len(gt_flow)) if pairs is None else np.asarray(pairs)
    images = image_to_tensor(np.asarray(frames))  # (T, 3, H, W)
    pred = predict_flow(model, images[t0], images[t0 + 1], num_updates, batch_size)
    target = torch.from_numpy(np.ascontiguousarray(np.asarray(gt_flow)[t0])).permute(0, 3, 1, 2)
    return {**flow_metrics(pred, target), **flow_diagnostics(pred, target)}, pred


def evaluate_tracker_clip(model: PointTracker, frames: np.ndarray, tracks: np.ndarray,
                          visible: np.ndarray, mode: QueryMode, iters: int
                          ) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """TAP-Vid metrics of `model` on one clip: frames (T, H, W, 3) uint8, tracks (T, P, 2), visible (T, P).

    "first" tracks forward from each query; "strided" both ways. Predicted visibility is logit > 0.
    Returns the metrics and (query frames, predicted tracks (T, N, 2), predicted visibility (T, N)).
    """
    query_frames, points = sample_queries(visible, mode)
    gt_tracks, gt_vis = tracks[:, points], visible[:, points]
    if len(points) == 0:
        empty = np.zeros((len(frames), 0, 2), np.float32)
        return tapvid_metrics(query_frames, empty, gt_vis, empty, gt_vis, mode, frames.shape[1:3]), \
            (query_frames, empty, gt_vis)
    xy = gt_tracks[query_frames, np.arange(len(points))]  # (N, 2) at each query frame
    queries = torch.from_numpy(np.concatenate([query_frames[:, None], xy], 1)).float()[None]
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]  # (1, T, 3, H, W) uint8
    was_training = model.training
    model.eval()
    try:
        coords, logits = track_long(model, video, queries, iters=iters,
                                    direction="forward" if mode == "first" else "both")
    finally:
        model.train(was_training)
    pred, pred_vis = coords[0].numpy(), (logits[0] > 0).numpy()
    metrics = tapvid_metrics(query_frames, gt_tracks, gt_vis, pred, pred_vis, mode, frames.shape[1:3])
    return metrics, (query_frames, pred, pred_vis)


@torch.no_grad()
def unlabelled_flow_metrics(model: torch.nn.Module, img0: Tensor, img1: Tensor, num_updates: int,
                            alpha: float, beta: float, batch_size: int = 8) -> dict[str, float]:
    """Label-free flow quality on pairs (N, 3, H, W): cycle-consistent fraction and photometric error.

    The cycle check is the pseudo-label filter's (`pipeline.motion.cycle.flow_cycle_mask` with the given
    alpha, beta), counted over the pixels whose forward flow lands inside the frame; the
    photometric error is `photometric_error` averaged over pairs. Both are means over pairs.
    """
    fwd = predict_flow(model, img0, img1, num_updates, batch_size)
    bwd = predict_flow(model, img1, img0, num_updates, batch_size)
    fraction = cycle_consistent_fraction(fwd, bwd, alpha, beta)
    photo = photometric_error(img0, img1, fwd)
    return {"cycle_consistent_fraction": float(fraction.mean()), "photometric_error": float(photo.mean())}


def evaluate_ground_truth(gt, flow_model: torch.nn.Module | None, tracker: PointTracker | None,
                          flow_updates: int, tracker_iters: int, pairs_per_clip: int | None = None
                          ) -> dict[str, dict[str, float]]:
    """Score the models on every clip of a ground-truth store (gt.zarr: frames, flow, tracks, visible).

    Returns {"flow": EPE and accuracies, "tracks_first": TAP-Vid metrics, "tracks_strided": ...},
    each averaged over clips; a model given as None is not scored. Flow is scored on
    `pairs_per_clip` evenly spaced pairs of each clip (None: all of them).
    """
    pairs = evenly_spaced(gt["flow"].shape[1], pairs_per_clip)
    flow_rows: list[dict[str, float]] = []
    track_rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in QUERY_MODES}
    for i in progress(range(gt["frames"].shape[0]), desc="evaluate", unit="clip"):
        frames = np.asarray(gt["frames"][i])
        if flow_model is not None:
            flow_rows.append(evaluate_flow_clip(flow_model, frames, np.asarray(gt["flow"][i]), flow_updates,
                                                pairs=pairs)[0])
        if tracker is not None:
            tracks, visible = np.asarray(gt["tracks"][i]), np.asarray(gt["visible"][i])
            for mode in QUERY_MODES:
                track_rows[mode].append(evaluate_tracker_clip(tracker, frames, tracks, visible, mode,
                                                              tracker_iters)[0])
    out = {"flow": mean_over_videos(flow_rows)} if flow_model is not None else {}
    if tracker is not None:
        out.update({f"tracks_{mode}": mean_over_videos(rows) for mode, rows in track_rows.items()})
    return out


def open_ground_truth(motion_gt: Path) -> zarr.Group:
    """`motion_gt/gt.zarr` as demo_data writes it; a clear error when it is missing or incomplete."""
    path = Path(motion_gt) / "gt.zarr"
    require(path, "motion ground truth", "demo_data")
    group = zarr.open_group(str(path), mode="r")
    missing = [name for name in ("frames", "flow", "tracks", "visible") if name not in group]
    if missing:
        raise StageError(f"{path}: not a motion ground-truth store (missing {missing})")
    return group


def zero_motion_flow_scores(gt: zarr.Group, pairs_per_clip: int | None = None) -> dict[str, float]:
    """Flow metrics of predicting no motion on the pairs `evaluate_ground_truth` scores: the floor a
    useful model must beat."""
    pairs = evenly_spaced(gt["flow"].shape[1], pairs_per_clip)
    rows = []
    for i in range(gt["flow"].shape[0]):
        target = torch.from_numpy(np.asarray(gt["flow"][i])[pairs]).permute(0, 3, 1, 2)
        rows.append(flow_metrics(torch.zeros_like(target), target))
    return mean_over_videos(rows)


def zero_motion_tracks(tracks: np.ndarray, visible: np.ndarray, mode: QueryMode,
                       size: tuple[int, int]) -> dict[str, float]:
    """TAP-Vid metrics on one clip (tracks (T, P, 2), visible (T, P)) of predicting that every query
    point stays where it was queried, visible throughout: the floor a useful tracker must beat."""
    query_frames, points = sample_queries(visible, mode)
    gt_tracks, gt_visible = tracks[:, points], visible[:, points]
    still = np.broadcast_to(gt_tracks[query_frames, np.arange(len(points))][None], gt_tracks.shape)
    return tapvid_metrics(query_frames, gt_tracks, gt_visible, still, np.ones_like(gt_visible), mode, size)


def zero_motion_track_scores(gt: zarr.Group) -> dict[str, dict[str, float]]:
    """`zero_motion_tracks` over the clips of a motion_gt store, per query mode, keyed as
    `evaluate_ground_truth` keys the tracker's scores ("tracks_first", "tracks_strided")."""
    size = tuple(gt["frames"].shape[2:4])
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in QUERY_MODES}
    for i in range(gt["tracks"].shape[0]):
        tracks, visible = np.asarray(gt["tracks"][i]), np.asarray(gt["visible"][i])
        for mode in QUERY_MODES:
            rows[mode].append(zero_motion_tracks(tracks, visible, mode, size))
    return {f"tracks_{mode}": mean_over_videos(found) for mode, found in rows.items()}


def consecutive_pairs(frames: zarr.Array, clips: np.ndarray, count: int) -> tuple[Tensor, Tensor]:
    """Frames (N, 3, H, W) of up to `count` pairs (t, t+1) spread evenly over the given clips of a
    frames array (N, T, H, W, 3): first frames, second frames."""
    length = frames.shape[1]
    picks = evenly_spaced(len(clips) * (length - 1), count)
    which, t0 = np.divmod(picks, length - 1)
    videos = {int(c): np.asarray(frames[int(clips[c])]) for c in np.unique(which)}
    img0 = np.stack([videos[int(c)][t] for c, t in zip(which, t0, strict=True)])
    img1 = np.stack([videos[int(c)][t + 1] for c, t in zip(which, t0, strict=True)])
    return image_to_tensor(img0), image_to_tensor(img1)
