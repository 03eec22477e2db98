"""Stage modules by registry name: import one, read its summary, validate params sections against
their `Params`. Orchestration only: the machinery below never imports a stage."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from pipeline.core import stage_cli
from pipeline.core.params import DEFAULT_PARAMS_FILE, ParamsError, Paths, read_params_file, validate_section
from pipeline.core.registry import STAGES, module_name


def stage_summary(name: str) -> str:
    """First line of a stage module's docstring, read without importing it."""
    spec = importlib.util.find_spec(module_name(name))
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else ""
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def load_stage(name: str) -> ModuleType:
    """The stage module of a registered stage name."""
    if name not in STAGES:
        raise ParamsError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(module_name(name))


def validate_all(params_file: Path | str = DEFAULT_PARAMS_FILE,
                 stages: list[str] | None = None) -> dict[str, object]:
    """Validate `paths` and the sections of `stages` (default: every stage) of a params file, and
    that it has no unknown section; return the models by section."""
    doc = read_params_file(params_file)
    stage_cli.check_sections(doc)
    models: dict[str, object] = {"paths": validate_section(doc, "paths", Paths)}
    for name in STAGES if stages is None else stages:
        models[name] = validate_section(doc, name, load_stage(name).Params)
    return models
