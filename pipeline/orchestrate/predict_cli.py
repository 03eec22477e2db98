"""`mam2 predict VIDEO...`: the top classes of video files with the fine-tuned classifier.

Each file is read as the decode stage reads it (`decode` params: `clips_per_video` evenly spaced clips of
`num_frames` frames every `stride` frames or at `target_fps`, short side resized to `store_size` and
centre-cropped; decord, with ffmpeg for what decord cannot read), then scored as the finetune stage
scores a validation video (`finetune` params: `eval_clips` windows x `eval_crops` crops of every clip,
softmax averaged over them). A file of the val split therefore gets the score its row of
reports/finetune/predictions.json has. The class names are the classifier's own (those of the clips it
was trained on). An unreadable or too short file is reported on one line and skipped (exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.classifier import load_classifier
from pipeline.classify.data import ClipViews
from pipeline.classify.evaluate import average_per_video
from pipeline.core import stage_cli
from pipeline.core.atomic import write_json
from pipeline.core.errors import StageError, require
from pipeline.core.params import ParamsError
from pipeline.core.progress import setup_logging
from pipeline.data.video import VideoReadError, probe, read_clips
from pipeline.orchestrate.cli_support import add_params_arguments, load_sections

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """A file's classes by averaged score (best first), and how many clips and views it gave."""

    path: str
    ranked: list[tuple[str, float]]
    clips: int
    views: int

    def as_dict(self, top: int) -> dict:
        return {"path": self.path, "clips": self.clips, "views": self.views,
                "top": [{"class": name, "score": round(score, 4)} for name, score in self.ranked[:top]]}


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """decord and libav print their complaints about a bad file straight to file descriptor 2; the reason
    reaches the user once, through the exception, instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def decode_video(path: Path, decode_params) -> list[np.ndarray]:
    """The clips the decode stage would store for `path`: (T, S, S, 3) uint8 each. Raises
    `VideoReadError` with the reason (unreadable, too short, truncated)."""
    from stages.decode import clip_span, sample_clips

    info = probe(path, decode_params.backend)
    indices = sample_clips(info.num_frames, info.fps, decode_params)
    if not indices:
        raise VideoReadError(f"too short: {info.num_frames} frames, a clip needs "
                             f"{clip_span(info.fps, decode_params)}")
    # as the decode stage does: ffmpeg takes over (same bilinear scaling) what decord fails to read
    backends = [info.backend] + (["ffmpeg"] if info.backend == "decord" else [])
    errors = []
    for backend in backends:
        try:
            return list(read_clips(path, replace(info, backend=backend), indices, decode_params.store_size))
        except Exception as err:  # a file that probed fine can still be truncated mid-stream
            lines = str(err).strip().splitlines() or [type(err).__name__]
            errors.append(f"{backend}: {lines[-1][:200]}")
    raise VideoReadError("decode failed (" + "; ".join(errors) + ")")


def classify(model: torch.nn.Module, class_names: list[str], clips: list[list[np.ndarray]],
             finetune_params) -> list[tuple[list[tuple[str, float]], int]]:
    """Per video (its list of decoded clips): classes ranked by averaged softmax score, and its views."""
    from stages import finetune

    plan = finetune.view_plan(finetune_params)
    flat = [clip for video in clips for clip in video]
    ids = [i for i, video in enumerate(clips) for _ in video]
    views = finetune.score(model, ClipViews(flat, ids, plan), finetune_params, finetune_params.train)
    videos, scores, _ = average_per_video(views)
    out = []
    for video, row in zip(videos, scores, strict=True):
        order = np.argsort(-row, kind="stable")
        out.append(([(class_names[k], float(row[k])) for k in order], len(clips[video]) * plan.per_clip))
    return out


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="mam2 predict", description=(__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  mam2 predict data/raw/rotate_cw/rotate_cw_000.mp4\n"
               "  mam2 predict a.mp4 b.webm --top 3 --out /tmp/predictions.json\n"
               "  mam2 predict a.mp4 --set finetune.eval_crops=1   # faster, one crop per window")
    out.add_argument("videos", nargs="+", type=Path, metavar="VIDEO", help="video files to classify")
    out.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per video (default 5)")
    out.add_argument("--classifier", type=Path, metavar="PATH",
                     help="a classifier checkpoint (default: artifacts/finetune/classifier.pt under "
                          "paths.artifacts; a safetensors export works too)")
    out.add_argument("--out", type=Path, metavar="FILE.json", help="also write the predictions to this file")
    add_params_arguments(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`mam2 predict`; returns the exit code (2: bad command line or params, 1: a file or the model
    could not be read)."""
    args = parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    if args.top < 1:
        print("mam2 predict: --top must be at least 1", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    try:
        sections, paths = load_sections(args.params, args.overrides, "decode", "finetune")
    except ParamsError as err:
        print(f"mam2 predict: {err}", file=sys.stderr)
        return stage_cli.USAGE_EXIT_CODE
    try:
        path = require(args.classifier or paths.artifacts_of("finetune") / "classifier.pt", "classifier",
                       "finetune")
        model, config = load_classifier(path)
    except (StageError, ValueError, OSError) as err:  # missing or unreadable classifier
        print(f"mam2 predict: error: {stage_cli.describe_error(err)}", file=sys.stderr)
        return stage_cli.ERROR_EXIT_CODE
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    readable, clips, failed = [], [], 0
    for video in args.videos:
        try:
            with native_stderr_silenced():
                clips.append(decode_video(video, sections["decode"]))
            readable.append(video)
        except VideoReadError as err:
            print(f"mam2 predict: error: {video}: {err}", file=sys.stderr)
            failed += 1
    results = []
    if clips:
        try:
            ranked = classify(model, list(config["class_names"]), clips, sections["finetune"])
        except ValueError as err:  # clips smaller than the classifier's input: the params disagree
            print(f"mam2 predict: error: {err} (check decode.store_size / num_frames against the "
                  f"finetune params)", file=sys.stderr)
            return stage_cli.ERROR_EXIT_CODE
        results = [Prediction(str(video), ranks, len(video_clips), views)
                   for video, video_clips, (ranks, views) in zip(readable, clips, ranked, strict=True)]
    for result in results:
        print(f"{result.path}  ({result.clips} clips, {result.views} views)")
        for rank, (name, score) in enumerate(result.ranked[:args.top], start=1):
            print(f"  {rank}. {name:<24} {score:.3f}")
    if args.out is not None:
        write_json(args.out, {"classifier": str(path), "videos": [r.as_dict(args.top) for r in results],
                              "failed": failed})
        print(f"wrote {args.out}")
    return stage_cli.ERROR_EXIT_CODE if failed else 0
