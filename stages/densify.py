"""densify: denser, re-balanced training labels from the pseudo-labels (Sun et al. 2024, stage 1b).

Cycle-consistent tracks are sparse and mostly easy (near-static background). This stage:

1. densifies: around the query point of every kept track, every pixel of a `window_size` x
   `window_size` window becomes a query (at most `max_queries_per_window` per track window, drawn
   at random); they are tracked forward and back and re-checked by the same cycle test with the
   same tau and tracker iterations as `pseudo_labels` (read from the labels' attrs);
2. re-balances tracks: drops "too easy" tracks whose mean speed is <= `static_speed`, then caps
   every speed bin at the median count of the non-empty bins (random draw), so training sees fast
   motion as often as slow;
3. re-balances flow: drops pairs with fewer than `min_valid_fraction` valid pixels or whose valid
   pixels are almost all static (fewer than `min_moving_fraction` move faster than `flow_static_speed`).

Speeds are given at `reference_size` and scaled like pseudo_labels' thresholds (x sqrt(area ratio)).
Runs once per label source (`source`: clips or motion_gt; dvc.yaml's `densify@<source>`).
Inputs: the source's pseudo-labels (`paths.labels` or `paths.motion_gt_labels`), the frames store
they name, `artifacts/motion_pretrain/tracker.pt`. Outputs: the source's train labels
(`paths.train_labels` or `paths.motion_gt_train_labels`, same layout), `reports/densify/<source>/`
(stats.json: counts and speed histograms before/dense/after; their PNG), `metrics/densify/<source>.json`
(tracks, samples, flow pairs and speed entropy after re-balancing). The dense tracking resumes from
`runs/densify/<source>/`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from models.tracker import PointTracker
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir
from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import LabelSource, Paths, StageParams
from pipeline.core.progress import progress
from pipeline.core.results import write_results
from pipeline.core.stores import open_clips
from pipeline.core.tensors import image_to_tensor
from pipeline.motion.checkpoints import load_point_tracker
from pipeline.motion.cycle import forward_backward_tracks, resolution_scale, track_cycle_mask
from pipeline.motion.label_store import (
    SPEED_EDGES,
    append_flow,
    append_tracks,
    create_label_store,
    group_tracks,
    histogram_entropy,
    iter_flow,
    mark_done,
    open_label_store,
    read_tracks,
    recorded_count,
    save_histogram_figure,
    speed_histogram,
    start_partial,
    track_speed,
)

log = logging.getLogger(__name__)

# metrics/densify/<source>.json (DVC's columns): the training labels left after densifying and
# re-balancing, and how even their speeds are; before/dense counts and histograms are in stats.json
HEADLINE = ("tracks_after", "track_samples_after", "flow_pairs_after", "track_speed_entropy_after")


class Params(StageParams):
    source: LabelSource = Field("clips", description="whose pseudo-labels: the clips' (paths.labels -> "
                                "paths.train_labels) or motion_gt's (paths.motion_gt_labels -> "
                                "paths.motion_gt_train_labels)")
    window_size: int = Field(24, ge=1, description="k: every pixel of a k x k window around each kept "
                             "track's query point is re-tracked (the paper: 24-40 px)")
    max_queries_per_window: int = Field(256, ge=1, description="cap on dense queries per track window "
                                        "(a random subset beyond it)")
    static_speed: float = Field(1.0, ge=0, description="tracks with mean speed <= this (px/frame at "
                                "reference_size) are dropped as too easy")
    balance: bool = Field(True, description="cap every speed bin at the median non-empty bin count")
    flow_static_speed: float = Field(1.0, ge=0, description="flow pixels slower than this (px at "
                                     "reference_size) count as static")
    min_moving_fraction: float = Field(0.1, ge=0, le=1, description="drop flow pairs whose valid "
                                       "pixels move less often than this")
    min_valid_fraction: float = Field(0.01, ge=0, le=1, description="drop flow pairs with fewer "
                                      "valid pixels than this fraction")
    reference_size: tuple[int, int] = Field((256, 448), description="(H, W) the speeds are given at")
    scale_thresholds: bool = Field(True, description="scale the speeds to the labels' image size")
    seed: int = Field(0, description="seed of the query subsets and the re-balancing draw")


def run(params: Params, *, labels: Path, tracker: Path, train_labels: Path, work: Path, reports: Path,
        metrics: Path) -> dict[str, Path]:
    """Densify and re-balance `labels` into `train_labels`; dense tracking state lives in `work`."""
    source = open_label_store(labels)
    frames = open_clips(source.attrs["clips"])["frames"]
    size, points = tuple(source.attrs["image_size"]), int(source.attrs["points"])
    scale = resolution_scale(size, params.reference_size) if params.scale_thresholds else 1.0
    model = _load_tracker(tracker)
    dense = densify_tracks(source, frames, model, work / "dense.zarr", params,
                           work_fingerprint(params, labels, tracker))
    clip, start, coords = read_tracks(dense)
    chosen = rebalance_tracks(track_speed(coords), params.static_speed * scale, params.balance,
                              np.random.default_rng(params.seed))
    with atomic_dir(train_labels) as tmp:
        out = create_label_store(tmp, image_size=size, window=int(source.attrs["window"]), points=points,
                                 attrs={**source.attrs, "densify": params.model_dump(mode="json"),
                                        "static_speed_px": params.static_speed * scale})
        append_tracks(out, *group_tracks(clip[chosen], start[chosen], coords[chosen], points))
        flow_kept = copy_moving_flow(source, out, params.flow_static_speed * scale, params)
        stats = summarise(source, coords, coords[chosen], out, flow_kept)
        out.attrs.update({"kept_tracks": stats["tracks_after"], "kept_flow_pairs": stats["flow_pairs_after"]})
    write_reports(stats, reports, metrics)
    log.info("tracks: %d kept -> %d dense -> %d after re-balancing; flow pairs %d -> %d",
             stats["tracks_before"], stats["tracks_dense"], stats["tracks_after"],
             stats["flow_pairs_before"], stats["flow_pairs_after"])
    return {"train_labels": train_labels, "stats": reports / "stats.json", "metrics": metrics}


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, labels=paths.label_store(params.source),
               tracker=paths.artifacts_of("motion_pretrain") / "tracker.pt",
               train_labels=paths.train_label_store(params.source),
               work=paths.runs_of("densify") / params.source,
               reports=paths.reports_of("densify", params.source),
               metrics=paths.metrics_of("densify", params.source))


def densify_tracks(source, frames, model: PointTracker, store: Path, params: Params, signature: str):
    """Re-track dense query windows around every kept track, window by window, into `store` (P = 1)."""
    size, window = tuple(source.attrs["image_size"]), int(source.attrs["window"])
    tau, iters = float(source.attrs["tau"]), recorded_count(source, "tracker_iters")
    clip, start, coords = read_tracks(source)
    groups = sorted({(int(c), int(s)) for c, s in zip(clip, start, strict=True)})
    dense, done = start_partial(store, signature, image_size=size, window=window, points=1,
                                attrs={"clips": source.attrs["clips"], "tau": tau})
    for c, s in progress([g for g in groups if f"{g[0]}_{g[1]}" not in done], desc="densify",
                         unit="window", total=len(groups) - len(done)):
        anchors = coords[(clip == c) & (start == s), 0]  # query points (n, 2) in frame s
        rng = np.random.default_rng([params.seed, c, s])
        queries = dense_queries(anchors, params.window_size, size, params.max_queries_per_window, rng)
        video = image_to_tensor(frames[c, s:s + window])[None]  # (1, S, 3, H, W)
        forward, backward = forward_backward_tracks(model, video, torch.from_numpy(queries)[None], iters)
        keep = track_cycle_mask(forward, backward, tau, size)[0].numpy()
        kept = forward[0].numpy()[:, keep].transpose(1, 0, 2)  # (n, S, 2)
        append_tracks(dense, *group_tracks(np.full(len(kept), c), np.full(len(kept), s), kept, 1))
        mark_done(store, f"{c}_{s}", dense, queried=len(queries), kept=int(keep.sum()))
    return dense


def dense_queries(anchors: np.ndarray, k: int, size: tuple[int, int], cap: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Every pixel of a k x k window around each anchor (x, y), unique, inside the frame: (n, 2) float32.

    Beyond `cap` pixels a random subset of `cap` is taken (sorted, so the order is deterministic).
    """
    h, w = size
    offsets = np.arange(k) - (k - 1) // 2
    ox, oy = np.meshgrid(offsets, offsets)
    centres = np.round(anchors).astype(np.int64)
    pixels = (centres[:, None] + np.stack([ox.ravel(), oy.ravel()], -1)[None]).reshape(-1, 2)
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < w) & (pixels[:, 1] >= 0) & (pixels[:, 1] < h)
    pixels = np.unique(pixels[inside], axis=0)
    if len(pixels) > cap:
        pixels = pixels[np.sort(rng.choice(len(pixels), cap, replace=False))]
    return pixels.astype(np.float32)


