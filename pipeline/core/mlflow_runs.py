"""MLflow runs: one run per stage execution, with params, metrics, tags and artifacts.

The store defaults to `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI`
overrides it. Runs land in experiment `mam2` (`MLFLOW_EXPERIMENT_NAME` overrides), which opens on
MLflow 3's model-training view (tag `mlflow.experimentKind`). When the Prefect flow sets
`MAM2_PARENT_RUN_ID`, each stage run becomes a child of the pipeline run. `MAM2_MLFLOW=0` turns
MLflow logging off (benchmarks use it so they time the work, not the store); `MAM2_MLFLOW_MODELS=0`
logs everything but the models (`MlflowRun.log_model` copies the weights into the store).

Artifacts go in `mlartifacts/` beside a SQLite store. MLflow records artifact locations as absolute
paths, so when the store is found somewhere else (the project was copied or moved, `mlartifacts/`
with it), the experiment's locations are moved to the store's new folder before the next run: a
copied project writes into its own folder, never into the one it was copied from.

A resumed stage continues its MLflow run: a stage run whose last attempt failed, was killed, or was
stopped early (`train.stop_after`, tagged `mam2.completed=false`) is reopened by the next run of
the same stage with the same params (all but how a run executes), host, project and parent, so a
resumed training run keeps one loss curve. Runs are tagged with the git commit, whether the tree
was dirty, and the DVC stage and experiment that ran them.

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
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pipeline.core.errors import StageError
from pipeline.core.fingerprint import fingerprint
from pipeline.core.locks import file_lock
from pipeline.core.params import params_hash
from pipeline.core.processes import process_alive

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mam2"
ARTIFACT_DIR = "mlartifacts"  # beside a SQLite store
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view
REUSABLE = ("FAILED", "KILLED")  # statuses of a run that the next attempt continues
R = TypeVar("R")
_active: MlflowRun | None = None


def mlflow_enabled() -> bool:
    return os.environ.get("MAM2_MLFLOW", "1").lower() not in ("0", "false", "no", "off")


def models_enabled() -> bool:
    """`MAM2_MLFLOW_MODELS=0` keeps model files out of the store (each logged model is a copy)."""
    return os.environ.get("MAM2_MLFLOW_MODELS", "1").lower() not in ("0", "false", "no", "off")


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """The current git commit, or 'unknown' outside a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else "unknown"


def git_dirty() -> str:
    """'true' when tracked files differ from the commit (the run's code is not exactly `git_commit`),
    'false' when clean, 'unknown' outside a git checkout."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if out is None else str(bool(out.strip())).lower()


def source_tags() -> dict[str, str]:
    """What links a run to the code and the DVC run that made it: the git commit and whether the tree
    was dirty; under `dvc repro`/`dvc exp run`, the DVC stage (`pseudo_labels@clips`), and the DVC
    experiment's name and baseline commit (`dvc exp show` lists the experiment by that name)."""
    tags = {"git_commit": git_commit(), "git_dirty": git_dirty()}
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def resume_identity(params: BaseModel) -> dict[str, Any]:
    """The params that decide whether a run continues another: all but how a run executes (a nested
    model with a `resume_identity()`, such as the training loop's `train:` block, names its own, so
    `train.stop_after` or `train.workers` may change between the attempts of one run)."""
    if callable(getattr(params, "resume_identity", None)):
        return params.resume_identity()
    dump = params.model_dump(mode="json")
    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            dump[name] = resume_identity(value)
    return dump


