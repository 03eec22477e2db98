"""Point tracks drawn on video frames, for `mam2 track`.

Each point has its own colour (`pipeline.motion.pictures.point_colors`). In every frame it gets a
trail through its last positions, then a marker: a filled dot with a dark rim where the tracker says
it is visible, a hollow ring where it says it is occluded (the trail is faint there too).
Frames (T, H, W, 3) uint8; tracks (T, N, 2) (x, y) pixels, centres at integer coordinates;
visible (T, N) bool.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.motion.pictures import point_colors

OCCLUDED_ALPHA = 0.4  # opacity of trail segments that end at an occluded position
RIM = np.array([20, 20, 20], np.uint8)


def marker_radius(height: int, width: int) -> int:
    """Marker radius that stays visible at any frame size: about 1/80 of the short side, >= 2 px."""
    return max(2, round(min(height, width) / 80))


def _paint(image: np.ndarray, mask: np.ndarray, top: int, left: int, color: np.ndarray, alpha: float) -> None:
    """Blend `color` into image[top:, left:] where `mask` (clipped to the image) is true."""
    h, w = image.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + mask.shape[0], h), min(left + mask.shape[1], w)
    if y0 >= y1 or x0 >= x1:
        return
    sub = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    region = image[y0:y1, x0:x1]
    region[sub] = np.round(alpha * color + (1 - alpha) * region[sub]).astype(np.uint8)


def _distance_patch(x: float, y: float, reach: int) -> tuple[np.ndarray, int, int]:
    """Distances to (x, y) over the pixel square of half-side `reach` around it, and its top-left."""
    cx, cy = round(x), round(y)
    ys, xs = np.mgrid[cy - reach:cy + reach + 1, cx - reach:cx + reach + 1]
    return np.hypot(xs - x, ys - y), cy - reach, cx - reach


def draw_marker(image: np.ndarray, x: float, y: float, radius: int, color: np.ndarray, visible: bool) -> None:
    """A filled dot with a dark rim (visible) or a hollow ring (occluded) at (x, y), in place."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return
    dist, top, left = _distance_patch(x, y, radius + 2)
    if visible:
        _paint(image, (dist > radius) & (dist <= radius + 1.2), top, left, RIM, 1.0)
        _paint(image, dist <= radius, top, left, color, 1.0)
    else:
        _paint(image, (dist > radius - 1.5) & (dist <= radius + 0.5), top, left, color, 1.0)


def draw_segment(image: np.ndarray, start: np.ndarray, end: np.ndarray, color: np.ndarray,
                 alpha: float = 1.0) -> None:
    """A 1 px line from `start` to `end` (x, y), in place."""
    if not (np.isfinite(start).all() and np.isfinite(end).all()):
        return
    steps = int(np.ceil(np.abs(end - start).max())) + 1
    points = np.round(np.linspace(start, end, steps)).astype(np.int64)
    h, w = image.shape[:2]
    keep = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    xs, ys = points[keep, 0], points[keep, 1]
    image[ys, xs] = np.round(alpha * color + (1 - alpha) * image[ys, xs]).astype(np.uint8)


def draw_track_overlay(frames: np.ndarray, tracks: np.ndarray, visible: np.ndarray, trail: int = 12,
                       radius: int | None = None) -> np.ndarray:
    """Frames with every point's trail (its last `trail` moves) and marker; a new (T, H, W, 3) array."""
    out = np.array(frames, copy=True)
    radius = marker_radius(*frames.shape[1:3]) if radius is None else radius
    colors = point_colors(tracks.shape[1]).astype(np.float64)
    for t in range(len(out)):
        for n in range(tracks.shape[1]):
            for s in range(max(t - trail, 0), t):
                alpha = 1.0 if visible[s + 1, n] else OCCLUDED_ALPHA
                draw_segment(out[t], tracks[s, n], tracks[s + 1, n], colors[n], alpha)
        for n in range(tracks.shape[1]):
            x, y = tracks[t, n]
            draw_marker(out[t], float(x), float(y), radius, colors[n], bool(visible[t, n]))
    return out
