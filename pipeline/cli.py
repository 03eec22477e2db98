"""The `mam2` command line: `mam2 <stage> [--params FILE] [--set section.key=value ...]`.

Every stage module `stages.<name>` provides `Params` (its `params.yaml` section) and
`run_stage(params, paths)`, which maps the `paths` section onto the stage's `run()`. The same
entry serves `python -m stages.<name>`. Params are validated before any work; a bad key, a
stage's own `StageError` and a missing input print one clear message and exit non-zero.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from pipeline.errors import StageError
from pipeline.params import (
    DEFAULT_PARAMS_FILE,
    ParamsError,
    Paths,
    apply_overrides,
    describe_params,
    read_params_file,
    validate_section,
)
from pipeline.progress import setup_logging
from pipeline.shards import ShardError, parse_shard, supports_shards

log = logging.getLogger(__name__)

# In DAG order; one name per stage in stages/<name>.py, dvc.yaml, params.yaml and the Prefect flow.
STAGES = ("demo_data", "decode", "tokenizer", "targets", "pretrain", "finetune",
          "motion_pretrain", "pseudo_labels", "densify", "refine")


def available_stages() -> list[str]:
    """Stages whose module exists in this checkout."""
    return [name for name in STAGES if importlib.util.find_spec(f"stages.{name}") is not None]


def stage_summary(name: str) -> str:
    """First line of a stage module's docstring, read without importing it (imports can be slow)."""
    spec = importlib.util.find_spec(f"stages.{name}")
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def load_stage(name: str) -> ModuleType:
    if name not in available_stages():
        raise ParamsError(f"unknown stage {name!r}; available: {', '.join(available_stages())}")
    return importlib.import_module(f"stages.{name}")


def check_sections(doc: dict) -> None:
    """Unknown top-level sections are typos (`decod:`); fail naming them."""
    unknown = sorted(set(doc) - {"paths", *STAGES})
    if unknown:
        raise ParamsError(f"unknown params section(s): {', '.join(unknown)}; "
                          f"expected paths or one of: {', '.join(STAGES)}")


def load_config(name: str, module: ModuleType, params_file: Path, overrides: list[str]):
    """Read, override and validate the `paths` section and the stage's own section."""
    doc = apply_overrides(read_params_file(params_file), overrides)
    check_sections(doc)
    return validate_section(doc, name, module.Params), validate_section(doc, "paths", Paths)


def validate_all(params_file: Path | str = DEFAULT_PARAMS_FILE,
                 stages: list[str] | None = None) -> dict[str, object]:
    """Validate `paths` and the sections of `stages` (default: every stage present) of a params
    file, and that it has no unknown section; return the models by section."""
    doc = read_params_file(params_file)
    check_sections(doc)
    models: dict[str, object] = {"paths": validate_section(doc, "paths", Paths)}
    for name in available_stages() if stages is None else stages:
        models[name] = validate_section(doc, name, load_stage(name).Params)
    return models


def stage_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    epilog = (f"parameters (set in params.yaml or with --set):\n"
              f"{describe_params(Paths, 'paths')}\n{describe_params(module.Params, name)}")
    parser = argparse.ArgumentParser(
        prog=f"mam2 {name}", description=(module.__doc__ or "").strip(), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, metavar="FILE",
                        help="params YAML file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one param; repeatable")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
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


def _shard_arg(text: str):
    try:
        return parse_shard(text)
    except ShardError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Run one stage from the command line; returns the process exit code.

    Under torchrun every rank runs the stage (the training loop needs them all), but only rank 0
    opens the MLflow run and logs at INFO, so a job makes one run and one log, not N.
    """
    from pipeline.tracking import stage_run

    try:
        module = load_stage(name)
    except ParamsError as err:
        print(f"mam2: {err}", file=sys.stderr)
        return 2
    parser = stage_parser(name, module)
    sharded = supports_shards(module)
    if sharded:
        parser.add_argument("--shard", type=_shard_arg, metavar="I/N",
                            help="process shard I of N (0-based) into the shared partial store; "
                                 "run again without --shard to commit it")
    args = parser.parse_args(argv)
    main_rank = rank() == 0
    setup_logging(args.log_level.upper() if main_rank else "WARNING")
    shard = getattr(args, "shard", None)
    try:
        params, paths = load_config(name, module, args.params, args.overrides)
        tags = run_tags(name, params, args.params, args.overrides)
    except ParamsError as err:
        print(f"mam2 {name}: {err}", file=sys.stderr)
        return 2
    if shard is not None:
        tags["shard"] = str(shard)
    tracking = stage_run(name, params, tags=tags) if main_rank else contextlib.nullcontext()
    try:
        with tracking:
            outputs = (module.run_stage(params, paths, shard=shard) if sharded
                       else module.run_stage(params, paths))
    except (StageError, FileNotFoundError) as err:
        print(f"mam2 {name}: error: {err}", file=sys.stderr)
        return 1
    log.info("%s%s done: %s", name, f" shard {shard}" if shard else "",
             ", ".join(str(p) for p in _as_list(outputs)))
    return 0


def _as_list(outputs: object) -> list:
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, list | tuple):
        return list(outputs)
    return [outputs]


COMMANDS = {
    "check-params": "validate every section of a params file",
    "serve": "serve the Prefect deployment mam2/full (mam2 serve --help)",
    "runs": "table of MLflow runs and their key metrics (mam2 runs --help)",
    "experiment": "run a named experiment (mam2 experiment mam2-vs-videomae --help)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = available_stages()
    if argv and argv[0] in STAGES:
        return stage_main(argv[0], argv[1:])
    if argv and argv[0] == "serve":
        from pipeline.serve import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "experiment":
        from pipeline.experiment import main as experiment_main

        return experiment_main(argv[1:])
    if argv and argv[0] == "runs":
        from pipeline.runs_table import main as runs_main

        return runs_main(argv[1:])
    lines = [f"  {name:<16}{stage_summary(name)}" for name in stages]
    commands = [f"  {name:<16}{text}" for name, text in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="mam2", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MAM2 video pre-training and motion-model refinement pipeline.",
        epilog="stages (mam2 <stage> --help for its params):\n" + "\n".join(lines)
        + "\n\nother commands:\n" + "\n".join(commands))
    parser.add_argument("command", nargs="?", help="a stage name or one of the other commands")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.command == "check-params":
        try:
            validate_all(args.params)
        except ParamsError as err:
            print(f"mam2: {err}", file=sys.stderr)
            return 2
        print(f"{args.params}: valid ({', '.join(['paths', *stages])})")
        return 0
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
