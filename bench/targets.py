"""Benchmark: targets-stage throughput against the bare VQGAN encoder on the same batches.

Both sides encode the same frames and their mirror images with the same model, `clips_per_batch`
clips at a time. The bare side has the batches in memory already and only runs the encoder; the stage
also reads and decompresses clips from Zarr, computes the RGB differences, compresses and writes three
arrays and its progress markers. The ratio stage/bare is the stage's overhead (target >= 0.8).

The write path is also timed alone: the whole stage with its encoder replaced by a stand-in that hands
out random codes at no cost, so everything but the encoder runs (reads, differences, compression,
writes, markers, the worker processes). `write_path_fps` is its encode-and-write loop's rate and
`fixed_s` the stage's time around the loop (tokenizer load and hash, store set-up, commit), both wall
clock, so on a busy machine they mostly measure the load. CPU time does not: the loop's CPU per frame
in the stage's own process (the part that shares the encoder's process) and in its workers give
`write_path_fps_free_cores` = min((writers + 1) / workers' CPU per frame, 1 / stage's CPU per frame),
the loop's rate with a core per process. With the bare encoder rate E recorded on a GPU
(bench/results/targets-cuda-*.json), and the encoder and write path overlapping, the stage there runs
at min(E, W) for W = write_path_fps_free_cores: `predicted_ratio_<device>` = min(1, W / E) for a
long run, and `predicted_ratio_<device>_<F>f` = F / (fixed CPU s + F / min(E, W)) / E at this run's F
frames. Indicative: the GPU host's cores differ, and the encoder's own Python competes with the stage
process's share. On a GPU it also times the official-size f16 encoder (ImageNet VQGAN, 256 x 256
frames) in bf16. Figures print last and go to bench/results/targets-<device>.json.

    python bench/targets.py [--clips 24] [--frames 16] [--size 128] [--repeats 3] [--threads N]
    python bench/targets.py --write-path-only   # no encoder: the write path's figures in minutes,
                                                # to bench/results/targets_write_path-<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_file import RESULTS, save_results  # noqa: E402

os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

import stages.targets as targets_stage  # noqa: E402
from models.vqgan import VQGAN, VQGANConfig, save_vqgan  # noqa: E402
from pipeline.core.stores import create_clips_store  # noqa: E402
from pipeline.core.tensors import clip_to_tensor  # noqa: E402
from pipeline.data.synthetic import MOTION_CLASSES, render_class_clip  # noqa: E402
from stages.targets import Params, pick_device, run  # noqa: E402


def make_clips(path: Path, count: int, frames: int, size: int) -> np.ndarray:
    """A clips store of rendered demo-like clips (so compression sees realistic content)."""
    rng = np.random.default_rng(0)
    clips = np.stack([render_class_clip(MOTION_CLASSES[i % len(MOTION_CLASSES)], size=(size, size),
                                        num_frames=frames, rng=rng) for i in range(count)])
    store = create_clips_store(path, num_clips=count, num_frames=frames, size=size,
                               labels=np.zeros(count), videos=np.arange(count), starts=np.zeros(count),
                               splits=np.zeros(count), video_paths=[], attrs={})
    store["frames"][:] = clips
    return clips


def make_tokenizer(path: Path, clips: np.ndarray) -> VQGAN:
    """The demo architecture with its codebook seeded on the clips' latents (varied codes, as trained)."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny_f16()).eval()
    with torch.no_grad():
        latent = model.encode_to_latent(clip_to_tensor(clips[:4]).mul(2).sub(1)[:, :, 0])
    model.reinit_dead_codes(torch.zeros(model.codebook_size), latent)
    save_vqgan(model, path)
    return model


@torch.no_grad()
def bare_encoder(model: VQGAN, batches: list[torch.Tensor], frames_per_batch: int) -> None:
    """The reference: the encoder alone on (B, C, T, H, W) batches already in memory, on the device,
    frames and mirrored frames, exactly the encoder work the stage does."""
    for video in batches:
        codes = model.encode_video(video, frames_per_batch)
        flipped = model.encode_video(video.flip(-1), frames_per_batch)
        (codes.sum() + flipped.sum()).item()  # wait for the device, as the stage's copy to host does


@torch.no_grad()
def official_encoder_bf16(frames: int = 64, repeats: int = 5) -> float:
    """Frames/s of the official-size f16 encoder (ImageNet VQGAN config) at 256 x 256 in bf16 on GPU."""
    model = VQGAN(VQGANConfig.imagenet_f16_1024()).cuda().eval()
    x = torch.rand(frames, 3, 256, 256, device="cuda") * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.encode(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model.encode(x)
        torch.cuda.synchronize()
    return frames * repeats / (time.perf_counter() - start)


class Timing(NamedTuple):
    """One stage run: wall-clock seconds of the run and of its encode-and-write loop, and CPU seconds of
    the stage's own process in the loop, of its worker processes, and of the stage's process outside
    the loop."""

    whole_s: float
    loop_s: float
    stage_cpu_s: float
    workers_cpu_s: float
    fixed_cpu_s: float


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed_run(params: Params, work: Path, encoder: Callable | None = None) -> Timing:
    """Run the stage on the benchmark's store, timing it; `encoder` stands in for the stage's encoder
    when given. The workers' CPU counts once they are reaped, when the loop's pool closes."""
    loop: dict[str, float] = {}
    write_targets = targets_stage.write_targets

    def timed_loop(*args, **kwargs) -> float:
        wall, stage, workers = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), \
            cpu_seconds(resource.RUSAGE_CHILDREN)
        rate = write_targets(*args, **kwargs)
        loop.update(s=time.perf_counter() - wall, stage=cpu_seconds(resource.RUSAGE_SELF) - stage,
                    workers=cpu_seconds(resource.RUSAGE_CHILDREN) - workers)
        return rate

    with mock.patch.object(targets_stage, "write_targets", timed_loop), \
            mock.patch.object(targets_stage, "encode_clips", encoder or targets_stage.encode_clips):
        start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
        run(params, clips=work / "clips.zarr", tokenizer=work / "vqgan.pt", targets=work / "targets.zarr")
        whole, whole_cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu
    return Timing(whole, loop["s"], loop["stage"], loop["workers"], whole_cpu - loop["stage"])


