"""Prefect flow `mam2`: the pipeline DAG with one task per stage, run through DVC.

One task per `dvc.yaml` stage (a `foreach` stage gives one per item, named as DVC names them:
`pseudo_labels@clips`, `pseudo_labels@motion_gt`), each known to the stage registry
(`pipeline.core.registry`). The edges are the ones `dvc.yaml` implies, an output of one stage being
a dependency of another, so the DAG is written once. The MAM2 branch
(tokenizer, targets, pretrain, finetune) and the motion branch (motion_pretrain, pseudo_labels,
densify, refine) run concurrently in a thread pool.

Every stage goes through DVC, so `dvc status` is clean after a flow run and `dvc repro` does
nothing. DVC holds a repository lock and refuses a second concurrent command, so every DVC call
of the flow takes one file lock (`.dvc/tmp/mam2-flow.lock`). Two modes (flow param `dvc_mode`):

- `commit` (default): under the lock, `dvc status <stage>`; if stale, run the stage's `cmd` from
  dvc.yaml outside the lock, then `dvc commit --force <stage>` under it. Branches overlap; only the
  bookkeeping (about a second per stage) is serialised.
- `repro`: `dvc status`, then `dvc repro --single-item <stage>` under the lock. DVC does everything
  itself (removing outputs first, its run cache), but stages never overlap.

MLflow: the flow opens a parent run (stage `pipeline`) and passes its id to every stage process
in `MAM2_PARENT_RUN_ID`, so each stage's run is its child. A failing stage fails its task with
the stage's own message ("mam2 <stage>: error: ..."); I/O stages (decode, targets, pseudo_labels)
are retried, except for invalid params (exit code 2). With `shards > 1`, stages that accept
`--shard` are first run as shards mapped over a task runner (a Dask cluster through prefect-dask
when `dask_address` is given, a local thread pool otherwise), then committed by the stage itself.
This is the only module that imports prefect.
"""

from __future__ import annotations

import contextlib
import graphlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, RootModel, ValidationError

from pipeline.core.locks import file_lock
from pipeline.core.mlflow_runs import MlflowRun, mlflow_run
from pipeline.core.params import (
    DEFAULT_PARAMS_FILE,
    LabelSource,
    ParamsError,
    StageParams,
    format_validation_error,
    params_hash,
)
from pipeline.core.processes import available_cores, thread_env
from pipeline.core.registry import STAGES
from pipeline.core.shards import Shard, supports_shards
from pipeline.core.stage_cli import USAGE_EXIT_CODE, run_tags
from pipeline.orchestrate.stage_loader import load_stage, validate_all

IO_STAGES = ("decode", "targets", "pseudo_labels")  # retried: network filesystems, flaky decoders
RETRIES = 2
RETRY_DELAY_S = 10
DVC_LOCK = Path(".dvc/tmp/mam2-flow.lock")
DVC_BUSY = ("Unable to acquire lock", "is busy")  # another DVC command (not ours) holds the repo


BRANCHES = 2  # the MAM2 and motion branches run side by side after decode
PER_SOURCE_STAGES = ("pseudo_labels", "densify")  # dvc.yaml `foreach` stages, one per LabelSource
# What first_stage/last_stage accept: a registry stage (all its dvc.yaml stages) or one dvc.yaml
# stage as DVC names it (`pseudo_labels@motion_gt`); a test checks them against dvc.yaml.
STAGE_CHOICES: tuple[str, ...] = tuple(
    name for stage in STAGES
    for name in (stage, *(f"{stage}@{source}" for source in get_args(LabelSource)
                          if stage in PER_SOURCE_STAGES)))
StageChoice = Literal[STAGE_CHOICES]  # type: ignore[valid-type]
DvcMode = Literal["commit", "repro"]


