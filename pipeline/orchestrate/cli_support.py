"""What the model commands (`mam2 evaluate`, `mam2 predict`, `mam2 export`) share: the params
arguments (`--params`, `--set`, `--log-level`, read exactly as a stage reads them), loading several
stages' sections at once, and a plain text table for stdout.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.core import stage_cli
from pipeline.core.params import (
    DEFAULT_PARAMS_FILE,
    Paths,
    StageParams,
    apply_overrides,
    read_params_file,
    validate_section,
)
from pipeline.orchestrate.stage_loader import load_stage


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """--params FILE, --set SECTION.KEY=VALUE (repeatable) and --log-level, as every stage has them."""
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, metavar="FILE",
                        help="params YAML file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one param; repeatable")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")


def load_sections(params_file: Path, overrides: list[str], *stages: str
                  ) -> tuple[dict[str, StageParams], Paths]:
    """The validated sections of `stages` and `paths` of a params file after `--set` overrides; raises
    `ParamsError` naming the key, like a stage run."""
    doc = apply_overrides(read_params_file(params_file), overrides)
    stage_cli.check_sections(doc)
    sections = {name: validate_section(doc, name, load_stage(name).Params) for name in stages}
    return sections, validate_section(doc, "paths", Paths)


def format_value(value: object) -> str:
    """A number to 4 significant digits (integers as they are), anything else as text; None and NaN as -."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, a rule under the headers."""
    cells = [[str(h) for h in headers], *[[format_value(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
