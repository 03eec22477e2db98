"""MLflow runs: one run per stage execution, with params, metrics, tags and artifacts.

The store defaults to `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI`
overrides it. Runs land in experiment `mam2` (`MLFLOW_EXPERIMENT_NAME` overrides). When the
Prefect flow sets `MAM2_PARENT_RUN_ID`, each stage run becomes a child of the pipeline run.
`MAM2_MLFLOW=0` turns MLflow logging off (benchmarks use it so they time the work, not the store).
SQLite serialises writers, so every call retries briefly on "database is locked", and the store's
schema is created under a file lock beside it (two shards starting on a fresh checkout would race).
A run whose process was killed is closed as KILLED by the next run of any stage on the same host.
Tracking never costs computed work: a logging call that fails after the work started is a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pipeline.core.errors import StageError
from pipeline.core.locks import file_lock
from pipeline.core.params import params_hash
from pipeline.core.processes import process_alive

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mam2"
R = TypeVar("R")
_active: MlflowRun | None = None


def mlflow_enabled() -> bool:
    return os.environ.get("MAM2_MLFLOW", "1").lower() not in ("0", "false", "no", "off")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _retry_locked(fn: Callable[..., R]) -> Callable[..., R]:
    """Retry an MLflow call while SQLite reports a concurrent writer."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        for attempt in range(8):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow wraps sqlite3.OperationalError in its own types
                if "database is locked" not in str(err) or attempt == 7:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


def _never_fatal(fn: Callable[..., R]) -> Callable[..., R | None]:
    """A logging call that fails (store gone read-only, disk full) warns once and stops logging for
    this run, so the stage's computed work is still committed."""

    @functools.wraps(fn)
    def wrapper(self: MlflowRun, *args: Any, **kwargs: Any) -> R | None:
        try:
            return fn(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure; the work matters more
            log.warning("MLflow logging failed (%s); this run logs nothing more",
                        _one_line(err))
            self.run_id = None
            return None

    return wrapper


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    """The current git commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class MlflowRun:
    """Handle for logging into the active stage run; every method is a no-op when tracking is off."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id

    @_never_fatal
    @_retry_locked
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @_never_fatal
    @_retry_locked
    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    @_never_fatal
    @_retry_locked
    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)

    @_never_fatal
    @_retry_locked
    def log_artifact(self, path: Path | str, subdir: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=subdir)
            else:
                mlflow.log_artifact(str(path), artifact_path=subdir)

    @_never_fatal
    @_retry_locked
    def log_image(self, image: Any, name: str) -> None:
        """Log an (H, W, 3) uint8 array as a PNG artifact (e.g. "samples/reconstructions.png")."""
        if self.run_id:
            import mlflow

            mlflow.log_image(image, name)

    @_never_fatal
    @_retry_locked
    def log_figure(self, figure: Any, name: str) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_figure(figure, name)


def current_run() -> MlflowRun:
    """The run opened by the enclosing `mlflow_run`, or a no-op handle outside one (e.g. in tests)."""
    return _active or MlflowRun(None)


def store_lock_path() -> Path | None:
    """The lock file beside a SQLite store (None for other stores: their server serialises)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return Path(f"{uri.removeprefix('sqlite:///')}.lock")


@_retry_locked
def _start(stage: str, tags: dict[str, str]) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    lock = store_lock_path()
    with file_lock(lock) if lock else contextlib.nullcontext():
        # Creating the schema (the first call) and the experiment, once, whoever comes first.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # An explicit artifact root keeps artifacts beside the store, not in a stray ./mlruns.
            mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri())
    mlflow.set_experiment(name)
    close_killed_runs(name)
    parent = os.environ.get("MAM2_PARENT_RUN_ID")
    run = mlflow.start_run(run_name=stage, tags=tags, nested=bool(parent),
                           parent_run_id=parent or None)
    return run.info.run_id


def close_killed_runs(experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a kill -9 never ends its run)."""
    import mlflow

    host = socket.gethostname()
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'RUNNING'",
                              output_format="list")
    closed = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("mam2.pid")
        if tags.get("mam2.host") != host or not pid or process_alive(int(pid)):
            continue
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.info("closed %d MLflow run(s) whose process was killed: %s", len(closed), ", ".join(closed))
    return closed


    return True


@_retry_locked
def _end(status: str) -> None:
    import mlflow

    mlflow.end_run(status=status)


@contextlib.contextmanager
def mlflow_run(stage: str, params: BaseModel, *, tags: dict[str, str] | None = None) -> Iterator[MlflowRun]:
    """Open an MLflow run for one stage execution, log its params and tags, close it on exit.

    The run ends FINISHED, or FAILED if the block raises (the error still propagates).
    """
    if not mlflow_enabled():
        yield MlflowRun(None)
        return
    all_tags = {"stage": stage, "git_commit": git_commit(), "params_hash": params_hash(params),
                "mam2.pid": str(os.getpid()), "mam2.host": socket.gethostname(), **(tags or {})}
    global _active
    try:
        run = MlflowRun(_start(stage, all_tags))
    except Exception as err:  # noqa: BLE001 - before any work: say so in one line
        raise StageError(f"cannot open the MLflow store {tracking_uri()} ({_one_line(err)}); fix it "
                         "or run with MAM2_MLFLOW=0") from err
    run.log_params(params.model_dump(mode="json"))
    log.info("MLflow run %s (stage %s) in %s", run.run_id, stage, tracking_uri())
    _active = run
    try:
        yield run
    except BaseException as err:
        _end_quietly("KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED")
        raise
    finally:
        _active = None
    _end_quietly("FINISHED")


def _end_quietly(status: str) -> None:
    try:
        _end(status)
    except Exception as err:  # noqa: BLE001 - the work is done; a closing failure must not undo it
        log.warning("could not close the MLflow run as %s (%s)", status, _one_line(err))


@contextlib.contextmanager
def system_metrics(interval: float | None) -> Iterator[None]:
    """MLflow's CPU/GPU/memory/disk sampler (`system/*` metrics) on the active stage run for the block.

    Does nothing without an active run (tracking off) or with `interval` None (other ranks than 0).
    """
    run_id = current_run().run_id
    if not run_id or interval is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