class FlowParams(StageParams):
    """The flow's parameters, validated before any work and logged on the parent MLflow run. Their
    descriptions are the flow's parameter descriptions in Prefect (`document_params`)."""

    params_file: str = Field("params.yaml", description="params file inside the project; DVC reads "
                             "params.yaml, so another file is copied over it first (as `dvc exp run "
                             "-S` edits it)")
    first_stage: StageChoice | None = Field(None, description="run only this stage and what follows "
                                            "it in the DAG (a per-source stage alone: "
                                            "pseudo_labels@motion_gt); empty: from the start")
    last_stage: StageChoice | None = Field(None, description="run only this stage and what it needs "
                                           "(densify@clips: that source only); empty: to the end")
    shards: int = Field(1, ge=1, description="shards of the stages that accept --shard (decode, "
                        "targets, pseudo_labels)")
    dask_address: str | None = Field(None, description="Dask scheduler for the shards "
                                     "(needs prefect-dask); a local thread pool when empty")
    dvc_mode: DvcMode = Field("commit", description="commit: stages run concurrently, DVC "
                              "bookkeeping (status, commit) under a lock; repro: dvc repro per "
                              "stage under the lock, one stage at a time")
    retries: int = Field(RETRIES, ge=0, description="retries of the I/O stages (decode, targets, "
                         "pseudo_labels) and their shards")
    threads_per_stage: int | None = Field(None, ge=1, description="compute threads of each stage "
                                          "process (OMP_NUM_THREADS, MKL_NUM_THREADS); empty: this "
                                          "machine's cores shared by the two branches that run at "
                                          "once, at least 1 (repro mode: each stage's own default, "
                                          "a thread per core)")


def document_params(model: type[BaseModel]):
    """Append a Google-style `Args:` section made of `model`'s field descriptions to a flow
    function's docstring: Prefect reads it for the deployment's parameter descriptions."""

    def document(fn):
        lines = [f"    {name}: {field.description}" for name, field in model.model_fields.items()
                 if field.description]
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(lines)
        return fn

    return document


class StageFailed(RuntimeError):
    """A stage's process failed; the message carries the stage's own error text."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class PipelineFailed(RuntimeError):
    """One or more stages failed; the message lists each failed stage's error."""


# ----------------------------------------------------------------------------- the DAG


def read_dvc_stages(project: Path) -> dict[str, dict]:
    """The `stages` of the project's dvc.yaml, `foreach` stages expanded as DVC names them
    (`pseudo_labels@motion_gt`), with a clear error when there is no dvc.yaml."""
    path = project / "dvc.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no dvc.yaml in {project}: run the flow (and `mam2 serve`) "
                                f"from the project root")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    return {name: spec for base, body in stages.items() for name, spec in expand_foreach(base, body)}


def expand_foreach(name: str, body: dict) -> list[tuple[str, dict]]:
    """A dvc.yaml stage as DVC runs it: itself, or one stage `name@key` per `foreach` item with
    `${key}`, `${item}` and `${item.field}` filled in."""
    if "foreach" not in body:
        return [(name, body)]
    items = body["foreach"]
    pairs = items.items() if isinstance(items, dict) else ((str(item), item) for item in items)
    return [(f"{name}@{key}", _fill(body["do"], key, item)) for key, item in pairs]


