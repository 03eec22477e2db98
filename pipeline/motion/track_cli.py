"""`mam2 track VIDEO --points "x,y[,t] ..."`: points followed through a video by the point tracker.

Each point is clicked at (x, y) in the video's own pixels at frame t (default: the first selected
frame) and tracked forward and backward from there through every selected frame (the PIPs tracker
chained over 8-frame windows, `models.tracker.track_long`). The output video draws each point in its
own colour with a trail of its last moves: a filled dot where the tracker says it is visible, a
hollow ring where it says it is occluded. `--tracks FILE.json` or `FILE.csv` also writes the tracks,
in the video's pixels and frame numbers.

  mam2 track data/raw/bikes.mp4 --points "300,150 420,200,60" --out bikes_tracks.mp4
  mam2 track clip.mp4 --points "64,64" --model shipped --tracks tracks.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.tracker import PointTracker, track_long
from pipeline.core.atomic import atomic_file, write_json
from pipeline.data.video import write_mp4
from pipeline.motion.checkpoints import load_point_tracker
from pipeline.motion.command import UsageError, run_command
from pipeline.motion.model_choice import add_model_arguments, choose_model
from pipeline.motion.track_drawing import draw_track_overlay
from pipeline.motion.video_input import VideoSelection, add_video_arguments
from pipeline.motion.video_panels import caption_bar, compose

log = logging.getLogger(__name__)
PROG = "mam2 track"
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
POINT = re.compile(rf"({NUMBER}),({NUMBER})(?:,(\d+))?")
TRACK_FORMATS = (".json", ".csv")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mam2 track`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_video_arguments(parser)
    parser.add_argument("--points", action="append", required=True, metavar='"x,y[,t] ..."',
                        help="points to track, separated by spaces or ';': x, y in the video's pixels "
                             "(before --size), t the frame they are at (default: the first selected "
                             "frame; a frame between selected ones snaps to the nearest); repeatable")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.mp4",
                        help="the overlay video (default: <video name>_tracks.mp4 in the working directory)")
    parser.add_argument("--tracks", type=Path, default=None, metavar="FILE.json|FILE.csv",
                        help="also write the tracks: JSON (one entry per point) or CSV (point, frame, x, "
                             "y, visible), in the video's pixels and frame numbers")
    add_model_arguments(parser, "--iters", "tracker updates per window (default: the count the pipeline "
                        "labels, refines and scores with, recorded in its label stores; 6 without them)")
    parser.add_argument("--trail", type=int, default=12, metavar="N",
                        help="draw each point's last N moves (default 12; 0: none)")
    return parser


def parse_points(texts: list[str]) -> np.ndarray:
    """`--points` values -> (N, 3) float64 rows (x, y, t), t NaN where not given; `UsageError` naming
    the first item that is not x,y or x,y,t."""
    rows = []
    for text in texts:
        for item in re.split(r"[;\s]+", re.sub(r"\s*,\s*", ",", text).strip()):
            if not item:
                continue
            match = POINT.fullmatch(item)
            if match is None:
                raise UsageError(f"--points: {item!r} is not x,y or x,y,t (numbers x, y and a frame "
                                 f"number t, e.g. --points \"120,80 200,95,10\")")
            x, y, t = match.groups()
            rows.append((float(x), float(y), float(t) if t is not None else np.nan))
    if not rows:
        raise UsageError("--points: no points given (e.g. --points \"120,80 200,95,10\")")
    return np.array(rows, np.float64)


def queries_for(selection: VideoSelection, points: np.ndarray) -> np.ndarray:
    """(N, 3) tracker queries (position in the selection, x, y at the resized size) of `points`
    (x, y, t) in the video's terms; `UsageError` for a point outside the frame or the frames."""
    width, height = selection.info.width, selection.info.height
    first, last = int(selection.indices[0]), int(selection.indices[-1])
    queries = []
    for n, (x, y, t) in enumerate(points):
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise UsageError(f"--points: point {n} ({x:g}, {y:g}) is outside the {width}x{height} frame "
                             f"(x in 0..{width - 1}, y in 0..{height - 1})")
        frame = first if np.isnan(t) else int(t)
        if not first <= frame <= last:
            raise UsageError(f"--points: point {n} is at frame {frame}, outside the selected frames "
                             f"{first}-{last}")
        position = selection.nearest_frame(frame)
        if int(selection.indices[position]) != frame:
            log.info("point %d: frame %d is not a selected frame; using frame %d", n, frame,
                     selection.indices[position])
        queries.append((position, *selection.to_resized((x, y))))
    return np.array(queries, np.float32)


