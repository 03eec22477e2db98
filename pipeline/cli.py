"""The `mam2` command line: `mam2 <stage> [--params FILE] [--set section.key=value ...]`.

Every stage module `stages.<name>` provides `Params` (its `params.yaml` section) and
`run_stage(params, paths)`, which maps the `paths` section onto the stage's `run()`. The same
entry serves `python -m stages.<name>`. Params are validated before any work; a bad key, a
stage's own `StageError` and a missing input print one clear message and exit non-zero.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
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


def validate_all(params_file: Path | str = DEFAULT_PARAMS_FILE) -> dict[str, object]:
    """Validate every section of a params file against the stages present; return the models."""
    doc = read_params_file(params_file)
    check_sections(doc)
    models: dict[str, object] = {"paths": validate_section(doc, "paths", Paths)}
    for name in available_stages():
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


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Run one stage from the command line; returns the process exit code."""
    from pipeline.tracking import stage_run

    try:
        module = load_stage(name)
    except ParamsError as err:
        print(f"mam2: {err}", file=sys.stderr)
        return 2
    args = stage_parser(name, module).parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        params, paths = load_config(name, module, args.params, args.overrides)
    except ParamsError as err:
        print(f"mam2 {name}: {err}", file=sys.stderr)
        return 2
    try:
        with stage_run(name, params):
            outputs = module.run_stage(params, paths)
    except (StageError, FileNotFoundError) as err:
        print(f"mam2 {name}: error: {err}", file=sys.stderr)
        return 1
    log.info("%s done: %s", name, ", ".join(str(p) for p in _as_list(outputs)))
    return 0


def _as_list(outputs: object) -> list:
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, list | tuple):
        return list(outputs)
    return [outputs]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = available_stages()
    if argv and argv[0] in STAGES:
        return stage_main(argv[0], argv[1:])
    lines = [f"  {name:<16}{stage_summary(name)}" for name in stages]
    parser = argparse.ArgumentParser(
        prog="mam2", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MAM2 video pre-training and motion-model refinement pipeline.",
        epilog="stages (mam2 <stage> --help for its params):\n" + "\n".join(lines)
        + "\n\nother commands:\n  check-params    validate every section of a params file")
    parser.add_argument("command", nargs="?", help="a stage name or check-params")
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
