"""Pictures of motion estimates: flow colour images and point-track overlay videos.

`flow_to_color` colour-codes a flow field (hue = direction, saturation = magnitude, still = white),
`draw_tracks` overlays points on frames, `track_overlays` renders ground truth and model tracks side by
side, `save_comparison` writes the before/after panels the refine stage logs: a PNG of
frame | [ground-truth flow |] flow per model, and an mp4 of [ground-truth tracks |] tracks per model, and
`before_after_chart` draws a target's scores before and after refinement (and zero motion's) as bars.
Frames are (T, H, W, 3) uint8; flow (2, H, W) or (H, W, 2) pixels (x, y); tracks (T, N, 2) (x, y).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.tracker import track_long
from pipeline.core.atomic import save_png
from pipeline.core.figures import BarPanel, bar_panels, figure_image, pyplot
from pipeline.core.tensors import image_to_tensor
from pipeline.data.video import write_mp4
from pipeline.motion.evaluate import evaluate_tracker_clip, predict_flow, sample_queries


def flow_to_color(flow: np.ndarray | Tensor, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-code a flow field (2, H, W) or (H, W, 2) as an (H, W, 3) uint8 image.

    Hue is the direction (right = red, turning through yellow/green/blue as the angle grows),
    saturation the magnitude relative to `max_magnitude` (default: the field's largest), value 1:
    still pixels are white.
    """
    flow = flow.detach().cpu().numpy() if torch.is_tensor(flow) else np.asarray(flow)
    if flow.shape[0] == 2 and flow.shape[-1] != 2:
        flow = np.moveaxis(flow, 0, -1)
    flow = np.nan_to_num(flow.astype(np.float64))
    magnitude = np.hypot(flow[..., 0], flow[..., 1])
    top = max_magnitude if max_magnitude else max(float(magnitude.max()), 1e-6)
    hue = (np.arctan2(flow[..., 1], flow[..., 0]) / (2 * np.pi)) % 1.0
    sat = np.clip(magnitude / top, 0, 1)
    rgb = _hsv_to_rgb(hue, sat, np.ones_like(hue))
    return np.round(rgb * 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1] (the standard six-sector formula)."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[k] for c in choices]) for k in range(3)], -1)