def rebalance_tracks(speeds: np.ndarray, static_speed: float, balance: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """Indices of the tracks to keep: faster than `static_speed`, each speed bin capped at the
    median count of the non-empty bins when `balance` (a random draw within a bin)."""
    moving = np.flatnonzero(speeds > static_speed)
    if not balance or len(moving) == 0:
        return moving
    bins = np.digitize(speeds[moving], SPEED_EDGES[1:])
    counts = np.bincount(bins, minlength=len(SPEED_EDGES))
    cap = int(np.median(counts[counts > 0]))
    chosen = [rng.permutation(moving[bins == b])[:cap] for b in np.flatnonzero(counts)]
    return np.sort(np.concatenate(chosen))


def copy_moving_flow(source, out, static_speed: float, params: Params) -> int:
    """Copy the flow pairs with enough valid, moving pixels from `source` to `out`; returns how many."""
    kept = 0
    for pairs, flow, valid in iter_flow(source):
        moving = (np.linalg.norm(flow, axis=1) > static_speed) & valid
        n_valid = valid.sum((1, 2))
        ok = (n_valid >= params.min_valid_fraction * valid[0].size) & (
            moving.sum((1, 2)) >= params.min_moving_fraction * np.maximum(n_valid, 1))
        append_flow(out, pairs[ok], flow[ok], valid[ok])
        kept += int(ok.sum())
    return kept


def summarise(source, dense_coords: np.ndarray, chosen_coords: np.ndarray, out, flow_kept: int) -> dict:
    """Counts, speed histograms (before / after densifying / after re-balancing) and their flatness."""
    _, _, before = read_tracks(source)
    hists = {name: speed_histogram(track_speed(c))
             for name, c in (("before", before), ("dense", dense_coords), ("after", chosen_coords))}
    stats = {"tracks_before": len(before), "tracks_dense": len(dense_coords),
             "tracks_after": len(chosen_coords), "track_samples_after": int(out["tracks/clip"].shape[0]),
             "flow_pairs_before": int(source["flow/pairs"].shape[0]), "flow_pairs_after": flow_kept}
    for name, hist in hists.items():
        stats[f"track_speed_histogram_{name}"] = hist
        stats[f"track_speed_entropy_{name}"] = histogram_entropy(hist)
    for name, store in (("before", source), ("after", out)):
        speeds = [np.linalg.norm(f, axis=1)[v] for _, f, v in iter_flow(store)]
        stats[f"flow_speed_histogram_{name}"] = speed_histogram(np.concatenate(speeds) if speeds else [])
    return stats


def write_reports(stats: dict, reports: Path, metrics: Path) -> None:
    """stats.json (everything) and the before/after speed histograms in `reports`; the headline in
    `metrics`; the counts and entropies in MLflow."""
    reports.mkdir(parents=True, exist_ok=True)
    write_results(stats, reports=reports, metrics=metrics, headline=HEADLINE, name="stats.json")
    tracks = {name: stats[f"track_speed_histogram_{name}"] for name in ("before", "dense", "after")}
    flow = {name: stats[f"flow_speed_histogram_{name}"] for name in ("before", "after")}
    save_histogram_figure(reports / "speed_histograms.png", {"tracks (mean speed)": tracks,
                                                             "flow labels (|f| of valid pixels)": flow},
                          xlabel="px / frame")
    summary = {k: v for k, v in stats.items() if "histogram" not in k}
    current_run().log_metrics({f"data/{k}": float(v) for k, v in summary.items()})
    current_run().log_artifact(reports / "speed_histograms.png")


def _load_tracker(path: Path) -> PointTracker:
    return load_point_tracker(path).eval()


def work_fingerprint(params: Params, labels: Path, tracker: Path) -> str:
    """Identifies the dense tracking: its params, the labels' tracks and the tracker's weights."""
    relevant = params.model_dump(mode="json", include={"window_size", "max_queries_per_window", "seed"})
    group = open_label_store(labels)
    return fingerprint(relevant, group["tracks/coords"][:], group["tracks/start"][:], file_digest(tracker),
                       recorded_count(group, "tracker_iters"))


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