class MlflowRun:
    """Handle for logging into the active stage run; every method is a no-op when tracking is off.

    `resumed` is true when the run continues an earlier attempt (its params are then already logged).
    """

    def __init__(self, run_id: str | None, *, resumed: bool = False,
                 logged_params: dict[str, str] | None = None) -> None:
        self.run_id = run_id
        self.resumed = resumed
        self.completed = True
        self._logged_params = dict(logged_params or {})

    def mark_incomplete(self) -> None:
        """Say that the stage stopped before its work was done (`train.stop_after`): the run ends
        FINISHED but tagged `mam2.completed=false`, and the next run of the stage continues it."""
        self.completed = False

    @_never_fatal
    @_retry_locked
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @_never_fatal
    @_retry_locked
    def log_params(self, params: dict[str, Any]) -> None:
        """Log flattened params; on a resumed run, only those not logged yet (MLflow refuses to change
        a param, and only execution params such as `train.stop_after` can differ)."""
        if self.run_id:
            import mlflow

            values = {k: str(v)[:6000] for k, v in flatten(params).items()}
            changed = sorted(k for k, v in values.items() if self._logged_params.get(k, v) != v)
            if changed:
                log.info("resumed MLflow run keeps its first value of %s", ", ".join(changed))
            new = {k: v for k, v in values.items() if k not in self._logged_params}
            if new:
                mlflow.log_params(new)
            self._logged_params.update(new)

    @_never_fatal
    @_retry_locked
    def log_model(self, path: Path | str, name: str, *, model_type: str | None = None,
                  params: dict[str, Any] | None = None) -> str | None:
        """Log a saved model (a weights file, or a folder of them) as an MLflow 3 logged model of this
        run: it appears in the experiment's Models tab, linked to the run. Returns the model id."""
        path = Path(path)
        if not self.run_id or not path.exists() or not models_enabled():
            return None
        import mlflow

        model = mlflow.initialize_logged_model(
            name=name, source_run_id=self.run_id, model_type=model_type,
            params={k: str(v)[:6000] for k, v in flatten(params or {}).items()} or None)
        client = mlflow.MlflowClient()
        try:
            if path.is_dir():
                client.log_model_artifacts(model.model_id, str(path))
            else:
                client.log_model_artifact(model.model_id, str(path))
        except BaseException:
            mlflow.finalize_logged_model(model.model_id, "FAILED")
            raise
        mlflow.finalize_logged_model(model.model_id, "READY")
        return model.model_id

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


def store_path() -> Path | None:
    """The file of a SQLite store (None for other stores)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def store_lock_path() -> Path | None:
    """The lock file beside a SQLite store (None for other stores: their server serialises)."""
    store = store_path()
    return Path(f"{store}.lock") if store else None


def artifact_root() -> Path | None:
    """Where the experiment's artifacts go: `mlartifacts/` beside a SQLite store (wherever the project
    is), in the working directory for another database, and the server's choice (None) over HTTP."""
    store = store_path()
    if store is not None:
        return store.resolve().parent / ARTIFACT_DIR
    if tracking_uri().startswith(("http://", "https://", "databricks")):
        return None
    return Path(ARTIFACT_DIR).resolve()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def _experiment(name: str):
    """The experiment, created once (with the model-training view and our artifact root), or brought
    up to date: the view tag when it lacks it, its artifact locations moved to this store's folder."""
    import mlflow

    root = artifact_root()
    experiment = mlflow.get_experiment_by_name(name)  # the first call creates the schema
    if experiment is None:
        mlflow.create_experiment(name, artifact_location=root.as_uri() if root else None,
                                 tags=dict([EXPERIMENT_KIND]))
        return mlflow.get_experiment_by_name(name)
    if EXPERIMENT_KIND[0] not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    if root is not None and store_path() is not None and relocate_artifacts(experiment, root):
        experiment = mlflow.get_experiment_by_name(name)
    return experiment


def relocate_artifacts(experiment: Any, root: Path) -> bool:
    """Point an experiment whose artifacts were in another `mlartifacts/` (the project was copied or
    moved with its store) at `root`, with its runs and logged models. MLflow stores artifact
    locations as absolute URIs and has no call to change them, so the SQLite rows are updated.
    Returns whether anything changed; an experiment with an artifact root of its own choosing is
    left alone."""
    old = experiment.artifact_location.rstrip("/")
    new = root.as_uri()
    if old == new or not old.startswith(("file:", "/")) or not old.endswith(f"/{ARTIFACT_DIR}"):
        return False
    store = store_path()
    assert store is not None
    ident = int(experiment.experiment_id)
    with contextlib.closing(sqlite3.connect(store, timeout=60)) as con, con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, ident))
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            if table in tables:
                con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                            (new, len(old) + 1, ident, len(old) + 1, f"{old}/"))
    log.info("MLflow experiment %s: artifacts moved from %s to %s (the store moved)",
             experiment.name, old, new)
    return True