def _fill(value: Any, key: str, item: Any) -> Any:
    if isinstance(value, dict):
        return {_fill(k, key, item): _fill(v, key, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, key, item) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        ref = match.group(1)
        if ref == "key":
            return key
        if ref == "item":
            return str(item)
        return str(item[ref.removeprefix("item.")])

    return re.sub(r"\$\{\s*(key|item(?:\.\w+)?)\s*\}", lookup, value)


def base_stage(name: str) -> str:
    """The registry stage a dvc.yaml stage runs (`pseudo_labels@motion_gt` -> pseudo_labels)."""
    return name.split("@", 1)[0]


def pipeline_stages(dvc_stages: dict[str, dict]) -> list[str]:
    """The dvc.yaml stages in registry order; a dvc.yaml stage the registry does not know is an error."""
    unknown = sorted(name for name in dvc_stages if base_stage(name) not in STAGES)
    if unknown:
        raise ParamsError(f"dvc.yaml stage(s) not in the stage registry: {', '.join(unknown)}")
    return sorted(dvc_stages, key=lambda name: (STAGES.index(base_stage(name)), name))


def upstream_graph(stages: list[str], dvc_stages: dict[str, dict]) -> dict[str, set[str]]:
    """Each stage's upstream stages among `stages`: those with an output it lists as a dependency."""
    graph: dict[str, set[str]] = {name: set() for name in stages}
    outputs = {name: _paths(dvc_stages[name].get("outs")) + _paths(dvc_stages[name].get("metrics"))
               for name in stages}
    for name in stages:
        for dep in _paths(dvc_stages[name].get("deps")):
            for other, outs in outputs.items():
                if other != name and any(_within(dep, out) or _within(out, dep) for out in outs):
                    graph[name].add(other)
    return graph


def _paths(entries: list | None) -> list[str]:
    """Paths of a dvc.yaml `deps`/`outs` list (entries are strings or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def _within(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


def select_stages(graph: dict[str, set[str]], first: str | None, last: str | None) -> list[str]:
    """The stages on DAG paths from `first` to `last` (all of them when both are None),
    topologically ordered. A registry name stands for all its dvc.yaml stages
    (`pseudo_labels` for `pseudo_labels@clips` and `pseudo_labels@motion_gt`)."""
    ends = {}
    for end in (first, last):
        ends[end] = {name for name in graph if end in (name, base_stage(name))}
        if end is not None and not ends[end]:
            raise ParamsError(f"stage {end!r} is not in this pipeline; it has: {', '.join(graph)}")
    chosen = set(graph)
    if first is not None:
        downstream = {name: {d for d in graph if name in graph[d]} for name in graph}
        chosen &= _reach(ends[first], downstream)
    if last is not None:
        chosen &= _reach(ends[last], graph)
    if not chosen:
        raise ParamsError(f"no stage lies between first_stage={first} and last_stage={last}")
    sub = {name: graph[name] & chosen for name in chosen}
    depth: dict[str, int] = {}
    for name in graphlib.TopologicalSorter(sub).static_order():  # raises CycleError on a cycle
        depth[name] = 1 + max((depth[up] for up in sub[name]), default=-1)
    return sorted(chosen, key=lambda name: (depth[name], STAGES.index(base_stage(name)), name))


def _reach(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(start), list(start)
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


# ----------------------------------------------------------------------------- processes


def default_threads_per_stage(dvc_mode: str, cores: int | None = None) -> int | None:
    """Each stage process's compute threads when the flow is not told: in `commit` mode the cores
    shared by the BRANCHES that run side by side; in `repro` mode (one stage at a time) None, the
    stage's own default. Torch, like OpenMP, starts one thread per core in every process; two stages
    doing so on 2 cores ran 3-12x slower each (README, Orchestration)."""
    if dvc_mode == "repro":
        return None
    return max(1, (cores or available_cores()) // BRANCHES)


def stage_env(parent_run_id: str | None, threads: int | None = None) -> dict[str, str]:
    """The environment of a stage process: this interpreter's bin first on PATH (so the `python`
    of dvc.yaml's cmd and `dvc` are this environment's), unbuffered output, the parent run, and
    `threads` compute threads (OpenMP and MKL, which torch's intra-op pool follows)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env["MAM2_PARENT_RUN_ID"] = parent_run_id
    if threads is not None:
        env.update(thread_env(threads))
    return env


def run_streaming(command: list[str] | str, *, cwd: Path, env: dict[str, str],
                  on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run a command (a string runs in the shell, as DVC runs cmd), passing each output line to
    `on_line`; returns the exit code and the last lines of output (stdout and stderr merged)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, shell=isinstance(command, str),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace")
    tail: deque[str] = deque(maxlen=400)
    assert process.stdout is not None
    for line in process.stdout:
        tail.append(line.rstrip("\n"))
        on_line(tail[-1])
    return process.wait(), list(tail)


def stage_error(stage: str, lines: list[str], returncode: int) -> str:
    """The stage's own error ("mam2 <stage>: error: ..." and its indented continuation lines),
    or the end of its output when it died without one (a traceback)."""
    starts = [i for i, line in enumerate(lines) if line.startswith((f"mam2 {stage}:", "mam2:"))]
    if starts:
        text = [lines[starts[-1]]]
        for line in lines[starts[-1] + 1:]:
            if not line.startswith((" ", "\t")):
                break
            text.append(line)
    else:
        text = lines[-15:] or ["(no output)"]
    return f"stage {stage} failed (exit code {returncode}):\n" + "\n".join(text)


@dataclass(frozen=True)
class Dvc:
    """DVC commands for one project, every one under the flow's lock."""

    project: Path
    env: dict[str, str] = field(repr=False)
    log: Callable[[str], None] = field(repr=False)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.project / DVC_LOCK):
            yield

    def call(self, *args: str, stream: bool = False) -> tuple[int, list[str]]:
        """`dvc <args>` under the lock, retried while a DVC command outside the flow holds the repo."""
        command = [sys.executable, "-m", "dvc", *args]
        for attempt in range(6):
            with self.locked():
                code, lines = run_streaming(command, cwd=self.project, env=self.env,
                                            on_line=self.log if stream else lambda line: None)
            if code == 0 or not any(busy in line for line in lines for busy in DVC_BUSY):
                return code, lines
            time.sleep(min(30, 2**attempt))
        return code, lines

    def stale(self, stage: str) -> dict[str, Any]:
        """What `dvc status` says changed for `stage` ({} when it is up to date)."""
        code, lines = self.call("status", stage, "--json")
        if code != 0:
            raise StageFailed(f"dvc status {stage} failed:\n" + "\n".join(lines[-15:]), code)
        doc = next((line for line in reversed(lines) if line.startswith("{")), "{}")
        return json.loads(doc).get(stage, {})

    def commit(self, stage: str) -> None:
        code, lines = self.call("commit", "--force", stage)
        if code != 0:
            raise StageFailed(f"dvc commit {stage} failed:\n" + "\n".join(lines[-15:]), code)

    def repro(self, stage: str) -> None:
        code, lines = self.call("repro", "--single-item", stage, stream=True)
        if code != 0:
            # DVC exits 255 whatever the stage did; its last words carry the stage's own code
            said = [m for line in lines if (m := re.search(r"exited with (-?\d+)", line))]
            code = int(said[-1].group(1)) if said else code
            raise StageFailed(stage_error(stage, lines, code), code)


def run_stage_commands(stage: str, spec: dict, dvc: Dvc) -> None:
    """Run a stage's dvc.yaml `cmd` (a string or a list) in its `wdir`, as `dvc repro` would."""
    commands = spec["cmd"] if isinstance(spec["cmd"], list) else [spec["cmd"]]
    cwd = dvc.project / spec.get("wdir", ".")
    for command in commands:
        code, lines = run_streaming(command, cwd=cwd, env=dvc.env, on_line=dvc.log)
        if code != 0:
            raise StageFailed(stage_error(stage, lines, code), code)


class MissingDependency(RuntimeError):
    """An optional package a flow option needs is not installed; the message says what to install."""


def shard_runner(dask_address: str | None, shards: int):
    """The task runner that shards are mapped over: a Dask cluster, or a local thread pool (each
    shard is a process of its own, so threads are enough to run them side by side)."""
    if dask_address is None:
        return ThreadPoolTaskRunner(max_workers=shards)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise MissingDependency(f"dask_address={dask_address!r} needs the prefect-dask package: "
                                f"pip install -e '.[dask]' (or pip install prefect-dask), or leave "
                                f"dask_address empty to run the shards in a local pool") from None
    return DaskTaskRunner(address=dask_address)


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class StageContext:
    """What a stage task needs from its flow run (plain values: shards may run on Dask workers)."""

    project: str
    dvc_mode: str
    shards: int
    dask_address: str | None
    parent_run_id: str | None
    retries: int = RETRIES
    threads: int | None = None


def _retry_unless_usage_error(task, task_run, state) -> bool:
    """Retry condition: invalid params (exit code 2) fail the same way every time."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the state carries no readable exception: let the retry policy decide
        return True
    return getattr(error, "returncode", None) != USAGE_EXIT_CODE


def _retry_options(stage: str, retries: int) -> dict[str, Any]:
    if base_stage(stage) not in IO_STAGES or retries == 0:
        return {}
    return {"retries": retries, "retry_delay_seconds": RETRY_DELAY_S,
            "retry_condition_fn": _retry_unless_usage_error}


@task(cache_policy=NO_CACHE)
def shard_task(stage: str, command: str, shard: str, project: str, parent_run_id: str | None,
               threads: int | None = None) -> str:
    """Run the stage's dvc.yaml `cmd` with `--shard i/n` in the project (on whichever worker runs it)."""
    logger = get_run_logger()
    code, lines = run_streaming(f"{command} --shard {shard}", cwd=Path(project),
                                env=stage_env(parent_run_id, threads),
                                on_line=lambda line: logger.info("%s", line))
    if code != 0:
        raise StageFailed(stage_error(stage, lines, code), code)
    return shard


def run_shards(stage: str, command: str, ctx: StageContext) -> None:
    """Map the stage's shards over the shard runner and wait for all; fail with their errors."""
    get_run_logger().info("%s: %d shards on %s", stage, ctx.shards, ctx.dask_address or "a local pool")
    errors: list[StageFailed] = []
    with shard_runner(ctx.dask_address, ctx.shards) as runner:
        futures = []
        for index in range(ctx.shards):
            shard = str(Shard(index, ctx.shards))
            named = shard_task.with_options(name=f"{stage}[{shard}]", task_run_name=f"{stage}[{shard}]",
                                            **_retry_options(stage, ctx.retries))
            futures.append(runner.submit(named, {"stage": stage, "command": command, "shard": shard,
                                                 "project": ctx.project,
                                                 "parent_run_id": ctx.parent_run_id,
                                                 "threads": ctx.threads}))
        for future in futures:
            try:
                future.result()
            except StageFailed as err:
                errors.append(err)
    if errors:
        raise StageFailed("\n".join(str(e) for e in errors), errors[0].returncode)


def shardable(stage: str) -> bool:
    return supports_shards(load_stage(base_stage(stage)))


@task(cache_policy=NO_CACHE)
def stage_task(stage: str, ctx: StageContext) -> dict[str, Any]:
    """Bring one stage up to date through DVC; returns whether it ran and how long it took."""
    logger = get_run_logger()
    start = time.perf_counter()
    project = Path(ctx.project)
    dvc = Dvc(project, stage_env(ctx.parent_run_id, ctx.threads), lambda line: logger.info("%s", line))
    changed = dvc.stale(stage)
    if not changed:
        logger.info("%s is up to date (dvc status): nothing to do", stage)
        return {"stage": stage, "ran": False, "seconds": time.perf_counter() - start}
    logger.info("%s is stale: %s", stage, json.dumps(changed))
    spec = read_dvc_stages(project)[stage]
    if ctx.shards > 1 and shardable(stage):
        run_shards(stage, spec["cmd"], ctx)
    if ctx.dvc_mode == "repro":
        dvc.repro(stage)
    else:
        run_stage_commands(stage, spec, dvc)
        dvc.commit(stage)
    seconds = time.perf_counter() - start
    logger.info("%s done in %.1f s", stage, seconds)
    return {"stage": stage, "ran": True, "seconds": seconds}


# ----------------------------------------------------------------------------- the flow


def params_source(project: Path, params_file: str) -> Path:
    """`params_file` as a path inside the project: a YAML file there, never one outside it."""
    source = (project / params_file).resolve()
    if not source.is_relative_to(project.resolve()):
        raise ParamsError(f"params_file: {params_file!r} is outside the project ({project})")
    if source.suffix not in (".yaml", ".yml"):
        raise ParamsError(f"params_file: {params_file!r} is not a .yaml file")
    if not source.is_file():
        raise ParamsError(f"params_file: not found: {params_file}")
    return source


def install_params(project: Path, source: Path, log: Callable[[str], None]) -> Path:
    """Make the (validated) `source` the project's params.yaml, which DVC and the stages read; the
    replaced file is kept as `.params.yaml.before-flow`."""
    target = project / DEFAULT_PARAMS_FILE
    if source.resolve() != target.resolve() and (
            not target.exists() or source.read_bytes() != target.read_bytes()):
        if target.exists():
            shutil.copyfile(target, project / f".{DEFAULT_PARAMS_FILE}.before-flow")
        log(f"copying {source.relative_to(project.resolve())} over {DEFAULT_PARAMS_FILE} (the old one "
            f"is kept as .{DEFAULT_PARAMS_FILE}.before-flow): DVC reads {DEFAULT_PARAMS_FILE}, so the "
            f"params that ran are the ones dvc.lock records")
        shutil.copyfile(source, target)
    return target


@contextlib.contextmanager
def pipeline_run(settings: FlowParams, models: dict[str, Any], params_file: Path) -> Iterator[MlflowRun]:
    """The parent MLflow run of one flow run, tagged like the stage runs it will hold."""
    dump = {name: model.model_dump(mode="json") for name, model in models.items()}
    tags = {"params_hash": params_hash(RootModel[dict[str, Any]](dump)),
            "prefect_flow_run": str(flow_run.id or ""),
            **run_tags("pretrain", models.get("pretrain"), params_file, [])}
    with mlflow_run("pipeline", settings, tags=tags) as run:
        yield run


def submit_stages(stages: list[str], graph: dict[str, set[str]], ctx: StageContext) -> dict:
    """One task per stage, each waiting for its upstream stages' tasks."""
    futures: dict[str, Any] = {}
    for stage in stages:
        named = stage_task.with_options(name=stage, task_run_name=stage,
                                        **_retry_options(stage, ctx.retries))
        upstream = [futures[up] for up in sorted(graph[stage]) if up in futures]
        futures[stage] = named.submit(stage, ctx, wait_for=upstream)
    return futures


def collect(futures: dict[str, Any]) -> tuple[dict[str, dict], list[str]]:
    """Each completed stage's result, and the error of each failed one (in DAG order)."""
    results: dict[str, dict] = {}
    errors: list[str] = []
    skipped: list[str] = []
    for stage, future in futures.items():
        future.wait()
        if future.state.is_completed():
            results[stage] = future.result()
        elif future.state.is_failed():
            try:
                future.result()
            except Exception as err:  # the task's own exception, e.g. StageFailed
                errors.append(str(err))
        else:  # NotReady: an upstream stage failed
            skipped.append(stage)
    if skipped:
        errors.append(f"not run because an upstream stage failed: {', '.join(skipped)}")
    return results, errors


@flow(name="mam2", task_runner=ThreadPoolTaskRunner())
@document_params(FlowParams)
def mam2_flow(params_file: str = "params.yaml", first_stage: StageChoice | None = None,
              last_stage: StageChoice | None = None, shards: int = 1, dask_address: str | None = None,
              dvc_mode: DvcMode = "commit", retries: int = RETRIES,
              threads_per_stage: int | None = None) -> dict[str, dict]:
    """The MAM2 pipeline: every stage of dvc.yaml that has a module, as a DAG, through DVC.

    Runs in the project root (where dvc.yaml is). `first_stage`/`last_stage` restrict it to the
    stages on DAG paths between them; `shards` splits the stages that accept `--shard`. A failed
    run fails with each failed stage's own error (`stage decode failed (exit code 1): mam2
    decode: error: ...`), also logged as the run's last error.
    """
    logger = get_run_logger()
    settings = _flow_params(params_file=params_file, first_stage=first_stage, last_stage=last_stage,
                            shards=shards, dask_address=dask_address, dvc_mode=dvc_mode,
                            retries=retries, threads_per_stage=threads_per_stage)
    project = Path.cwd()
    dvc_stages = read_dvc_stages(project)
    graph = upstream_graph(pipeline_stages(dvc_stages), dvc_stages)
    stages = select_stages(graph, settings.first_stage, settings.last_stage)
    sections = sorted({base_stage(name) for name in stages}, key=STAGES.index)
    source = params_source(project, settings.params_file)
    models = validate_all(source, sections)  # the sections of this run, before any work or copy
    params_path = install_params(project, source, logger.warning)
    if settings.dask_address:
        shard_runner(settings.dask_address, settings.shards)  # fail now if prefect-dask is missing
    logger.info("stages: %s", ", ".join(f"{s} (after {', '.join(sorted(graph[s] & set(stages)))})"
                                        if graph[s] & set(stages) else s for s in stages))
    threads = settings.threads_per_stage or default_threads_per_stage(settings.dvc_mode)
    logger.info("compute threads per stage process (threads_per_stage): %s",
                threads or "each stage's own default")
    start = time.perf_counter()
    with pipeline_run(settings, models, params_path) as parent:
        ctx = StageContext(str(project), settings.dvc_mode, settings.shards, settings.dask_address,
                           parent.run_id, settings.retries, threads)
        results, errors = collect(submit_stages(stages, graph, ctx))
        ran = [r for r in results.values() if r["ran"]]
        parent.log_metrics({"flow/seconds": time.perf_counter() - start, "flow/stages_run": len(ran),
                            **({"flow/threads_per_stage": threads} if threads else {}),
                            **{f"flow/{r['stage'].replace('@', '/')}_seconds": r["seconds"] for r in ran}})
        if errors:
            # the run's last log line: `prefect deployment run --watch` and the UI show the reason
            logger.error("pipeline failed: %s", "\n\n".join(errors))
            raise PipelineFailed("\n\n".join(errors))
    logger.info("done in %.1f s: ran %s; up to date: %s", time.perf_counter() - start,
                ", ".join(r["stage"] for r in ran) or "none",
                ", ".join(r["stage"] for r in results.values() if not r["ran"]) or "none")
    return results


def _flow_params(**values: Any) -> FlowParams:
    """Validate the flow's parameters; errors name the parameter like params.yaml errors do."""
    try:
        return FlowParams(**values)
    except ValidationError as err:
        raise ParamsError(format_validation_error("flow", err)) from None


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to (env or Prefect profile), None when unset."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def serve_deployment(name: str = "full", limit: int | None = None) -> None:
    """Serve `mam2_flow` as deployment `mam2/<name>` until interrupted. The entrypoint is the
    module path, so each flow run imports `pipeline.orchestrate.flows` from the project it is served in."""
    from prefect.deployments.runner import EntrypointType

    mam2_flow.serve(name=name, limit=limit, entrypoint_type=EntrypointType.MODULE_PATH)