def track_points(model: PointTracker, frames: np.ndarray, queries: np.ndarray, iters: int,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Track `queries` (N, 3) (t, x, y) through frames (T, H, W, 3) uint8, forward and backward from
    each query frame -> tracks (T, N, 2) and visibility (T, N) bool."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].to(device)
    coords, logits = track_long(model.to(device).eval(), video, torch.from_numpy(queries)[None].to(device),
                                iters=iters, direction="both")
    return coords[0].cpu().numpy(), (logits[0] > 0).cpu().numpy()


def write_tracks(path: Path, selection: VideoSelection, queries: np.ndarray, tracks: np.ndarray,
                 visible: np.ndarray, model: str) -> Path:
    """The tracks (and `queries` (N, 3), as `queries_for` gives them) in the video's pixels and frame
    numbers, as JSON or CSV (by `path`'s suffix)."""
    xy = selection.to_original(tracks)  # (T, N, 2)
    frames = selection.indices.tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        clicked = selection.to_original(queries[:, 1:])  # (N, 2)
        return write_json(path, {
            "video": str(selection.path), "model": model, "frames": frames,
            "size": [selection.info.width, selection.info.height],
            "points": [{"query": {"x": round(float(clicked[n, 0]), 3), "y": round(float(clicked[n, 1]), 3),
                                  "frame": frames[int(queries[n, 0])]},
                        "x": np.round(xy[:, n, 0], 3).tolist(), "y": np.round(xy[:, n, 1], 3).tolist(),
                        "visible": visible[:, n].tolist()} for n in range(len(queries))]})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["point", "frame", "x", "y", "visible"])
        for n in range(tracks.shape[1]):
            for i, frame in enumerate(frames):
                writer.writerow([n, frame, f"{xy[i, n, 0]:.3f}", f"{xy[i, n, 1]:.3f}", int(visible[i, n])])
    return path


def run(args: argparse.Namespace, points: np.ndarray, selection: VideoSelection) -> str:
    """Track `points` (N, 3) (x, y, t) through the `selection` of `args.video` and write the outputs
    `args` ask for; returns the summary lines."""
    started = time.perf_counter()
    queries = queries_for(selection, points)
    choice = choose_model(args, "tracker.pt", "tracker_iters", args.iters)
    source, iters, counted, device = choice.source, choice.count, choice.counted, choice.device
    log.info("%s", selection.describe())
    log.info("tracker %s, %d iterations (%s), on %s", source.describe(), iters, counted, device)
    frames = selection.read()
    model = load_point_tracker(source.path)
    tracked = time.perf_counter()
    tracks, visible = track_points(model, frames, queries, iters, device)
    log.info("tracked %d points through %d frames in %.1f s", len(points), len(frames),
             time.perf_counter() - tracked)
    out = args.out or Path(f"{args.video.stem}_tracks.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    caption = caption_bar([f"tracks: {source.label}, {iters} iterations; "
                           "\N{BLACK CIRCLE} visible, \N{WHITE CIRCLE} occluded"], [selection.size[0]])
    overlay = draw_track_overlay(frames, tracks, visible, trail=args.trail)
    with atomic_file(out) as tmp:
        write_mp4(tmp, (compose(caption, [frame]) for frame in overlay), fps=selection.fps)
    lines = [f"wrote {out}: {len(points)} points through {len(frames)} frames at "
             f"{selection.size[0]}x{selection.size[1]}; model {source.describe()}, {iters} iterations "
             f"({counted}); {time.perf_counter() - started:.1f} s"]
    if args.tracks is not None:
        written = write_tracks(args.tracks, selection, queries, tracks, visible, str(source.path))
        lines.append(f"wrote {written}")
    xy = selection.to_original(tracks)
    for n, (x, y, _) in enumerate(points):
        lines.append(f"  point {n} ({x:g}, {y:g}): frame {selection.indices[-1]} at ({xy[-1, n, 0]:.1f}, "
                     f"{xy[-1, n, 1]:.1f}), visible in {int(visible[:, n].sum())}/{len(frames)} frames")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mam2 track`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be at least 1")
    if args.trail < 0:
        parser.error("--trail must be 0 or more")
    if args.tracks is not None and args.tracks.suffix.lower() not in TRACK_FORMATS:
        parser.error(f"--tracks {args.tracks}: name a .json or .csv file")
    try:
        points = parse_points(args.points)
    except UsageError as err:
        parser.error(str(err))
    return run_command(parser, args, lambda selection: run(args, points, selection))


if __name__ == "__main__":
    sys.exit(main())
