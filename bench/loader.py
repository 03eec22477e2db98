"""Benchmark: the pre-training loader over Zarr against a VideoMAE-style loader that decodes mp4s, and how
each scales with loader workers.

Both loaders serve the same clips (16 frames every 2nd frame of each video, at 128 px), with the same
f-aligned 112 px crops, flips and tube masks drawn from the same sample seeds, through the same
`DataLoader` with the same workers, batch sampler and collate function (`collate_shared`) as the pretrain
stage feeds its loss (frames and mask; the RGB differences are computed on the device from the frames in
both cases). The reference does what VideoMAE's dataset does every step: open the video with decord and
decode the clip's frames (resized by decord to 128 px, which is cheaper than decoding at full size and
resizing, so it favours the reference), then crop; it yields no codes (MAM2's reference computes them on
the GPU). The Zarr loader also reads the codes (or flipped codes) under the crop. Target ratio >= 5, and
workers at least as fast as in-process loading.

Each worker count is measured on its own loader, in steady state, as the stage runs (its workers are
persistent): the start-up (spawning the workers, each importing torch, and their first batches) is timed
apart, then `(prefetch + 1) x workers` batches drain whatever piled up while the slowest worker started,
and the rate is taken over the next `steps x workers` batches. Timing from the first batch instead puts
the other workers' start-up (seconds of imports per worker) inside a window of well under a second of
reading, which made workers look several times slower than in-process loading. The CPU time each clip
costs, in the training process and in the workers together, is printed beside the rates: on a busy
machine it is the steadier figure (the rates depend on what else runs).

Figures print last and go to bench/results/loader-<device>.json.

    python bench/loader.py [--videos 12] [--seconds 8] [--workers 0 1 2] [--steps 25] [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_file import save_results  # noqa: E402

os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

from models.masking import make_mask  # noqa: E402
from pipeline.core.stores import compressor  # noqa: E402
from pipeline.core.training import Dist, SeededBatchSampler, TrainParams  # noqa: E402
from pipeline.data.pretrain_data import PretrainDataset, Sampling, crop_pixels, draw_crop  # noqa: E402
from pipeline.data.shared_batch import collate_shared  # noqa: E402
from pipeline.data.video import center_crop, scaled_size, write_mp4  # noqa: E402
from stages.decode import Params as DecodeParams  # noqa: E402
from stages.decode import run as decode  # noqa: E402

F = 16  # tokenizer down-sampling of the demo VQGAN
SAMPLING = Sampling(num_frames=16, input_size=112, patch_size=16, tubelet_size=2)


def make_videos(root: Path, count: int, frames: int, height: int, width: int) -> None:
    """Real x264 mp4s of moving texture (one keyframe per 250 frames, as ffmpeg writes by default)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        texture = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        base = np.kron(texture, np.ones((8, 8, 1), np.uint8))[:height, :width]
        write_mp4(root / f"v{i:03d}.mp4", (np.roll(base, (t * 2, t * 3), axis=(0, 1)) for t in range(frames)),
                  fps=25, crf=23)


def make_targets(clips: Path, targets: Path, codebook: int = 512) -> None:
    """A targets store for the clips: random codes (their values do not change the reading cost) and
    the exact RGB differences."""
    frames = zarr.open_group(str(clips), mode="r")["frames"]
    n, t, s = frames.shape[:3]
    group = zarr.open_group(str(targets), mode="w")
    rng = np.random.default_rng(0)
    shapes = {"codes": (n, t, s // F, s // F), "codes_flipped": (n, t, s // F, s // F),
              "rgb_diff": (n, t - 1, s, s, 3)}
    arrays = {name: group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="int16",
                                       compressors=compressor()) for name, shape in shapes.items()}
    for row in range(n):
        clip = frames[row].astype(np.int16)
        arrays["rgb_diff"][row] = clip[1:] - clip[:-1]
        for name in ("codes", "codes_flipped"):
            arrays[name][row] = rng.integers(0, codebook, shapes[name][1:], dtype=np.int16)
    group.attrs.update({"codebook_size": codebook, "downsample": F, "frame_size": s, "tokenizer": "random",
                        "clips": str(clips)})


