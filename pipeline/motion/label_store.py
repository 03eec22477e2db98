"""The motion label stores `labels.zarr` / `train_labels.zarr` (Zarr v3): layout, appends, resume.

Layout (one group; `pseudo_labels` writes labels.zarr, `densify` train_labels.zarr, `refine` reads):

- `flow/pairs` (M, 3) int32: (clip index, frame t0, frame t1); the label is the flow from frame t0
  to frame t1 of that clip in the frames store named by attrs["clips"];
- `flow/flow` (M, 2, H, W) float16, pixels, channel 0 = x, 1 = y; `flow/valid` (M, H, W) bool;
- `tracks/clip` (K,) int32, `tracks/start` (K,) int32 (first frame of the S-frame window);
  `tracks/coords` (K, S, P, 2) float32 (x, y) pixels; `tracks/valid` (K, S, P) bool. A sample is
  up to P tracks of one window; kept tracks are valid in every frame, padding points in none;
- attrs: the thresholds used, kept fractions, "clips" (the frames store), "window" (S),
  "points" (P), "image_size" [H, W], and whatever else the writing stage adds.

Stores are built clip by clip in a partial directory (`start_partial` / `mark_done`): each finished
unit of work leaves a marker holding the row counts after it, so a killed run resumes by cutting
the arrays back to the last marker (rows appended after it belong to unfinished work). Work that
shards run side by side is written as one small store per unit instead, and `append_store` merges
them in a fixed order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.atomic import remove_path, save_figure
from pipeline.core.errors import StageError, require
from pipeline.core.stores import compressor

PROGRESS = "_progress"
FLOW_ARRAYS = ("flow/pairs", "flow/flow", "flow/valid")
TRACK_ARRAYS = ("tracks/clip", "tracks/start", "tracks/coords", "tracks/valid")
TRACK_CHUNK = 256  # samples per chunk of the small track arrays


def create_label_store(path: Path | str, *, image_size: tuple[int, int], window: int, points: int,
                       attrs: dict[str, Any] | None = None) -> zarr.Group:
    """Create an empty label store (every array has length 0) for (H, W) images, S, P."""
    h, w = image_size
    group = zarr.open_group(str(path), mode="w")
    shapes = {"flow/pairs": ((3,), "int32", 4096), "flow/flow": ((2, h, w), "float16", 1),
              "flow/valid": ((h, w), "bool", 1), "tracks/clip": ((), "int32", 4096),
              "tracks/start": ((), "int32", 4096),
              "tracks/coords": ((window, points, 2), "float32", TRACK_CHUNK),
              "tracks/valid": ((window, points), "bool", TRACK_CHUNK)}
    for name, (tail, dtype, rows) in shapes.items():
        group.create_array(name, shape=(0, *tail), chunks=(rows, *tail), dtype=dtype,
                           compressors=compressor(), fill_value=0)
    group.attrs.update({"window": window, "points": points, "image_size": [h, w], **(attrs or {})})
    return group


def open_label_store(path: Path | str, mode: str = "r") -> zarr.Group:
    """Open a label store, with a clear error when it is missing or not a label store."""
    path = Path(path)
    require(path, "label store", "pseudo_labels")
    group = zarr.open_group(str(path), mode=mode)
    missing = [name for name in (*FLOW_ARRAYS, *TRACK_ARRAYS) if name not in group]
    absent_attrs = [key for key in ("window", "points", "image_size", "clips") if key not in group.attrs]
    if missing or absent_attrs:
        raise StageError(f"{path} is not a label store: missing arrays {missing}, attrs {absent_attrs}")
    return group


def recorded_count(group: zarr.Group, key: str) -> int:
    """The RAFT update or tracker iteration count (`flow_updates`, `tracker_iters`) the labels were
    made with: the one count that labels, refines and scores (the paper's protocol)."""
    if key not in group.attrs:
        raise StageError(f"{group.store}: no `{key}` in its attrs (made by an older pseudo_labels); "
                         f"rerun `mam2 pseudo_labels` and `mam2 densify`")
    return int(group.attrs[key])


def check_recorded_count(group: zarr.Group, key: str, value: int, param: str) -> None:
    """Fail naming both params when `param` (for example refine.flow_updates) is not the count the
    labels in `group` were made with."""
    made = recorded_count(group, key)
    if made != value:
        raise StageError(f"{param} is {value}, but {group.store} was labelled with {key} {made} "
                         f"(pseudo_labels.{key}): one count labels, refines and scores; set them equal")


def counts(group: zarr.Group) -> tuple[int, int]:
    """(flow pairs, track samples) in the store."""
    return group["flow/pairs"].shape[0], group["tracks/clip"].shape[0]


def append_flow(group: zarr.Group, pairs: np.ndarray, flow: np.ndarray, valid: np.ndarray) -> None:
    """Append M flow labels: pairs (M, 3), flow (M, 2, H, W) pixels, valid (M, H, W)."""
    if len(pairs) == 0:
        return
    group["flow/pairs"].append(np.asarray(pairs, np.int32))
    group["flow/flow"].append(np.asarray(flow, np.float16))
    group["flow/valid"].append(np.asarray(valid, bool))


def append_tracks(group: zarr.Group, clip: np.ndarray, start: np.ndarray, coords: np.ndarray,
                  valid: np.ndarray) -> None:
    """Append K track samples: clip (K,), start (K,), coords (K, S, P, 2), valid (K, S, P)."""
    if len(clip) == 0:
        return
    group["tracks/clip"].append(np.asarray(clip, np.int32))
    group["tracks/start"].append(np.asarray(start, np.int32))
    group["tracks/coords"].append(np.asarray(coords, np.float32))
    group["tracks/valid"].append(np.asarray(valid, bool))


def append_store(group: zarr.Group, part: zarr.Group) -> None:
    """Append every flow label and track sample of the label store `part` to `group` (same H, W, S, P)."""
    for key in ("image_size", "window", "points"):
        if part.attrs[key] != group.attrs[key]:
            raise StageError(f"cannot merge label stores with different {key}: {part.attrs[key]} vs "
                             f"{group.attrs[key]}")
    append_flow(group, *(part[name][:] for name in FLOW_ARRAYS))
    append_tracks(group, *(part[name][:] for name in TRACK_ARRAYS))


def truncate(group: zarr.Group, flow_rows: int, track_rows: int) -> None:
    """Cut the flow arrays to `flow_rows` and the track arrays to `track_rows` rows."""
    for names, rows in ((FLOW_ARRAYS, flow_rows), (TRACK_ARRAYS, track_rows)):
        for name in names:
            array = group[name]
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))


