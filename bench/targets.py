"""Benchmark: targets-stage throughput against the bare VQGAN encoder on the same batches.

Both sides encode the same frames and their mirror images with the same model, `clips_per_batch`
clips at a time. The bare side has the batches in memory already and only runs the encoder; the stage
also reads and decompresses clips from Zarr, computes the RGB differences, compresses and writes three
arrays and its progress markers. The ratio stage/bare is the stage's overhead (target >= 0.8). On a
GPU it also times the official-size f16 encoder (ImageNet VQGAN, 256 x 256 frames) in bf16. Figures
print last and go to bench/results/targets-<device>.json.

    python bench/targets.py [--clips 24] [--frames 16] [--size 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_file import save_results  # noqa: E402

os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

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
        # Alternate reference and stage and keep each one's best time: load bursts on a shared
        # machine then cannot favour whichever side ran first.
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare_encoder(model, batches, params.frames_per_batch)
            best["bare"] = min(best.get("bare", np.inf), time.perf_counter() - start)
            start = time.perf_counter()
            run(params, clips=work / "clips.zarr", tokenizer=work / "vqgan.pt", targets=work / "targets.zarr")
            best["stage"] = min(best.get("stage", np.inf), time.perf_counter() - start)
            shutil.rmtree(work / "targets.zarr")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    frames = args.clips * args.frames
    results = {"clips": args.clips, "frames": frames, "frame_size": args.size,
               "clips_per_batch": params.clips_per_batch, "writers": params.writers,
               "torch_threads": torch.get_num_threads(),
               "bare_encoder_fps": frames / best["bare"], "stage_fps": frames / best["stage"]}
    results["ratio_stage_vs_bare"] = results["stage_fps"] / results["bare_encoder_fps"]
    if torch.cuda.is_available():
        results["official_f16_encoder_256px_bf16_fps"] = official_encoder_bf16()
    name = save_results("targets", results, cuda=torch.cuda.is_available())
    print(f"targets benchmark on {name}: {args.clips} clips x {args.frames} frames of "
          f"{args.size}x{args.size}, tiny_f16 tokenizer, {params.clips_per_batch} clips per batch, "
          f"{params.writers} writers")
    for key, value in results.items():
        if key not in ("clips", "frames", "frame_size", "clips_per_batch", "writers"):
            print(f"  {key:<40}{value:10.2f}")


if __name__ == "__main__":
    main()