class DecodingDataset(torch.utils.data.Dataset):
    """VideoMAE-style: every sample opens its video with decord and decodes its clip's frames."""

    def __init__(self, clips: Path, sampling: Sampling, stride: int) -> None:
        store = zarr.open_group(str(clips), mode="r")
        self.paths = [str(p) for p in store["videos"][:]]
        self.video, self.start = store["video"][:], store["start"][:]
        self.stored_frames, self.size = store["frames"].shape[1], store["frames"].shape[2]
        self.sampling, self.stride = sampling, stride
        self.sizes = [self._scaled(path) for path in self.paths]  # VideoMAE's fixed new_width/new_height
        self.grid = ((sampling.num_frames // sampling.tubelet_size,)
                     + (sampling.input_size // sampling.patch_size,) * 2)

    def __len__(self) -> int:
        return len(self.video)

    def _scaled(self, path: str) -> tuple[int, int]:
        import decord

        height, width = decord.VideoReader(path, num_threads=1)[0].shape[:2]
        return scaled_size(width, height, self.size)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        import decord

        row, seed = key
        path, (w, h) = self.paths[self.video[row]], self.sizes[self.video[row]]
        reader = decord.VideoReader(path, width=w, height=h, num_threads=1)
        indices = [int(self.start[row]) + i * self.stride for i in range(self.stored_frames)]
        clip = center_crop(reader.get_batch(indices).asnumpy(), self.size)[None]  # (1, T, S, S, 3)
        rng = np.random.default_rng(seed)
        crop = draw_crop(rng, self.stored_frames, self.size, self.sampling, F)
        s = self.sampling
        frames = crop_pixels(clip, 0, crop, s.num_frames, s.input_size)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return {"frames": torch.from_numpy(frames),
                "mask": make_mask(s.mask_kind, 1, self.grid, s.mask_ratio, generator)[0]}


PREFETCH = 2  # the DataLoader's default prefetch_factor, which the stage keeps


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system) the processes `pids` have used so far; None where /proc cannot say."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def measure(dataset: torch.utils.data.Dataset, workers: int, steps: int, batch: int) -> dict[str, float]:
    """Steady-state clips/s of a loader with `workers` workers, its start-up seconds, and the CPU ms per
    clip of the training process and of the workers over the timed batches."""
    warm, timed = (PREFETCH + 1) * max(workers, 1), steps * max(workers, 1)
    params = TrainParams(steps=1 + warm + timed, batch_size=batch, workers=workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=SeededBatchSampler(len(dataset), params, Dist()), num_workers=workers,
        collate_fn=collate_shared, multiprocessing_context="spawn" if workers else None,
        prefetch_factor=PREFETCH if workers else None)
    begin = time.perf_counter()
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - begin
    for _ in range(warm):
        next(batches)
    pids = [child.pid for child in multiprocessing.active_children()] if workers else []
    worker_cpu, main_cpu, start = cpu_seconds(pids), time.process_time(), time.perf_counter()
    count = sum(len(next(batches)["frames"]) for _ in range(timed))
    seconds, main_cpu = time.perf_counter() - start, time.process_time() - main_cpu
    worker_end = cpu_seconds(pids)
    del batches  # stops the workers before the next measurement starts its own
    result = {"clips_per_s": count / seconds, "startup_s": startup,
              "main_cpu_ms_per_clip": main_cpu / count * 1e3}
    if worker_cpu is not None and worker_end is not None:
        result["worker_cpu_ms_per_clip"] = (worker_end - worker_cpu) / count * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each source video")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts to measure (the scaling curve), e.g. 0 1 2 4 8 16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="timed batches per worker (at least 25 in all)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        (work / "raw").mkdir()
        make_videos(work / "raw", args.videos, int(args.seconds * 25), args.height, args.width)
        params = DecodeParams(num_frames=16, stride=2, clips_per_video=4, store_size=128, workers=2,
                              val_fraction=0.0)
        decode(params, videos=work / "raw", clips=work / "clips.zarr", report=work / "decode.json")
        make_targets(work / "clips.zarr", work / "targets.zarr")
        zarr_set = PretrainDataset(work / "clips.zarr", work / "targets.zarr", SAMPLING)
        decoding_set = DecodingDataset(work / "clips.zarr", SAMPLING, params.stride)
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):  # alternate, keep each side's best: load bursts favour neither
            for workers in args.workers:
                for name, dataset in (("decord", decoding_set), ("zarr", zarr_set)):
                    run = measure(dataset, workers, args.steps, args.batch)
                    key = f"{name}_workers_{workers}"
                    if run["clips_per_s"] > best.get(key, {"clips_per_s": 0.0})["clips_per_s"]:
                        best[key] = run
        clips = len(zarr_set)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict = {"videos": args.videos, "clips": clips, "batch": args.batch, "cpus": os.cpu_count(),
                     "source": f"{args.width}x{args.height}, {args.seconds:g} s at 25 fps"}
    for key, run in best.items():
        name, workers = key.split("_workers_")
        results.update({f"{name}_{figure}_workers_{workers}": value for figure, value in run.items()})
    base = min(args.workers)
    for workers in args.workers:
        zarr_rate = results[f"zarr_clips_per_s_workers_{workers}"]
        decord_rate = results[f"decord_clips_per_s_workers_{workers}"]
        results[f"ratio_zarr_vs_decord_workers_{workers}"] = zarr_rate / decord_rate
        results[f"zarr_speedup_vs_workers_{base}_workers_{workers}"] = (
            zarr_rate / results[f"zarr_clips_per_s_workers_{base}"])
    device = save_results("loader", results)
    print(f"loader benchmark on {device}: {clips} clips of 16 x 112^2 from {args.videos} videos "
          f"({results['source']}), batch {args.batch}; steady state after start-up")
    print(f"  {'workers':>7} {'zarr clips/s':>13} {'decord clips/s':>15} {'zarr/decord':>12} "
          f"{'zarr vs ' + str(base):>10} {'zarr CPU ms/clip':>17} {'start-up s':>11}")
    for workers in args.workers:
        cpu = [results.get(f"zarr_{part}_cpu_ms_per_clip_workers_{workers}") for part in ("main", "worker")]
        cpu_text = f"{cpu[0]:.2f}" + (f" + {cpu[1]:.2f}" if cpu[1] is not None else "")
        print(f"  {workers:>7} {results[f'zarr_clips_per_s_workers_{workers}']:>13.1f} "
              f"{results[f'decord_clips_per_s_workers_{workers}']:>15.1f} "
              f"{results[f'ratio_zarr_vs_decord_workers_{workers}']:>12.2f} "
              f"{results[f'zarr_speedup_vs_workers_{base}_workers_{workers}']:>10.2f} {cpu_text:>17} "
              f"{results[f'zarr_startup_s_workers_{workers}']:>11.2f}")


if __name__ == "__main__":
    main()
