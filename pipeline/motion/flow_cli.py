"""`mam2 flow VIDEO`: a colour-coded optical-flow video of a video file.

Each output frame shows frame t | the flow from t to the next selected frame | the colour key, under
a caption naming the model. Colours as in the refine stage's pictures: hue is the direction (right =
red, down = yellow-green, left = cyan, up = purple), saturation the speed, still pixels white.
One scale for the whole video (`--max-flow`; by default the speed most pairs' fastest pixels stay
under), so colours compare across frames; faster motion shows fully saturated. T selected frames
give T - 1 output frames, played at the video's speed (its fps / stride).

  mam2 flow data/raw/bikes.mp4 --out bikes_flow.mp4
  mam2 flow clip.mp4 --model shipped --size 0 --start 100 --end 200 --stride 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.core.atomic import atomic_file
from pipeline.core.progress import progress_bar
from pipeline.core.tensors import image_to_tensor
from pipeline.data.video import write_mp4
from pipeline.motion.checkpoints import load_flow
from pipeline.motion.command import run_command
from pipeline.motion.evaluate import predict_flow
from pipeline.motion.model_choice import add_model_arguments, choose_model
from pipeline.motion.pictures import color_wheel, flow_to_color
from pipeline.motion.video_input import VideoSelection, add_video_arguments
from pipeline.motion.video_panels import caption_bar, compose

log = logging.getLogger(__name__)
PROG = "mam2 flow"
PIXEL_PERCENTILE, PAIR_PERCENTILE = 99.0, 90.0  # the colour scale (colour_scale)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mam2 flow`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_video_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.mp4",
                        help="the flow video (default: <video name>_flow.mp4 in the working directory)")
    add_model_arguments(parser, "--updates", "RAFT updates per pair (default: the count the pipeline "
                        "labels, refines and scores with, recorded in its label stores; 8 without them)")
    parser.add_argument("--max-flow", type=float, default=None, metavar="PX",
                        help="speed (px per selected frame, at the resized size) shown fully saturated "
                             "(default: the 90th percentile over pairs of each pair's 99th percentile)")
    parser.add_argument("--batch", type=int, default=4, metavar="N", help="pairs per model call (default 4)")
    return parser


def compute_flows(model: torch.nn.Module, frames: np.ndarray, updates: int, device: torch.device,
                  batch: int = 4) -> np.ndarray:
    """Flow from each frame to the next: frames (T, H, W, 3) uint8 -> (T - 1, H, W, 2) float32 px."""
    model = model.to(device)
    out = []
    with progress_bar("flow", unit="pair", total=len(frames) - 1) as update:
        for i in range(0, len(frames) - 1, batch):
            images = image_to_tensor(frames[i:i + batch + 1]).to(device)
            flow = predict_flow(model, images[:-1], images[1:], updates, batch_size=batch)
            out.append(flow.permute(0, 2, 3, 1).float().cpu().numpy())
            update(len(flow))
    return np.concatenate(out)


def colour_scale(flows: np.ndarray) -> float:
    """The speed drawn fully saturated (px): the 90th percentile over pairs of each pair's 99th
    percentile of |flow|, so a few wild pairs (scene cuts) do not wash out the rest."""
    speeds = np.linalg.norm(flows, axis=-1).reshape(len(flows), -1)
    per_pair = np.percentile(speeds, PIXEL_PERCENTILE, axis=1)
    return max(float(np.percentile(per_pair, PAIR_PERCENTILE)), 0.1)


def render(frames: np.ndarray, flows: np.ndarray, max_flow: float, model_text: str) -> Iterator[np.ndarray]:
    """Output frames: caption over frame t | flow t | colour key (a disc as tall as the frame)."""
    h, w = frames.shape[1:3]
    key = color_wheel(max_flow, h)
    caption = caption_bar(["frame", f"flow: {model_text}", f"key: radius {max_flow:.1f} px"], [w, w, h])
    for frame, flow in zip(frames, flows):
        yield compose(caption, [frame, flow_to_color(flow, max_flow), key])


def run(args: argparse.Namespace, selection: VideoSelection) -> str:
    """Write the flow video of the `selection` of `args.video`; returns the summary line."""
    started = time.perf_counter()
    choice = choose_model(args, "flow.pt", "flow_updates", args.updates)
    source, updates, counted, device = choice.source, choice.count, choice.counted, choice.device
    log.info("%s", selection.describe())
    log.info("flow model %s, %d RAFT updates (%s), on %s", source.describe(), updates, counted, device)
    frames = selection.read()
    flows = compute_flows(load_flow(source.path), frames, updates, device, args.batch)
    max_flow = args.max_flow if args.max_flow else colour_scale(flows)
    out = args.out or Path(f"{args.video.stem}_flow.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_text = f"{source.label}, {updates} updates"
    with atomic_file(out) as tmp:
        write_mp4(tmp, render(frames, flows, max_flow, model_text), fps=selection.fps)
    return (f"wrote {out}: {len(flows)} frames of flow at {selection.size[0]}x{selection.size[1]} "
            f"({args.video.name} frames {selection.indices[0]}-{selection.indices[-1]} every "
            f"{selection.stride}); model {source.describe()}, {updates} RAFT updates ({counted}); colour "
            f"key radius {max_flow:.2f} px; {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mam2 flow`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.updates is not None and args.updates < 1:
        parser.error("--updates must be at least 1")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.max_flow is not None and args.max_flow <= 0:
        parser.error("--max-flow must be positive")
    return run_command(parser, args, lambda selection: run(args, selection))


if __name__ == "__main__":
    sys.exit(main())