def resumable_run(experiment_id: str, identity: dict[str, str]):
    """The latest run with these identity tags if it did not complete (failed, killed, or tagged
    `mam2.completed=false`), so this attempt continues it; None otherwise."""
    import mlflow

    query = " and ".join(f"tags.`{key}` = '{identity[key]}'"
                         for key in ("stage", "mam2.resume_key", "mam2.host")
                         if "'" not in identity[key])
    runs = mlflow.MlflowClient().search_runs([experiment_id], filter_string=query, max_results=50,
                                             order_by=["attributes.start_time DESC"])
    for run in runs:
        if all(run.data.tags.get(key, "") == value for key, value in identity.items()):
            done = run.info.status == "FINISHED" and run.data.tags.get("mam2.completed") != "false"
            return None if done or run.info.status not in (*REUSABLE, "FINISHED") else run
    return None


@_retry_locked
def _start(stage: str, tags: dict[str, str], identity: dict[str, str]) -> MlflowRun:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = experiment_name()
    lock = store_lock_path()
    parent = os.environ.get("MAM2_PARENT_RUN_ID") or None
    # One process at a time creates the schema and the experiment, and picks a run to continue.
    with file_lock(lock) if lock else contextlib.nullcontext():
        experiment = _experiment(name)
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        close_killed_runs(name)
        earlier = resumable_run(experiment.experiment_id, identity)
        if earlier is not None:
            attempts = int(earlier.data.tags.get("mam2.attempts", "1")) + 1
            run = mlflow.start_run(run_id=earlier.info.run_id, run_name=stage, nested=bool(parent),
                                   tags={**tags, "mam2.attempts": str(attempts)})
            log.info("continuing MLflow run %s (attempt %d; the last one %s)", earlier.info.run_id,
                     attempts, "stopped early" if earlier.info.status == "FINISHED"
                     else earlier.info.status.lower())
            return MlflowRun(run.info.run_id, resumed=True, logged_params=earlier.data.params)
        run = mlflow.start_run(run_name=stage, tags=tags, nested=bool(parent), parent_run_id=parent)
    return MlflowRun(run.info.run_id)


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


@_retry_locked
def _end(status: str, completed: bool) -> None:
    import mlflow

    if status == "FINISHED":
        mlflow.set_tag("mam2.completed", str(completed).lower())
    mlflow.end_run(status=status)


@contextlib.contextmanager
def mlflow_run(stage: str, params: BaseModel, *, tags: dict[str, str] | None = None) -> Iterator[MlflowRun]:
    """Open an MLflow run for one stage execution, log its params and tags, close it on exit.

    The run ends FINISHED, or FAILED if the block raises (the error still propagates). A run of the
    same stage, params (but execution ones), host, project, parent and `tags` that did not complete
    is continued instead of starting a new one (module docstring).
    """
    if not mlflow_enabled():
        yield MlflowRun(None)
        return
    identity = {"stage": stage, "mam2.resume_key": fingerprint(resume_identity(params)),
                "mam2.host": socket.gethostname(), "mam2.project": str(Path.cwd().resolve()),
                "mlflow.parentRunId": os.environ.get("MAM2_PARENT_RUN_ID", ""), **(tags or {})}
    all_tags = {**{k: v for k, v in identity.items() if v}, "params_hash": params_hash(params),
                **source_tags(), "mam2.pid": str(os.getpid()), **(tags or {})}
    global _active
    try:
        run = _start(stage, all_tags, identity)
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
    _end_quietly("FINISHED", run.completed)


def _end_quietly(status: str, completed: bool = True) -> None:
    try:
        _end(status, completed)
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

    # resume_logging: steps continue after an earlier sampler's (a resumed run, a second loop)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
