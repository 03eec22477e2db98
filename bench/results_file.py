"""Where every benchmark saves its figures: `bench/results/<benchmark>-<device>.json`."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name(cuda: bool) -> str:
    """`cuda-<GPU model>` or `cpu<cores>-<arch>`: results of different machines never overwrite."""
    if cuda:
        return f"cuda-{torch.cuda.get_device_name().replace(' ', '_')}"
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def save_results(benchmark: str, results: dict, *, cuda: bool = False) -> str:
    """Write `results` (device first) to the benchmark's file; returns the device name."""
    device = device_name(cuda)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}-{device}.json"
    path.write_text(json.dumps({"device": device, **results}, indent=2) + "\n")
    return device


def print_figures(results: dict, indent: int = 2, width: int = 28) -> None:
    """One line per figure: its key, then the value (floats to 4 significant digits)."""
    for key, value in results.items():
        shown = f"{value:12.4g}" if isinstance(value, float) else f"{value!s:>12}"
        print(f"{' ' * indent}{key:<{width}}{shown}")