def point_colors(n: int) -> np.ndarray:
    """n distinct saturated colours (N, 3) uint8, evenly spaced in hue."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0)]
                     for i in range(n)], np.uint8).reshape(n, 3)


def draw_tracks(frames: np.ndarray, tracks: np.ndarray, visible: np.ndarray, radius: int = 1
                ) -> np.ndarray:
    """Overlay points on frames: (T, H, W, 3) uint8, tracks (T, N, 2) (x, y), visible (T, N).

    Visible points are filled squares of side 2 radius + 1 in a colour per point; occluded points
    are not drawn. Returns a new (T, H, W, 3) uint8 array.
    """
    out = np.array(frames, copy=True)
    t_len, h, w = out.shape[:3]
    colors = point_colors(tracks.shape[1])
    for t in range(t_len):
        for n in np.flatnonzero(visible[t]):
            x, y = np.round(tracks[t, n]).astype(int)
            if 0 <= x < w and 0 <= y < h:
                out[t, max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1] = colors[n]
    return out


def track_overlays(frames: np.ndarray, tracks: np.ndarray, visible: np.ndarray | None, trackers: tuple,
                 iters: int) -> list[np.ndarray]:
    """Overlay videos (T, H, W, 3): the ground truth (when `visible` (T, P) is given, with `tracks`
    (T, P, 2)) then each tracker's "first"-mode predictions; without ground truth, `tracks` (1, N, 2)
    are frame-0 queries that each tracker follows forward."""
    panels = []
    if visible is not None:
        _, points = sample_queries(visible, "first")
        panels.append(draw_tracks(frames, tracks[:, points], visible[:, points]))
        for model in trackers:
            _, (_, pred, pred_vis) = evaluate_tracker_clip(model, frames, tracks, visible, "first", iters)
            panels.append(draw_tracks(frames, pred, pred_vis))
        return panels
    queries = torch.from_numpy(np.concatenate([np.zeros((tracks.shape[1], 1), np.float32), tracks[0]], 1))
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]
    for model in trackers:
        coords, logits = track_long(model.eval(), video, queries[None], iters=iters, direction="forward")
        panels.append(draw_tracks(frames, coords[0].numpy(), (logits[0] > 0).numpy()))
    return panels


def color_wheel(max_magnitude: float, size: int) -> np.ndarray:
    """The flow colour key: the colour of every vector up to `max_magnitude` px, as a size x size disc."""
    grid = (np.arange(size) - (size - 1) / 2) / ((size - 1) / 2) * max_magnitude
    flow = np.stack(np.meshgrid(grid, grid), axis=-1)
    image = flow_to_color(flow, max_magnitude)
    image[np.linalg.norm(flow, axis=-1) > max_magnitude] = 255
    return image


def labelled_panel(images: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """Images side by side, each titled, rendered as one (H, W, 3) uint8 image."""
    plt = pyplot()
    aspect = images[0].shape[0] / images[0].shape[1]
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.2 * aspect + 0.4), dpi=100)
    for axis, image, title in zip(np.atleast_1d(axes), images, titles, strict=True):
        axis.imshow(image)
        axis.set_title(title, fontsize=7)
        axis.axis("off")
    fig.tight_layout()
    return figure_image(fig)


# (group, metric, panel title, y-axis label) of the before/after chart, in order; a target's chart has
# the ones its scores hold (motion_gt: against ground truth; clips: label-free)
CHART_METRICS = (
    ("flow", "epe", "flow EPE", "px (lower is better)"),
    ("flow", "acc_1px", "flow 1 px accuracy", "fraction of pixels (higher is better)"),
    ("tracks_first", "delta_avg", "tracks δ_avg, first queries", "TAP-Vid δ_avg (higher is better)"),
    ("tracks_strided", "delta_avg", "tracks δ_avg, strided queries", "TAP-Vid δ_avg (higher is better)"),
    ("flow", "cycle_consistent_fraction", "cycle-consistent flow", "fraction of pixels (higher is better)"),
    ("flow", "photometric_error", "photometric error", "mean |I0 - warped I1| (lower is better)"),
)
PHASE_COLOURS = {"before": "tab:blue", "after": "tab:orange", "zero motion": "lightgrey"}


def before_after_chart(scores: dict, title: str) -> np.ndarray:
    """Bars of one target's scores ({"before", "after"[, "zero_motion"]} -> {group: {metric: value}}, as
    the refine stage computes them): per metric of `CHART_METRICS` present, before vs after refinement
    (the change in the panel's title) and zero motion's score as a hatched reference bar where known."""
    panels = []
    for group, name, label, unit in CHART_METRICS:
        before, after = (scores.get(phase, {}).get(group, {}).get(name) for phase in ("before", "after"))
        if before is None or after is None:
            continue
        bars = {"before": before, "after": after}
        zero = scores.get("zero_motion", {}).get(group, {}).get(name)
        if zero is not None:
            bars["zero motion"] = zero
        change = f"after - before: {after - before:+.3g}"
        change += f" ({after / before - 1:+.1%})" if before else ""
        panels.append(BarPanel(f"{label}\n{change}", unit, bars, hatched={"zero motion"}))
    if not panels:
        raise ValueError(f"no before/after scores to chart among {sorted(scores)}")
    return bar_panels(panels, title, colours=PHASE_COLOURS)


def save_comparison(frames: np.ndarray, tracks: np.ndarray, visible: np.ndarray | None,
                    reference_flow: np.ndarray | None, flows: tuple, trackers: tuple, *, flow_updates: int,
                    tracker_iters: int, stem: Path) -> tuple[np.ndarray, Path, Path]:
    """Write `<stem>_flow.png` and `<stem>_tracks.mp4` for one clip (T, H, W, 3) uint8.

    The flow image is taken at the middle pair t: frame t | reference_flow[t] (reference_flow is the
    clip's ground truth (T-1, H, W, 2), if given) | each model of `flows`, all coloured on one
    magnitude scale. The video shows the ground truth (`tracks` (T, P, 2) with `visible` (T, P)) or,
    with `visible` None, frame-0 queries `tracks` (1, N, 2), then each tracker's tracks. Returns the flow
    image and the two paths.
    """
    t = (len(frames) - 1) // 2
    pair = image_to_tensor(frames[t:t + 2])
    preds = [predict_flow(m, pair[:1], pair[1:], flow_updates)[0].permute(1, 2, 0).numpy() for m in flows]
    fields = ([np.asarray(reference_flow[t])] if reference_flow is not None else []) + preds
    top = max(float(np.linalg.norm(f, axis=-1).max()) for f in fields)
    names = [f"frame {t}"] + (["ground truth"] if reference_flow is not None else [])
    for name, pred in zip(("before", "after", *(f"model {i}" for i in range(2, len(preds)))), preds,
                          strict=False):
        if reference_flow is not None:
            name += f" (EPE {np.linalg.norm(pred - reference_flow[t], axis=-1).mean():.2f} px)"
        names.append(name)
    colours = [flow_to_color(f, top) for f in fields]
    panel = labelled_panel([frames[t], *colours, color_wheel(top, frames.shape[1])],
                           [*names, f"colour key (radius {top:.1f} px)"])
    png, mp4 = stem.with_name(stem.name + "_flow.png"), stem.with_name(stem.name + "_tracks.mp4")
    save_png(panel, png)
    video = np.concatenate(track_overlays(frames, tracks, visible, trackers, tracker_iters), axis=2)
    write_mp4(mp4, video, fps=8.0)
    return panel, png, mp4