# ------------------------------------------------------------------------------- tracks as samples


def group_tracks(clip: np.ndarray, start: np.ndarray, coords: np.ndarray, points: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pack single tracks into samples of up to `points` tracks that share a window.

    clip (n,), start (n,), coords (n, S, 2) -> clip (K,), start (K,), coords (K, S, P, 2) and
    valid (K, S, P) (True for real tracks, False for padding). Tracks keep their order.
    """
    s = coords.shape[1] if coords.ndim == 3 else 0
    out_clip, out_start, out_coords, out_valid = [], [], [], []
    keys = np.stack([clip, start], 1) if len(clip) else np.zeros((0, 2), int)
    for key in _unique_rows_in_order(keys):
        rows = np.flatnonzero((keys == key).all(1))
        for chunk in np.array_split(rows, int(np.ceil(len(rows) / points))):
            sample = np.zeros((s, points, 2), np.float32)
            valid = np.zeros((s, points), bool)
            sample[:, :len(chunk)] = coords[chunk].transpose(1, 0, 2)
            valid[:, :len(chunk)] = True
            out_clip.append(key[0]), out_start.append(key[1])
            out_coords.append(sample), out_valid.append(valid)
    if not out_clip:
        return (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, s, points, 2), np.float32),
                np.zeros((0, s, points), bool))
    return (np.array(out_clip, np.int32), np.array(out_start, np.int32), np.stack(out_coords),
            np.stack(out_valid))


def _unique_rows_in_order(keys: np.ndarray) -> list[np.ndarray]:
    _, first = np.unique(keys, axis=0, return_index=True)
    return [keys[i] for i in sorted(first)]


def read_tracks(group: zarr.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every track valid in all frames, unpacked: clip (n,), start (n,), coords (n, S, 2)."""
    clip, start = group["tracks/clip"][:], group["tracks/start"][:]
    coords, valid = group["tracks/coords"][:], group["tracks/valid"][:]
    sample, point = np.nonzero(valid.all(1)) if len(clip) else (np.zeros(0, int), np.zeros(0, int))
    return clip[sample], start[sample], coords[sample, :, point]


def track_speed(coords: np.ndarray) -> np.ndarray:
    """Mean motion of each track in px/frame: coords (n, S, 2) -> (n,)."""
    if len(coords) == 0:
        return np.zeros(0)
    return np.linalg.norm(np.diff(coords, axis=1), axis=-1).mean(1)


def iter_flow(group: zarr.Group, rows: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (pairs, flow float32, valid) in blocks of `rows` labels, so memory stays bounded."""
    total = group["flow/pairs"].shape[0]
    for first in range(0, total, rows):
        last = min(first + rows, total)
        yield (group["flow/pairs"][first:last], group["flow/flow"][first:last].astype(np.float32),
               group["flow/valid"][first:last])


# ------------------------------------------------------------------------------------ resumable


def start_partial(store_dir: Path, signature: str, *, image_size: tuple[int, int], window: int,
                  points: int, attrs: dict[str, Any]) -> tuple[zarr.Group, dict[str, dict]]:
    """Continue the partial store in `store_dir` if it was made with `signature`, else start afresh.

    Returns the group and the markers of the units already done ({key: marker dict}). Rows written
    after the last marker (a kill between an append and its marker) are cut off.
    """
    progress = store_dir / PROGRESS
    signature_file = progress / "signature"
    if signature_file.exists() and signature_file.read_text() == signature:
        group = zarr.open_group(str(store_dir), mode="r+")
        done = {path.name: json.loads(path.read_text()) for path in (progress / "done").iterdir()
                if not path.name.startswith(".")}
        flow_rows = max((m["flow_rows"] for m in done.values()), default=0)
        track_rows = max((m["track_rows"] for m in done.values()), default=0)
        truncate(group, flow_rows, track_rows)
        return group, done
    remove_path(store_dir)
    group = create_label_store(store_dir, image_size=image_size, window=window, points=points,
                               attrs=attrs)
    (progress / "done").mkdir(parents=True)
    signature_file.write_text(signature)
    return group, {}


def mark_done(store_dir: Path, key: str, group: zarr.Group, **info: Any) -> dict:
    """Record that unit `key` is written: the store's row counts now, plus `info` (e.g. stats)."""
    flow_rows, track_rows = counts(group)
    marker = {"flow_rows": flow_rows, "track_rows": track_rows, **info}
    done = store_dir / PROGRESS / "done"
    tmp = done / f".{key}.tmp"
    tmp.write_text(json.dumps(marker))
    tmp.replace(done / key)  # a marker is either absent or complete
    return marker


def finish_partial(store_dir: Path) -> None:
    """Drop the resume bookkeeping before the store is renamed into place."""
    remove_path(store_dir / PROGRESS)


# ----------------------------------------------------------------------------------- statistics

# Speed bins (px/frame) of the label reports and of densify's re-balancing; the last bin is open.
SPEED_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def speed_histogram(speeds: np.ndarray, edges: tuple[float, ...] = SPEED_EDGES) -> dict[str, list]:
    """Counts of `speeds` per bin [edges[i], edges[i+1]) (the last bin open-ended), JSON-ready."""
    bins = np.append(np.asarray(edges, float), np.inf)
    counts, _ = np.histogram(np.asarray(speeds, float), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def histogram_entropy(histogram: dict[str, list]) -> float:
    """Entropy of a histogram's bin frequencies divided by log(bins): 1 = perfectly flat, 0 = one bin."""
    counts = np.asarray(histogram["counts"], float)
    if counts.sum() == 0 or len(counts) < 2:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def save_histogram_figure(path: Path, panels: dict[str, dict[str, dict[str, list]]], xlabel: str) -> Path:
    """A PNG with one bar chart per panel {title: {series name: histogram}}, series side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=True):
        width = 0.8 / max(len(series), 1)
        for i, (name, hist) in enumerate(series.items()):
            x = np.arange(len(hist["counts"])) + (i - (len(series) - 1) / 2) * width
            ax.bar(x, hist["counts"], width=width, label=f"{name} ({sum(hist['counts'])})")
        edges = next(iter(series.values()))["edges"] if series else []
        ax.set_xticks(np.arange(len(edges)), [f"{e:g}" for e in edges[:-1]] + [f">{edges[-1]:g}"]
                      if edges else [], fontsize=7)
        ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel("count"), ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
