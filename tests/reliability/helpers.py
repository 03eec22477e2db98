"""What the reliability cases share: a stage's command line run as a user runs it, in a project folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def stage_command(stage: str, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m stages.<stage> --set ...` (the command dvc.yaml and the flow run)."""
    command = [sys.executable, "-m", f"stages.{stage}"]
    for item in sets:
        command += ["--set", item]
    return [*command, *extra]


def stage_env(mlflow: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a stage subprocess: this checkout importable, one thread, MLflow off unless
    the case is about MLflow."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MAM2_MLFLOW": "1" if mlflow else "0",
            "OMP_NUM_THREADS": "1", "MAM2_PROGRESS": "0", **extra}


def run_stage(project: Path, stage: str, *sets: str, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(stage, *sets, extra=extra), cwd=project, env=env or stage_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The lines a failed stage printed for its user (log lines have a timestamp and a level)."""
    return [line for line in stderr.splitlines() if line.startswith("mam2 ")]


def decode_sets(project: Path, clips: str = "clips.zarr") -> tuple[str, ...]:
    """A tiny decode of `project/raw` into `project/<clips>`."""
    return (f"paths.raw={project / 'raw'}", f"paths.clips={project / clips}",
            f"paths.reports={project / 'reports'}", f"paths.runs={project / 'runs'}",
            "decode.workers=0", "decode.num_frames=8", "decode.store_size=64",
            "decode.clips_per_video=2")
