"""Benchmark: the pretrain stage on CPU against its bare training step (the CPU variant of
bench/pretrain_gpu.py).

A clips store of rendered demo clips (16 frames of 128 px, as the demo decodes them) and a targets store
(random codes: their values do not change the cost; exact RGB differences) are made in a scratch
directory. The stage runs as the demo runs it (params.yaml's pretrain section: its model, batch, loader
workers, log and checkpoint intervals; only the step count is the benchmark's) through the shared
training loop, with MLflow off. The reference is the bare step of the same model, built from the same
seed, on the same batches, already collated in memory: forward (the stage's loss function), backward,
gradient clipping when the params clip (the recipe's math, not the loop's overhead), AdamW. Both sides
run in this process with the same torch threads (`--threads`, default torch's), the bare step before and
after the stage (its mean is the reference, so a load burst favours neither).

Both rates are taken per window of `train.log_every` steps, as the loop logs its own: `median` is the
median window after the first (warm-up), `mean` is all steps after the first window over their time, and
so counts the checkpoints the stage writes. The ratio stage/bare is what the loader and the loop cost
(target >= 0.95); the stage is also run with its samples served from memory (`FromMemory`, no loader
workers), whose ratio to the bare step is what the loop alone costs.

Writes bench/results/pretrain_cpu-<device>.json; prints the figures last.

    python bench/pretrain_cpu.py [--clips 32] [--steps 60] [--workers N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

from bench.loader import make_targets  # noqa: E402
from bench.pretrain_step import demo_params  # noqa: E402
from bench.results_file import print_figures, save_results  # noqa: E402
from pipeline.core.stores import create_clips_store  # noqa: E402
from pipeline.core.training import Dist, SeededBatchSampler, default_param_groups  # noqa: E402
from pipeline.data.pretrain_data import PretrainDataset  # noqa: E402
from pipeline.data.shared_batch import collate_shared  # noqa: E402
from pipeline.data.synthetic import MOTION_CLASSES, render_class_clip  # noqa: E402
from stages import pretrain  # noqa: E402

FRAMES, SIZE = 16, 128  # the demo's stored clips


def make_clips(path: Path, count: int) -> None:
    """A clips store of rendered clips of the demo's motion classes (realistic content to compress)."""
    rng = np.random.default_rng(0)
    store = create_clips_store(path, num_clips=count, num_frames=FRAMES, size=SIZE, labels=np.full(count, -1),
                               videos=np.arange(count), starts=np.zeros(count), splits=np.zeros(count),
                               video_paths=[f"v{i}.mp4" for i in range(count)], attrs={"class_names": []})
    for i in range(count):
        store["frames"][i] = render_class_clip(MOTION_CLASSES[i % len(MOTION_CLASSES)], size=(SIZE, SIZE),
                                               num_frames=FRAMES, rng=rng)


def window_rates(seconds_per_step: list[float], batch: int, window: int) -> dict[str, float]:
    """Clips/s after the first `window` steps: the median window of `window` steps and the overall mean."""
    steps = seconds_per_step[window:]
    windows = [steps[i:i + window] for i in range(0, len(steps), window)]
    median = statistics.median(sum(w) / len(w) for w in windows)
    return {"median": batch / median, "mean": batch * len(steps) / sum(steps)}


class FromMemory(PretrainDataset):
    """The stage's dataset with one sample per clip drawn once and served from memory ever after: the
    stage's loop without the reading (its own cost)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = [self.sample(int(row), seed) for seed, row in enumerate(self.rows)]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.served[key[0]]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        return [self[key] for key in keys]


def stage_steps(params: pretrain.Params, work: Path, dataset: type[PretrainDataset] = PretrainDataset
                ) -> list[float]:
    """Run the stage (reading with `dataset`); seconds per step, from the loop's own throughput log."""
    table: list[dict] = []
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run, not a resume
    train = pretrain.train
    pretrain.PretrainDataset = dataset

    def keep_history(*args, **kwargs):
        result = train(*args, **kwargs)
        table.extend(result.history)
        return result

    pretrain.train = keep_history
    try:
        pretrain.run(params, clips=work / "clips.zarr", targets=work / "targets.zarr",
                     tokenizer=work / "none.pt", artifacts=work / "artifacts", run_dir=work / "run",
                     metrics=work / "metrics.json", reports=work / "reports")
    finally:
        pretrain.train, pretrain.PretrainDataset = train, PretrainDataset
    per_step, last = [], 0
    for row in table:
        steps = row["step"] - last
        per_step += [params.train.batch_size / row["clips_per_s"]] * steps
        last = row["step"]
    return per_step


def bare_steps(params: pretrain.Params, dataset: PretrainDataset, steps: int, keep: int = 10) -> list[float]:
    """Seconds per bare step (forward, backward, AdamW) of the stage's model on its first `keep` batches."""
    torch.manual_seed(params.train.seed)
    model = pretrain.build_model(params, dataset).train()
    optimizer = torch.optim.AdamW(default_param_groups(model, params.train.weight_decay),
                                  lr=params.train.learning_rate(), betas=params.train.betas)
    sampler = SeededBatchSampler(len(dataset), params.train.model_copy(update={"steps": keep}), Dist())
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_shared))
    motion = pretrain.needs_motion(params)
    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        pretrain.mam2_loss(model, batches[step % keep], motion=motion)["loss"].backward()
        if params.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.clip_grad)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="stage steps (the demo checkpoints every 50)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the demo's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = demo_params()
    train = {"steps": args.steps, "system_metrics_every": None}
    if args.workers is not None:
        train["workers"] = args.workers
    params = demo.model_copy(update={"train": demo.train.model_copy(update=train), "sample_clips": 0})
    window = params.train.log_every
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-cpu-") as scratch:
        work = Path(scratch)
        make_clips(work / "clips.zarr", args.clips)
        make_targets(work / "clips.zarr", work / "targets.zarr", codebook=256)
        dataset = PretrainDataset(work / "clips.zarr", work / "targets.zarr", pretrain.sampling_for(params))
        before = bare_steps(params, dataset, args.steps)
        start = time.perf_counter()
        stage = stage_steps(params, work)
        stage_s = time.perf_counter() - start
        loop_params = params.model_copy(update={"train": params.train.model_copy(update={"workers": 0})})
        loop = stage_steps(loop_params, work, FromMemory)
        after = bare_steps(params, dataset, args.steps)
    bare = [(a + b) / 2 for a, b in zip(before, after, strict=True)]
    rates = {name: window_rates(steps, params.train.batch_size, window)
             for name, steps in (("stage", stage), ("loop", loop), ("bare", bare))}
    results = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "clips": args.clips,
        "model": f"{params.model} depth {params.depth}, {params.num_frames}x{params.input_size}^2",
        "batch": params.train.batch_size, "steps": args.steps, "workers": params.train.workers,
        "log_every": window, "checkpoint_every": params.train.checkpoint_every, "stage_s": round(stage_s, 1),
        **{f"{name}_clips_per_s_{kind}": rate[kind] for name, rate in rates.items() for kind in rate},
        "bare_before_vs_after": sum(before[window:]) / sum(after[window:]),
        **{f"ratio_{name}_vs_bare_{kind}": rates[name][kind] / rates["bare"][kind]
           for name in ("stage", "loop") for kind in ("median", "mean")},
    }
    device = save_results("pretrain_cpu", results)
    print(f"pretrain stage vs bare step on {device}: {results['model']}, batch {results['batch']}, "
          f"{args.steps} steps, {results['workers']} loader workers, {results['threads']} torch threads")
    print_figures(results)


if __name__ == "__main__":
    main()