def random_codes(model: VQGAN) -> Callable:
    """An encoder stand-in at no cost: seeded random codes of the model's shape and codebook (the codes
    are a thousandth of the bytes written, so their content barely moves the write path's cost)."""
    rng, f = np.random.default_rng(0), model.config.downsample_factor

    def encode(_: VQGAN, clips: np.ndarray, **__: object) -> tuple[np.ndarray, np.ndarray]:
        shape = (*clips.shape[:2], clips.shape[2] // f, clips.shape[3] // f)
        return tuple(rng.integers(0, model.codebook_size, shape).astype(np.int16) for _ in range(2))

    return encode


def recorded_gpu_rates() -> dict[str, float]:
    """The bare encoder's frames/s recorded by this benchmark on each GPU (bench/results)."""
    rates = {}
    for path in sorted(RESULTS.glob("targets-cuda-*.json")):
        figures = json.loads(path.read_text())
        rates[figures["device"]] = figures["bare_encoder_fps"]
    return rates


def write_path_figures(frames: int, writers: int, timing: Timing) -> dict[str, float]:
    """The write path's rate (wall clock and with a core per process), CPU per frame, fixed cost."""
    stage_ms, workers_ms = 1e3 * timing.stage_cpu_s / frames, 1e3 * timing.workers_cpu_s / frames
    return {"write_path_fps": frames / timing.loop_s, "fixed_s": timing.whole_s - timing.loop_s,
            "write_path_stage_cpu_ms_per_frame": stage_ms, "write_path_workers_cpu_ms_per_frame": workers_ms,
            "write_path_fps_free_cores": 1e3 * min((writers + 1) / max(workers_ms, 1e-9),
                                                   1 / max(stage_ms, 1e-9)),
            "fixed_cpu_s": timing.fixed_cpu_s}


def predictions(frames: int, write_fps: float, fixed_s: float) -> dict[str, float]:
    """The stage/bare ratio predicted on each recorded GPU, for long runs and at `frames` frames."""
    out = {}
    for device, encoder_fps in recorded_gpu_rates().items():
        stage_fps = frames / (fixed_s + frames / min(encoder_fps, write_fps))
        out[f"predicted_ratio_{device}"] = min(1.0, write_fps / encoder_fps)
        out[f"predicted_ratio_{device}_{frames}f"] = stage_fps / encoder_fps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--clips-per-batch", type=int, default=Params().clips_per_batch)
    parser.add_argument("--writers", type=int, default=Params().writers, help="the stage's targets.writers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write-path-only", action="store_true", help="skip the encoder and the full stage")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = Params(clips_per_batch=args.clips_per_batch, writers=args.writers)
    device = pick_device(params.device)
    work = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    try:
        clips = make_clips(work / "clips.zarr", args.clips, args.frames, args.size)
        model = make_tokenizer(work / "vqgan.pt", clips)
        model.to(device)
        batches = [clip_to_tensor(torch.from_numpy(clips[s:s + params.clips_per_batch]))
                   .to(device).mul_(2).sub_(1)
                   for s in range(0, len(clips), params.clips_per_batch)]
        best: dict[str, float] = {}
        write_path: Timing | None = None  # each figure's best over the repeats
        # Alternate reference, stage and write path and keep each one's best time: load bursts on a
        # shared machine then cannot favour whichever side ran first.
        for _ in range(args.repeats):
            if not args.write_path_only:
                start = time.perf_counter()
                bare_encoder(model, batches, params.frames_per_batch)
                best["bare"] = min(best.get("bare", np.inf), time.perf_counter() - start)
                best["stage"] = min(best.get("stage", np.inf), timed_run(params, work).whole_s)
                shutil.rmtree(work / "targets.zarr")
            timing = timed_run(params, work, random_codes(model))
            write_path = Timing(*map(min, zip(write_path, timing, strict=True))) if write_path else timing
            shutil.rmtree(work / "targets.zarr")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    frames = args.clips * args.frames
    results = {"clips": args.clips, "frames": frames, "frame_size": args.size,
               "clips_per_batch": params.clips_per_batch, "writers": params.writers,
               "torch_threads": torch.get_num_threads()}
    if best:
        results.update(bare_encoder_fps=frames / best["bare"], stage_fps=frames / best["stage"],
                       ratio_stage_vs_bare=best["bare"] / best["stage"])
    results.update(write_path_figures(frames, params.writers, write_path))
    results.update(predictions(frames, results["write_path_fps_free_cores"], results["fixed_cpu_s"]))
    if torch.cuda.is_available():
        results["official_f16_encoder_256px_bf16_fps"] = official_encoder_bf16()
    name = save_results("targets" + ("_write_path" if args.write_path_only else ""), results,
                        cuda=torch.cuda.is_available())
    print(f"targets benchmark on {name}: {args.clips} clips x {args.frames} frames of "
          f"{args.size}x{args.size}, tiny_f16 tokenizer, {params.clips_per_batch} clips per batch, "
          f"{params.writers} writers")
    for key, value in results.items():
        if key not in ("clips", "frames", "frame_size", "clips_per_batch", "writers"):
            print(f"  {key:<52}{value:10.2f}")


if __name__ == "__main__":
    main()
