"""pseudo_labels: cycle-consistent flow and track labels from unlabelled clips (Sun et al. 2024, stage 1).

For the chosen clips of the frames store (`paths.clips`, or motion_gt's frames with `source:
motion_gt`, whose ground truth is never read; `clip_filter: unlabelled` keeps the clips without a
class label, in the demo the real sample videos; `max_clips` spreads a subset evenly), the models
run forward and backward in time and only what agrees is kept (the tests are in `pipeline.motion.cycle`):

- flow: `pairs_per_clip` pairs (t0, t0 + frame_step); a pixel is a label when the forward flow and
  the backward flow warped onto it cancel (alpha, beta), the colours match (colour, averaged over a
  colour_window neighbourhood), |f| < max_flow and the target lies in the frame;
- tracks: `windows_per_clip` windows of S frames (the tracker's window); queries on a grid every
  `grid_step` px of the window's first frame, tracked to its last frame, re-queried there and
  tracked back on the reversed clip; a track is kept when both agree within tau px in every frame.

Length thresholds (beta, max_flow, tau) are given at the paper's resolutions and, with
`scale_thresholds`, multiplied by `pipeline.motion.cycle.resolution_scale` (sqrt of the area ratio).
Runs once per source (dvc.yaml's `pseudo_labels@clips` and `pseudo_labels@motion_gt`).
Inputs: the frames store, `artifacts/motion_pretrain/{flow,tracker}.pt`. Outputs: the source's label
store (`paths.labels` or `paths.motion_gt_labels`; layout in `pipeline.motion.label_store`),
`reports/pseudo_labels/<source>/` (stats.json: every count, the fraction of flow pixels passing each test,
the thresholds; speed histograms PNG), `metrics/pseudo_labels/<source>.json` (kept fractions, flow
pairs and tracks kept).
Clip by clip, atomic, resumable after a kill; `--shard i/n` labels every n-th clip into the shared
work directory and the run without `--shard` merges them (the same store as one unsharded run).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from models.flow import estimate_flow
from models.tracker import PointTracker
from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir, remove_path
from pipeline.core.errors import StageError
from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import LabelSource, Paths, StageParams
from pipeline.core.progress import progress
from pipeline.core.results import write_results
from pipeline.core.shards import ProgressMarkers, Shard, finish_plan, plan_once
from pipeline.core.stores import open_clips
from pipeline.core.tensors import image_to_tensor
from pipeline.motion.checkpoints import load_flow, load_point_tracker
from pipeline.motion.cycle import (
    FLOW_TESTS,
    FlowThresholds,
    flow_label_tests,
    forward_backward_tracks,
    grid_queries,
    resolution_scale,
    track_cycle_mask,
)
from pipeline.motion.evaluate import evenly_spaced
from pipeline.motion.label_store import (
    SPEED_EDGES,
    append_flow,
    append_store,
    append_tracks,
    create_label_store,
    group_tracks,
    iter_flow,
    open_label_store,
    read_tracks,
    save_histogram_figure,
    speed_histogram,
    track_speed,
)

log = logging.getLogger(__name__)

# metrics/pseudo_labels/<source>.json (DVC's columns): how much survived the cycle tests, and how many
# labels that is; the per-test pass counts, histograms and thresholds are in stats.json
HEADLINE = ("kept_fraction_flow", "kept_fraction_tracks", "flow_pairs", "tracks_kept")


class Params(StageParams):
    source: LabelSource = Field("clips", description="frames to label: paths.clips (writes "
                                "paths.labels), or paths.motion_gt/gt.zarr, its frames only (writes "
                                "paths.motion_gt_labels)")
    clip_filter: Literal["all", "unlabelled"] = Field("all", description="which clips of the store to "
                                                      "label: all, or only those without a class label "
                                                      "(in the demo: the real sample videos)")
    max_clips: int | None = Field(None, ge=1, description="label at most N of the selected clips, "
                                  "evenly spaced over them (null: all)")
    pairs_per_clip: int | None = Field(4, ge=1, description="flow pairs per clip, evenly spaced (null: "
                                       "every pair, as the paper labels its test domain)")
    frame_step: int = Field(1, ge=1, description="flow from frame t0 to t0 + frame_step")
    windows_per_clip: int | None = Field(2, ge=1, description="S-frame track windows per clip, evenly "
                                         "spaced (null: every window start)")
    grid_step: int = Field(8, ge=1, description="px between track queries (a grid on the first frame)")
    points_per_sample: int = Field(128, ge=1, description="tracks per stored sample (P)")
    flow_updates: int = Field(8, ge=1, description="RAFT updates; recorded in the label store, and refine "
                              "trains and scores with the same count")
    tracker_iters: int = Field(6, ge=1, description="tracker updates per window; recorded in the label "
                               "store, and densify and refine use the same count")
    alpha: float = Field(0.002, ge=0, description="flow cycle test: relative tolerance")
    beta: float = Field(0.1, ge=0, description="flow cycle test: absolute tolerance "
                        "(px at flow_reference_size)")
    colour: float = Field(0.005, gt=0, description="colour constancy: max mean |I0 - warp(I1, f)| on "
                          "[-0.5, 0.5] images")
    colour_window: int = Field(1, ge=1, description="the colour error is averaged over this square "
                               "neighbourhood (odd; 1 = per pixel, as the paper)")
    max_flow: float = Field(400.0, gt=0, description="flow labels must be shorter "
                            "(px at flow_reference_size)")
    tau: float = Field(3.0, gt=0, description="track cycle test: max forward-backward distance in any "
                       "frame (px at track_reference_size)")
    flow_reference_size: tuple[int, int] = Field((436, 1024), description="(H, W) the flow thresholds "
                                                 "are given at (Sintel)")
    track_reference_size: tuple[int, int] = Field((256, 448), description="(H, W) tau is given at")
    scale_thresholds: bool = Field(True, description="scale beta, max_flow, tau from the reference "
                                   "sizes to the clips' size (x sqrt(area ratio))")
    flow_model_name: Literal["raft_small", "raft_large"] = Field(
        "raft_small", description="RAFT variant, if the flow checkpoint is not in our own format")

    @field_validator("colour_window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (a window centred on the pixel), got {value}")
        return value


def run(params: Params, *, clips: Path, flow_model: Path, tracker: Path, labels: Path, reports: Path,
        metrics: Path, shard: Shard | None = None) -> dict[str, Path]:
    """Label the clips of `clips` with `flow_model` and `tracker`; write `labels` and the reports.

    Each clip is labelled into a small store of its own in a work directory shared by the shards
    (pipeline/core/shards.py); with `shard`, only that shard's clips are labelled and the work directory
    is returned. The run without `shard` labels whatever is left, merges the clips in order into
    `labels` (the same store however the work was split) and writes the reports.
    """
    store = open_clips(clips)
    frames = store["frames"]
    chosen = [int(c) for c in select_clips(store, params, clips)]
    size = tuple(frames.shape[2:4])
    flow_net, track_net = _load_models(flow_model, tracker, params)
    window = track_net.config.window
    if frames.shape[1] < max(window, params.frame_step + 1):
        raise StageError(f"{clips}: clips have {frames.shape[1]} frames; tracks need {window} "
                         f"(the tracker's window) and flow pairs {params.frame_step + 1}")
    thresholds, tau = scaled_thresholds(params, size)
    attrs = {"clips": str(clips), "source": params.source, "tau": tau, **thresholds.as_dict(),
             "labelled_clips": chosen, "frame_step": params.frame_step,
             "flow_updates": params.flow_updates, "tracker_iters": params.tracker_iters,
             "params": params.model_dump(mode="json")}
    work = work_dir(labels)
    _, resumed = plan_once(work, work_fingerprint(params, clips, frames.shape, flow_model, tracker),
                           lambda _: {"clips": chosen})
    markers = ProgressMarkers(work)
    mine = chosen if shard is None else shard.select(chosen)
    todo = markers.pending(mine, key=str)
    if resumed and len(todo) < len(mine):
        log.info("resuming: %d of %d clips already labelled", len(mine) - len(todo), len(mine))
    for clip in progress(todo, desc="pseudo-labels", unit="clip"):
        with atomic_dir(part_path(work, clip)) as part_dir:
            part = create_label_store(part_dir, image_size=size, window=window,
                                      points=params.points_per_sample, attrs=attrs)
            video = image_to_tensor(frames[clip])  # (T, 3, H, W)
            part.attrs["stats"] = {**label_flow(part, clip, video, flow_net, thresholds, params),
                                   **label_tracks(part, clip, video, track_net, tau, params)}
        markers.mark_done(clip)
    if shard is not None:
        log.info("shard %s: %d of %d clips in %s", shard, len(mine), len(chosen), work)
        current_run().log_metrics({"data/shard_clips": len(mine)})
        return {"partial": work}
    with atomic_dir(labels) as tmp:
        group = create_label_store(tmp, image_size=size, window=window, points=params.points_per_sample,
                                   attrs=attrs)
        parts = [open_label_store(part_path(work, clip)) for clip in chosen]
        for part in parts:
            append_store(group, part)
        stats = summarise(group, [part.attrs["stats"] for part in parts])
        group.attrs.update({k: v for k, v in stats.items() if k.startswith("kept_")})
    finish_plan(work)
    remove_path(work)
    return report(stats, thresholds, tau, labels=labels, reports=reports, metrics=metrics)


def report(stats: dict, thresholds: FlowThresholds, tau: float, *, labels: Path, reports: Path,
           metrics: Path) -> dict[str, Path]:
    """Write stats.json (everything), the speed histograms and the metrics (the headline); log them."""
    reports.mkdir(parents=True, exist_ok=True)
    write_results({**stats, "thresholds": {**thresholds.as_dict(), "tau": tau}}, reports=reports,
                  metrics=metrics, headline=HEADLINE, name="stats.json")
    save_histogram_figure(reports / "speed_histograms.png",
                          {"kept tracks (mean speed)": {"tracks": stats["track_speed_histogram"]},
                           "kept flow pixels (|f|)": {"flow": stats["flow_speed_histogram"]}},
                          xlabel="px / frame")
    summary = {k: v for k, v in stats.items() if not k.endswith("histogram")}
    current_run().log_metrics({f"data/{k}": float(v) for k, v in summary.items()})
    current_run().log_artifact(reports / "speed_histograms.png")
    log.info("kept %.1f%% of flow pixels and %.1f%% of tracks (%d tracks in %d samples); flow pixels "
             "passing each test: %s", 100 * stats["kept_fraction_flow"], 100 * stats["kept_fraction_tracks"],
             stats["tracks_kept"], stats["track_samples"],
             ", ".join(f"{name} {100 * stats[f'pass_fraction_flow_{name}']:.1f}%" for name in FLOW_TESTS))
    return {"labels": labels, "stats": reports / "stats.json", "metrics": metrics}


def run_from_paths(params: Params, paths: Paths, shard: Shard | None = None) -> dict[str, Path]:
    models = paths.artifacts_of("motion_pretrain")
    return run(params, clips=paths.frames(params.source), flow_model=models / "flow.pt",
               tracker=models / "tracker.pt", labels=paths.label_store(params.source),
               reports=paths.reports_of("pseudo_labels", params.source),
               metrics=paths.metrics_of("pseudo_labels", params.source), shard=shard)


def work_dir(labels: Path) -> Path:
    """Where the clips are labelled before the merge: a hidden sibling of `labels`, shared by shards."""
    return labels.with_name(f".{labels.name}.shards")


def part_path(work: Path, clip: int) -> Path:
    """The label store of one clip inside the work directory."""
    return work / "parts" / f"{clip}.zarr"


def select_clips(store, params: Params, path: Path) -> np.ndarray:
    """Indices of the clips to label: those passing `clip_filter`, at most `max_clips` evenly spaced."""
    candidates = np.arange(store["frames"].shape[0])
    if params.clip_filter == "unlabelled":
        if "label" not in store:
            raise StageError(f"{path}: clip_filter=unlabelled needs a `label` array (a clips store)")
        candidates = candidates[np.asarray(store["label"][:]) < 0]
    if len(candidates) == 0:
        raise StageError(f"{path}: no clips to label (clip_filter={params.clip_filter})")
    return candidates[evenly_spaced(len(candidates), params.max_clips)]


def scaled_thresholds(params: Params, size: tuple[int, int]) -> tuple[FlowThresholds, float]:
    """The flow thresholds and tau in pixels of `size` frames (scaled from the reference sizes)."""
    flow_scale = resolution_scale(size, params.flow_reference_size) if params.scale_thresholds else 1.0
    track_scale = resolution_scale(size, params.track_reference_size) if params.scale_thresholds else 1.0
    thresholds = FlowThresholds(alpha=params.alpha, beta=params.beta * flow_scale, colour=params.colour,
                                max_flow=params.max_flow * flow_scale, colour_window=params.colour_window)
    return thresholds, params.tau * track_scale


@torch.no_grad()
def label_flow(group, clip: int, video: torch.Tensor, model: torch.nn.Module, thresholds: FlowThresholds,
               params: Params) -> dict[str, int]:
    """Flow labels of one clip's pairs, appended to the store; returns pixel counts."""
    t0 = evenly_spaced(video.shape[0] - params.frame_step, params.pairs_per_clip)
    t1 = t0 + params.frame_step
    both = estimate_flow(model, torch.cat([video[t0], video[t1]]), torch.cat([video[t1], video[t0]]),
                         params.flow_updates)  # forward and backward in one batch
    fwd, bwd = both[:len(t0)], both[len(t0):]
    tests = flow_label_tests(video[t0], video[t1], fwd, bwd, thresholds)
    valid = torch.stack(list(tests.values())).all(0)
    pairs = np.stack([np.full(len(t0), clip), t0, t1], 1)
    append_flow(group, pairs, fwd.numpy(), valid.numpy())
    passed = {f"flow_pass_{name}": int(mask.sum()) for name, mask in tests.items()}
    return {"flow_pixels": int(valid.numel()), "flow_kept": int(valid.sum()), **passed}


