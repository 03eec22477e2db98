"""The one training loop every training stage shares (tokenizer, pretrain, finetune, motion, refine).

A stage hands `train()` a model, a dataset, and a loss function `loss_fn(model, batch) -> dict`
whose "loss" entry is optimised and whose other entries are logged. The loop owns everything else:
AdamW with decoupled weight decay (none on biases, norms and 1-d params), lr = base_lr x batch / 256,
warm-up then cosine or one-cycle decay, gradient clipping and accumulation, bf16 autocast on GPU,
optional torch.compile, DDP under torchrun (gloo on CPU, NCCL on GPU) with rank-0 logging and
saving, checkpoints every N steps and an exact resume (model, optimiser, scaler, RNG, data
position; a finished run made by other code, per `pipeline.core.fingerprint.source_digest` of the
model, loss, data and this loop, is trained again), and a clear stop when the loss goes non-finite
(the last good checkpoint is kept).
A stage may add a periodic `Evaluation` (e.g. on a validation split): the loop runs it on rank 0,
in eval mode, without touching the RNG, and its values join the history row of that step, so
they are logged, plotted and resumed like the training logs.

Data order and augmentation never depend on the process layout: the batch sampler hands each
sample its own seed from (seed, global position), so one process with batch B and two with B/2
each see the same samples with the same augmentations, and a resumed run continues the stream.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BeforeValidator, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.atomic import atomic_file
from pipeline.core.errors import StageError
from pipeline.core.fingerprint import source_digest
from pipeline.core.mlflow_runs import current_run, system_metrics
from pipeline.core.params import StageParams
from pipeline.core.progress import bars_enabled, progress_bar

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
CHECKPOINT = "checkpoint.pt"


# Train params that change how a run executes, not what it computes: a checkpoint resumes across them.
EXECUTION_ONLY = frozenset({"stop_after", "workers", "system_metrics_every"})


class TrainParams(StageParams):
    """Optimisation knobs shared by every training stage (the `train:` block of its section)."""

    steps: int = Field(200, ge=1, description="optimiser steps in total (to score a saved model without "
                       "training: mam2 evaluate <stage>)")
    batch_size: int = Field(8, ge=1, description="global batch per step (all ranks, all micro-steps)")
    accumulation: int = Field(1, ge=1, description="micro-batches accumulated per step")
    base_lr: float = Field(1.5e-4, gt=0, description="learning rate before batch scaling")
    lr_scaling: Literal["linear", "none"] = Field("linear", description="linear: lr = base_lr x batch / 256")
    min_lr: float = Field(1e-6, ge=0, description="floor of the decayed learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine", description="decay after warm-up (onecycle: linear decay, as RAFT trains)")
    clip_grad: float | None = Field(1.0, gt=0, description="max gradient norm (null: no clipping)")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    workers: int = Field(0, ge=0, description="data loader worker processes")
    seed: int = Field(0, description="seed of initialisation, data order and augmentation")
    system_metrics_every: float | None = Field(10.0, gt=0, description="seconds between samples of "
                                               "CPU/GPU/memory use logged to MLflow (null: off)")
    stop_after: int | None = Field(None, ge=1, description="end this run after N steps with a "
                                   "checkpoint (for time-sliced jobs); a rerun continues")

    def resume_identity(self) -> dict[str, Any]:
        """The params a checkpoint must share to be resumed: all but how this run is executed."""
        return self.model_dump(mode="json", exclude=EXECUTION_ONLY)

    def learning_rate(self) -> float:
        scale = self.batch_size / 256 if self.lr_scaling == "linear" else 1.0
        return self.base_lr * scale


def stage_train_params(defaults: TrainParams) -> Any:
    """The type of a stage's `train:` field whose partial blocks override `defaults`.

    Without it `--set tokenizer.train.steps=5` (or a `train:` block naming a few keys) would fall back
    to TrainParams' generic defaults for every other key instead of the stage's own.
    """
    def over_stage_defaults(value: object) -> object:
        return {**defaults.model_dump(), **value} if isinstance(value, dict) else value

    return Annotated[TrainParams, BeforeValidator(over_stage_defaults)]


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job (world 1 when run directly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)


def device_for(place: Dist) -> torch.device:
    return torch.device(f"cuda:{place.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------- data order


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of micro-batches of (index, sample_seed), resumable at any step.

    Epoch e is a permutation drawn from (seed, e); global sample position g gets seed (seed, g).
    Rank r takes its contiguous share of each step's global batch, micro-batch by micro-batch.
    """

    def __init__(self, num_items: int, params: TrainParams, place: Dist, start_step: int = 0) -> None:
        if num_items <= 0:
            raise StageError("the training set is empty")
        self.num_items, self.params, self.place = num_items, params, place
        self.micro = per_rank_micro_batch(params, place)
        self.start_step = start_step
        self._epoch: tuple[int, np.ndarray] | None = None  # the last epoch's order, drawn once

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        p, g = self.params, self.params.batch_size
        for step in range(self.start_step, p.steps):
            for micro in range(p.accumulation):
                first = step * g + micro * (g // p.accumulation) + self.place.rank * self.micro
                yield [self._item(pos) for pos in range(first, first + self.micro)]

    def __len__(self) -> int:
        return (self.params.steps - self.start_step) * self.params.accumulation

    def _item(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_items)
        seed = int(np.random.default_rng([self.params.seed, 7, position]).integers(2**31))
        return int(self._order(epoch)[offset]), seed

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation, drawn once per epoch rather than once per sample: it costs
        O(items) (3 ms at Kinetics-400's 240k clips, in the training process, for every sample)."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.params.seed, epoch]).permutation(self.num_items)
            self._epoch = (epoch, order)
        return self._epoch[1]


def per_rank_micro_batch(params: TrainParams, place: Dist) -> int:
    parts = params.accumulation * place.world
    if params.batch_size % parts:
        raise StageError(f"train.batch_size={params.batch_size} must divide by accumulation x "
                         f"world size = {params.accumulation} x {place.world}")
    return params.batch_size // parts


# ----------------------------------------------------------------------------- optimisation


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and convolutions; leave biases, norms, tokens and position tables alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, params: TrainParams) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then the chosen decay to min_lr."""
    peak = params.learning_rate()
    if step < params.warmup_steps:
        return (step + 1) / params.warmup_steps
    if params.schedule == "constant":
        return 1.0
    span = max(1, params.steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / span)
    floor = min(params.min_lr / peak, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if params.schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def autocast_dtype(params: TrainParams, device: torch.device) -> torch.dtype | None:
    if params.precision == "fp32" or (params.precision == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if params.precision == "fp16" else torch.bfloat16


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Evaluation:
    """A periodic evaluation during training: `fn(model) -> {name: value}` on the unwrapped model,
    every `every` steps and after the last step. Its values go into the history row of that step as
    `<prefix>_<name>` and to MLflow as `<prefix>/<name>`."""

    fn: Callable[[nn.Module], dict[str, float]]
    every: int
    prefix: str = "val"

    def due(self, done: int, steps: int) -> bool:
        """Whether it runs after step `done` of `steps` (not at a stop_after break: a resumed run's
        history then equals an uninterrupted run's)."""
        return done % self.every == 0 or done == steps

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Evaluate `model` in eval mode with the RNG state left as it was (the caller restores the
        training mode)."""
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            return {name: float(value) for name, value in self.fn(model).items()}

    def record(self, history: list[dict[str, float]], step: int, values: dict[str, float]) -> None:
        """Put `values` into the history row of `step` as `<prefix>_<name>` (a new row when nothing was
        logged at that step), and log them to MLflow as `<prefix>/<name>`."""
        row = {f"{self.prefix}_{name}": value for name, value in values.items()}
        if history and history[-1]["step"] == step:
            history[-1].update(row)
        else:
            history.append({"step": step, **row})
        current_run().log_metrics({f"{self.prefix}/{name}": value for name, value in values.items()},
                                  step=step)
        log.info("step %d: %s", step, "  ".join(f"{key} {value:.4g}" for key, value in row.items()))


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    completed: bool = True
    step: int = 0


def train(model: nn.Module, dataset: Dataset, loss_fn: LossFn, params: TrainParams, run_dir: Path,
          *, param_groups: list[dict] | None = None, collate_fn: Callable | None = None,
          fingerprint: str = "", find_unused_parameters: bool = False,
          unit: str = "sample", evaluation: Evaluation | None = None) -> TrainResult:
    """Train `model` on `dataset` with `loss_fn`; checkpoint in `run_dir` and resume from it.

    `param_groups` may carry an "lr_scale" per group (layer-wise decay). `fingerprint` identifies
    the stage's own settings (include what changes `evaluation`): a checkpoint made with another
    fingerprint or other train params is not resumed from, nor a finished one of other code. Seed
    (`torch.manual_seed(params.seed)`) before building the model so its initialisation is
    reproducible. `evaluation` runs on rank 0 when due (`Evaluation.due`). Returns the trained
    (unwrapped) model and the history.
    """
    place = init_distributed()
    device = device_for(place)
    torch.manual_seed(params.seed)
    model.to(device)
    groups = param_groups or default_param_groups(model, params.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=params.learning_rate(), betas=params.betas)
    dtype = autocast_dtype(params, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run_dir = Path(run_dir)
    code = source_digest(sys.modules[__name__], model, dataset, loss_fn, collate_fn,
                         evaluation.fn if evaluation else None)
    start, history = _resume(run_dir, model, optimizer, scaler, params, fingerprint, code, place)
    wrapped = _wrap(model, params, place, find_unused_parameters)
    sampler = SeededBatchSampler(len(dataset), params, place, start)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=params.workers,
                        collate_fn=collate_fn, pin_memory=device.type == "cuda",
                        multiprocessing_context="spawn" if params.workers else None,
                        persistent_workers=params.workers > 0,
                        # its own generator, so building the loader leaves the global RNG alone
                        generator=torch.Generator().manual_seed(params.seed))
    result = TrainResult(model, history=history, step=start)  # the resumed run's rows, then ours
    stop = min(params.steps, start + params.stop_after) if params.stop_after else params.steps
    batches = iter(loader)
    wrapped.train()
    with system_metrics(params.system_metrics_every if place.is_main else None), \
            progress_bar("train", unit="step", total=params.steps - start) as update:
        tick, last_logged = time.perf_counter(), start
        for step in range(start, stop):
            for group in optimizer.param_groups:
                group["lr"] = params.learning_rate() * lr_factor(step, params) * group.get("lr_scale", 1.0)
            logs = _step(wrapped, batches, loss_fn, optimizer, scaler, params, device, dtype, place, step)
            if "non_finite" in logs:
                raise StageError(f"{logs['non_finite']} at step {step}; stopped before the optimiser "
                                 f"step. {_last_good(run_dir)} (lower train.base_lr or check the data)")
            update(1, loss=logs["loss"])
            done = step + 1
            if done % params.log_every == 0 or done == stop:
                elapsed = time.perf_counter() - tick
                rate = params.batch_size * (done - last_logged) / max(elapsed, 1e-9)
                logs.update({"lr": params.learning_rate() * lr_factor(step, params),
                             f"{unit}s_per_s": rate})
                if device.type == "cuda":
                    logs["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                tick, last_logged = time.perf_counter(), done
                result.history.append({"step": done, **logs})
                if place.is_main:
                    current_run().log_metrics({f"train/{k}": v for k, v in logs.items()}, step=done)
                    if not bars_enabled():  # a log file or CI: say how far it is, as the bar would
                        log.info("step %d/%d  loss %.4g  %.1f %ss/s", done, params.steps, logs["loss"],
                                 rate, unit)
            if evaluation is not None and place.is_main and evaluation.due(done, params.steps):
                started = time.perf_counter()
                evaluation.record(result.history, done, evaluation.run(model, device))
                wrapped.train()
                tick += time.perf_counter() - started  # the throughput counts training time only
            if done % params.checkpoint_every == 0 or done == stop:
                if not weights_finite(model):
                    raise StageError(f"the weights became non-finite by step {done}; not saved. "
                                     f"{_last_good(run_dir)} (lower train.base_lr)")
                save_checkpoint(run_dir, model, optimizer, scaler, params, fingerprint, code, done, place,
                                result.history)
    result.step = stop
    result.completed = stop == params.steps
    if place.is_main and not result.completed:
        current_run().mark_incomplete()  # the next run of the stage continues this MLflow run
    if place.world > 1:
        dist.barrier()
    return result


def _step(model: nn.Module, batches: Iterator, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, params: TrainParams, device: torch.device,
          dtype: torch.dtype | None, place: Dist, step: int) -> dict[str, float]:
    """One optimiser step over `accumulation` micro-batches; returns the averaged logs."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for micro in range(params.accumulation):
        batch = to_device(next(batches), device)
        sync = micro == params.accumulation - 1 or place.world == 1
        context = model.no_sync() if not sync and hasattr(model, "no_sync") else _null()
        with context, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = loss_fn(model, batch)
        loss = out["loss"]
        if not torch.isfinite(_global_flag(loss.detach(), place)):
            return {"loss": float("nan"), "non_finite": f"the loss became {float(loss.detach())}"}
        with context:
            scaler.scale(loss / params.accumulation).backward()
        for key, value in out.items():
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            totals[key] = totals.get(key, 0.0) + value / params.accumulation
    if params.clip_grad:
        scaler.unscale_(optimizer)
        totals["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), params.clip_grad))
        grad_ok = math.isfinite(totals["grad_norm"])
    else:
        grad_ok = grads_finite(model)
    # With fp16 loss scaling an overflow is routine (the scaler skips that step and lowers the scale);
    # otherwise a non-finite gradient would poison the weights and the optimiser's moments.
    if not scaler.is_enabled() and not bool(_global_flag(torch.tensor(0.0 if grad_ok else float("nan")),
                                                          place).isfinite()):
        return {**totals, "non_finite": "a gradient became non-finite"}
    scaler.step(optimizer)
    scaler.update()
    return _mean_over_ranks(totals, place)


def grads_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (one fused reduction, not one sync per tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter and buffer of `model` is finite (checked before each save)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def _last_good(run_dir: Path) -> str:
    """Where a stopped run's last good checkpoint is, if it saved one."""
    path = run_dir / CHECKPOINT
    if path.exists():
        step = torch.load(path, map_location="cpu", weights_only=True).get("step")
        return f"The last good checkpoint (step {step}) is {path}"
    return "No checkpoint was saved before it"


def _global_flag(loss: torch.Tensor, place: Dist) -> torch.Tensor:
    """The loss if every rank's loss is finite, else NaN on every rank (so all stop together)."""
    if place.world == 1:
        return loss
    flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    dist.all_reduce(flag)
    return loss if flag.item() == 0 else torch.tensor(float("nan"))


def _mean_over_ranks(logs: dict[str, float], place: Dist) -> dict[str, float]:
    if place.world == 1:
        return logs
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / place.world for k, v in zip(keys, values, strict=True)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors in nested dicts/lists/tuples to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _wrap(model: nn.Module, params: TrainParams, place: Dist, find_unused: bool) -> nn.Module:
    wrapped = model
    if place.world > 1:
        ids = [place.local_rank] if torch.cuda.is_available() else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                      find_unused_parameters=find_unused)
    if params.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


# What the machine, not the run, decides (speed, memory): logged to MLflow, kept out of the files DVC
# tracks, so a rerun of the same work writes the same bytes.
MACHINE_KEYS = ("_per_s", "gpu_mem_gb")


def write_history(history: list[dict[str, float]], path: Path) -> Path:
    """Write the logged history as CSV (step first), for `dvc plots` and people; throughput and
    memory columns are left out (they are in MLflow)."""
    import csv

    keys = ["step", *sorted({k for row in history for k in row
                             if not k.endswith(MACHINE_KEYS)} - {"step"})]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return path


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, params: TrainParams, fingerprint: str, code: str,
                    step: int, place: Dist, history: list[dict[str, float]] | None = None) -> None:
    """Rank 0 writes everything an exact resume needs, atomically: with the logged history, so a
    resumed run's history and metrics equal an uninterrupted run's."""
    if not place.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
             "train_params": params.resume_identity(),
             "fingerprint": fingerprint, "code": code,
             "history": [{k: v if isinstance(v, int) else float(v) for k, v in row.items()}
                         for row in history or []]}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_file(run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, params: TrainParams, fingerprint: str, code: str, place: Dist
            ) -> tuple[int, list[dict[str, float]]]:
    """Load the checkpoint in `run_dir` when it belongs to this run; return the step to start at and
    the history logged up to it.

    `code` digests the source of the model, loss, data and this loop (`source_digest`). A finished
    run made by other code is trained again: DVC reruns a stage when its code changed, and reusing
    the old result would leave the change out. An unfinished one is resumed, with a warning (a fix
    made while a long run was stopped should not cost its progress)."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    same = (state.get("train_params") == params.resume_identity()
            and state.get("fingerprint") == fingerprint)
    if not same:
        log.warning("ignoring %s: it was made with other params; starting afresh", path)
        return 0, []
    if state.get("code") != code:
        if int(state["step"]) >= params.steps:
            log.info("%s holds a finished run of other code (the model, loss, data or training loop "
                     "changed); training again", path)
            return 0, []
        log.warning("resuming %s although the model, loss, data or training loop changed since it "
                    "was saved", path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if place.is_main:
        log.info("resuming from %s at step %d", path, state["step"])
    step = int(state["step"])
    history = [row for row in state.get("history", []) if row.get("step", 0) <= step]
    return step, history
