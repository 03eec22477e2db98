"""Which motion model a command runs (`--model current|shipped|PATH`), and with how many updates.

- `current`: the newest model the pipeline made here: refine's (refined on the decoded clips, else on
  motion_gt), else motion_pretrain's, else the shipped one;
- `shipped`: the project's starting models, `checkpoints/flow.pt` and `checkpoints/tracker.pt`;
- a path: a model file, or a folder holding `flow.pt` / `tracker.pt` (e.g. `artifacts/refine/motion_gt`).

The RAFT update and tracker iteration counts default to the ones the pipeline labels, refines and
scores with, as recorded in its label stores (`flow_updates`, `tracker_iters`), else the stages'
defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr

from pipeline.core.errors import StageError
from pipeline.core.params import DEFAULT_PARAMS_FILE, Paths, read_params_file, validate_section
from pipeline.motion.command import pick_device

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"
REFINE_TARGETS = ("clips", "motion_gt")  # `current` prefers the model refined on real video
# The stages' defaults (pseudo_labels, refine): one count labels, refines and scores.
DEFAULT_COUNTS = {"flow_updates": 8, "tracker_iters": 6}


@dataclass(frozen=True)
class ModelSource:
    """A model file and where it comes from, in words (`refined on clips`, `shipped`, ...)."""

    path: Path
    origin: str
    refine_target: str | None = None  # the domain it was refined on, if refine made it

    def describe(self) -> str:
        """`artifacts/refine/clips/flow.pt (current: refined on clips)`."""
        return f"{_shown(self.path)} ({self.origin})"

    @property
    def label(self) -> str:
        """A short name for captions: the origin, or the file for a given path."""
        return self.origin if self.origin != "given" else f"{self.path.parent.name}/{self.path.name}"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def pipeline_paths(params_file: Path = DEFAULT_PARAMS_FILE) -> Paths:
    """The `paths` section of the params file (the defaults without one)."""
    return validate_section(read_params_file(params_file), "paths", Paths)


def candidates(paths: Paths) -> list[tuple[Path, str, str | None]]:
    """(folder, origin, refine target) in the order `current` tries them."""
    refine = paths.artifacts_of("refine")
    return ([(refine / target, f"current: refined on {target}", target) for target in REFINE_TARGETS]
            + [(paths.artifacts_of("motion_pretrain"), "current: motion_pretrain's", None),
               (SHIPPED, "current: shipped", None)])


def resolve_model(choice: str, filename: str, paths: Paths) -> ModelSource:
    """The model file `filename` (flow.pt or tracker.pt) that `--model choice` names."""
    if choice == "current":
        for folder, origin, target in candidates(paths):
            if (folder / filename).is_file():
                return ModelSource(folder / filename, origin, target)
        folders = ", ".join(str(folder) for folder, _, _ in candidates(paths))
        raise StageError(f"--model current: no {filename} in {folders}")
    if choice == "shipped":
        path, origin = SHIPPED / filename, "shipped"
    else:
        path = Path(choice) / filename if Path(choice).is_dir() else Path(choice)
        origin = "given"
    if not path.is_file():
        raise StageError(f"--model {choice}: no model file {path}")
    return ModelSource(path, origin)


def recorded_count(key: str, paths: Paths, target: str | None = None) -> tuple[int, str]:
    """(`flow_updates` or `tracker_iters`, where it was read): from the label stores of `target`,
    then of the clips and motion_gt, else the stages' default."""
    for source in dict.fromkeys([t for t in (target, *REFINE_TARGETS) if t]):
        for store in (paths.train_label_store(source), paths.label_store(source)):
            if (store / "zarr.json").is_file():
                attrs = zarr.open_group(str(store), mode="r").attrs
                if key in attrs:
                    return int(attrs[key]), f"recorded in {store}"
    return DEFAULT_COUNTS[key], "the pipeline's default"


@dataclass(frozen=True)
class ModelChoice:
    """What a motion command runs: the model file, its update count and where that came from, the device."""

    source: ModelSource
    count: int
    counted: str  # "given", "recorded in <store>" or "the pipeline's default"
    device: torch.device


def choose_model(args: argparse.Namespace, filename: str, count_key: str, given: int | None) -> ModelChoice:
    """Resolve `--model`, the update count (`given` on the command line, else the recorded one) and
    `--device` of a motion command (`args` from `add_model_arguments`)."""
    source = resolve_model(args.model, filename, pipeline_paths(args.params))
    count, counted = ((given, "given") if given is not None
                      else recorded_count(count_key, pipeline_paths(args.params), source.refine_target))
    return ModelChoice(source, count, counted, pick_device(args.device))


def add_model_arguments(parser: argparse.ArgumentParser, count: str, count_help: str) -> None:
    """--model, --params and the update-count option `count` (`--updates` or `--iters`)."""
    parser.add_argument("--model", default="current", metavar="current|shipped|PATH",
                        help="current (default): refine's model (refined on the decoded clips, else on "
                             "motion_gt), else motion_pretrain's, else the shipped one; shipped: "
                             "checkpoints/; or a model file, or a folder holding flow.pt / tracker.pt "
                             "(e.g. artifacts/refine/motion_gt); the output says which was used")
    parser.add_argument(count, type=int, default=None, metavar="N", help=count_help)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                        help="params file whose `paths` locate the pipeline's models and label stores "
                             "(default params.yaml)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when there is one, else cpu)")