def label_tracks(group, clip: int, video: torch.Tensor, model: PointTracker, tau: float,
                 params: Params) -> dict[str, int]:
    """Cycle-consistent tracks of one clip's windows, appended as samples; returns track counts."""
    s, size = model.config.window, tuple(video.shape[-2:])
    starts = evenly_spaced(video.shape[0] - s + 1, params.windows_per_clip)
    queries = grid_queries(size, params.grid_step)
    windows = torch.stack([video[t:t + s] for t in starts])  # (W, S, 3, H, W)
    forward, backward = forward_backward_tracks(model, windows, queries.expand(len(starts), -1, -1),
                                                params.tracker_iters)
    keep = track_cycle_mask(forward, backward, tau, size)  # (W, N)
    window_of, point = np.nonzero(keep.numpy())
    coords = forward.numpy()[window_of, :, point]  # (n, S, 2)
    packed = group_tracks(np.full(len(point), clip), starts[window_of], coords, params.points_per_sample)
    append_tracks(group, *packed)
    return {"tracks_queried": int(keep.numel()), "tracks_kept": int(keep.sum())}


def summarise(group, markers: list[dict]) -> dict:
    """Kept fractions and speed histograms of everything in the store."""
    keys = ("flow_pixels", "flow_kept", "tracks_queried", "tracks_kept",
            *(f"flow_pass_{name}" for name in FLOW_TESTS))
    total = {key: sum(m.get(key, 0) for m in markers) for key in keys}
    _, _, coords = read_tracks(group)
    magnitudes = [np.linalg.norm(flow, axis=1)[valid] for _, flow, valid in iter_flow(group)]
    flow_speeds = np.concatenate(magnitudes) if magnitudes else np.zeros(0)
    return {"clips": len(markers), "flow_pairs": int(group["flow/pairs"].shape[0]),
            "track_samples": int(group["tracks/clip"].shape[0]), **total,
            "kept_fraction_flow": total["flow_kept"] / max(total["flow_pixels"], 1),
            "kept_fraction_tracks": total["tracks_kept"] / max(total["tracks_queried"], 1),
            **{f"pass_fraction_flow_{name}": total[f"flow_pass_{name}"] / max(total["flow_pixels"], 1)
               for name in FLOW_TESTS},
            "track_speed_histogram": speed_histogram(track_speed(coords), SPEED_EDGES),
            "flow_speed_histogram": speed_histogram(flow_speeds, SPEED_EDGES)}


def _load_models(flow_model: Path, tracker: Path, params: Params) -> tuple[torch.nn.Module, PointTracker]:
    return load_flow(flow_model, params.flow_model_name).eval(), load_point_tracker(tracker).eval()


def work_fingerprint(params: Params, clips: Path, shape: tuple, *models: Path) -> str:
    """Identifies the work: params, the frames store's shape and the model files' contents."""
    return fingerprint(params, clips, list(shape), [file_digest(path) for path in models])


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
