"""How the motion commands (`mam2 flow`, `mam2 track`) run and fail: one line per error.

A bad option (frames that select nothing, points outside the frame, a bad params file) is a usage
error: argparse's message and exit code 2. An unreadable video, a missing model or a system error
is `<prog>: error: <reason>` and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from pipeline.core.errors import StageError
from pipeline.core.params import ParamsError
from pipeline.core.progress import setup_logging
from pipeline.core.stage_cli import ERROR_EXIT_CODE, describe_error
from pipeline.data.video import VideoReadError
from pipeline.motion.video_input import VideoSelection, open_video


class UsageError(Exception):
    """The command line asks for something impossible; the message says what."""


def pick_device(name: str | None) -> torch.device:
    """The torch device `--device` names; by default cuda when there is one, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here")
    return device


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace,
                work: Callable[[VideoSelection], str], min_frames: int = 2) -> int:
    """Open `args.video` as the video options select it, run `work` on it and print its summary line;
    returns the exit code (usage errors exit through `parser.error`)."""
    setup_logging()
    try:
        try:
            selection = open_video(args.video, size=args.size, start=args.start, end=args.end,
                                   stride=args.stride, min_frames=min_frames)
        except ValueError as err:  # the options select no usable frames
            raise UsageError(str(err)) from err
        print(work(selection))
    except (UsageError, ParamsError) as err:
        parser.error(str(err))
    except VideoReadError as err:
        print(f"{parser.prog}: error: {args.video}: {err}", file=sys.stderr)
        return ERROR_EXIT_CODE
    except (StageError, OSError) as err:
        print(f"{parser.prog}: error: {describe_error(err)}", file=sys.stderr)
        return ERROR_EXIT_CODE
    return 0
