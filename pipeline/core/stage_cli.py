"""The command line of one stage: `python -m stages.<name> [--params FILE] [--set section.key=value ...]`.

Every stage module provides `Params` (its `params.yaml` section) and `run_from_paths(params, paths)`,
which maps the `paths` section onto the stage's `run()`; its `__main__` block hands the module to
`main` below (`mam2 <name>` does the same through `pipeline.orchestrate.cli`). Params are validated
before any work; a bad key, a stage's own `StageError`, a missing input and a system error (disk
full, read-only, permission: any OSError) print one clear line and exit non-zero. Each run holds its
stage's outputs lock (`pipeline.core.locks`) from start to commit, so a second run beside it is
refused at once; SIGTERM ends a run as an error (its temporaries cleaned, its MLflow run KILLED).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

from pipeline.core.errors import StageError
from pipeline.core.locks import output_lock, output_lock_path
from pipeline.core.mlflow_runs import mlflow_run
from pipeline.core.params import (
    DEFAULT_PARAMS_FILE,
    ParamsError,
    Paths,
    apply_overrides,
    describe_params,
    read_params_file,
    validate_section,
)
from pipeline.core.progress import setup_logging
from pipeline.core.registry import SECTIONS, STAGES
from pipeline.core.shards import ShardError, parse_shard, supports_shards

log = logging.getLogger(__name__)

USAGE_EXIT_CODE = 2  # invalid params or command line: rerunning cannot help
ERROR_EXIT_CODE = 1  # the stage failed on its inputs or the system


def check_sections(doc: dict) -> None:
    """Unknown top-level sections are typos (`decod:`); fail naming them."""
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"unknown params section(s): {', '.join(unknown)}; "
                          f"expected paths or one of: {', '.join(STAGES)}")


def load_config(name: str, module: ModuleType, params_file: Path, overrides: list[str]):
    """Read, override and validate the `paths` section and the stage's own section."""
    doc = apply_overrides(read_params_file(params_file), overrides)
    check_sections(doc)
    return validate_section(doc, name, module.Params), validate_section(doc, "paths", Paths)


def stage_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    epilog = (f"parameters (set in params.yaml or with --set):\n"
              f"{describe_params(Paths, 'paths')}\n{describe_params(module.Params, name)}")
    if callable(getattr(module, "help_notes", None)):  # a stage's own table after its params
        epilog += "\n\n" + module.help_notes()
    parser = argparse.ArgumentParser(
        prog=f"mam2 {name}", description=(module.__doc__ or "").strip(), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, metavar="FILE",
                        help="params YAML file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one param; repeatable")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    if supports_shards(module):
        parser.add_argument("--shard", type=_shard_arg, metavar="I/N",
                            help="process shard I of N (0-based) into the shared partial store; "
                                 "run again without --shard to commit it")
    return parser


def rank() -> int:
    """This process's rank under torchrun (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def run_tags(name: str, params: object, params_file: Path, overrides: list[str]) -> dict[str, str]:
    """Tags every run gets besides stage, commit and params hash: the pre-training objective (the
    pretrain stage's own, or the params file's `pretrain.objective` for the others), so runs built
    on a mam2 or a videomae encoder compare side by side."""
    objective = getattr(params, "objective", None) if name == "pretrain" else None
    if objective is None:
        doc = apply_overrides(read_params_file(params_file), overrides)
        objective = (doc.get("pretrain") or {}).get("objective")
    return {"objective": str(objective)} if objective is not None else {}


def compute_threads() -> str | None:
    """Torch's intra-op threads when the stage loaded torch, else OMP_NUM_THREADS when set: float
    results depend on it (sums split over threads round differently; README, Orchestration)."""
    torch = sys.modules.get("torch")
    return str(torch.get_num_threads()) if torch is not None else os.environ.get("OMP_NUM_THREADS")


def _shard_arg(text: str):
    try:
        return parse_shard(text)
    except ShardError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def stage_name(module: ModuleType) -> str:
    """The registry name of a stage module (`stages/decode.py` -> decode), also when run as __main__."""
    name = Path(module.__file__ or "").stem
    if name not in STAGES:
        raise ParamsError(f"{module.__file__}: not a registered stage; stages: {', '.join(STAGES)}")
    return name


def main(module: ModuleType, argv: list[str] | None = None) -> int:
    """Run one stage module from the command line; returns the process exit code.

    Under torchrun every rank runs the stage (the training loop needs them all), but only rank 0
    opens the MLflow run and logs at INFO, so a job makes one run and one log, not N.
    """
    name = stage_name(module)
    args = stage_parser(name, module).parse_args(argv)
    main_rank = rank() == 0
    setup_logging(args.log_level.upper() if main_rank else "WARNING")
    shard = getattr(args, "shard", None)
    try:
        params, paths = load_config(name, module, args.params, args.overrides)
        tags = run_tags(name, params, args.params, args.overrides)
    except ParamsError as err:
        print(f"mam2 {name}: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    if shard is not None:
        tags["shard"] = str(shard)
    if threads := compute_threads():
        tags["compute_threads"] = threads
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tags["mam2.runs"] = str(paths.runs.resolve())  # a resumed run continues its MLflow run only there
    run = mlflow_run(name, params, tags=tags) if main_rank else contextlib.nullcontext()
    # One run of a stage's outputs at a time; under torchrun the ranks are one run (rank 0 locks).
    lock = (output_lock(output_lock_path(paths.runs, lock_name(name, params)), shared=shard is not None)
            if main_rank else contextlib.nullcontext())
    try:
        with lock, run:
            outputs = (module.run_from_paths(params, paths, shard=shard) if shard is not None
                       else module.run_from_paths(params, paths))
    except (StageError, OSError) as err:
        print(f"mam2 {name}: error: {describe_error(err)}", file=sys.stderr)
        return ERROR_EXIT_CODE
    log.info("%s%s done: %s", name, f" shard {shard}" if shard else "",
             ", ".join(str(p) for p in _as_list(outputs)))
    return 0


def lock_name(name: str, params: object) -> str:
    """The outputs a run writes: the stage's, or one source's for the per-source stages
    (`pseudo_labels@motion_gt` and `pseudo_labels@clips` write different outputs)."""
    source = getattr(params, "source", None)
    return f"{name}@{source}" if source else name


def describe_error(err: BaseException) -> str:
    """What a user reads: a system error's reason and path in one line (`No space left on device:
    data/clips.zarr/...`), or the stage's own message."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where} (a system error; the stage failed)"
    if isinstance(err, FileNotFoundError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err).strip() or type(err).__name__  # a stage's own message (it may list the bad inputs)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _as_list(outputs: object) -> list:
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, list | tuple):
        return list(outputs)
    return [outputs]
