"""targets: precompute MAM2's two targets of every clip into `targets.zarr`, so pre-training never
runs the VQGAN or decodes video.

Inputs: `paths.clips` (clips.zarr) and the tokenizer stage's `artifacts/tokenizer/vqgan.pt`.
Output `targets.zarr` beside the clips store, one chunk per clip, Blosc (docs/design.md section 5):
`codes` (N, T, H/f, W/f) int16, the VQGAN codes of every frame; `codes_flipped` (same shape), the codes
of every horizontally mirrored frame `frame[:, ::-1]` (a mirrored frame's codes are not the mirrored
codes, so a loader that flips needs these); `rgb_diff` (N, T-1, H, W, 3) int16, exactly
`frame[t+1] - frame[t]` (Blosc-zstd level 1 with bit-shuffle: faster and smaller than the codes'
setting, bench/targets_codecs.py). Attrs: codebook_size, downsample, frame_size, num_frames, the
tokenizer's path and sha256, the clips path, `rows` (all, or pretraining: only the train-split and
unlabelled clips that pre-training reads were written) and how many clips were written. A few clips at
a time are read, encoded (on the GPU when there is one) and written, the reads and writes in worker
processes beside the encoder (pipeline/data/targets_io.py), so memory stays flat in N. The store is
built in its partial sibling with a done marker per batch: a killed run resumes, a finished one is
renamed into place; `--shard i/n` encodes every n-th batch into the shared partial store and the run
without `--shard` commits it (pipeline/core/shards.py).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from pydantic import Field

from models.vqgan import VQGAN, CheckpointError, load_vqgan
from pipeline.core import stage_cli
from pipeline.core.atomic import commit, partial_path
from pipeline.core.errors import StageError, require
from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.progress import progress_bar
from pipeline.core.shards import ProgressMarkers, Shard, finish_plan, plan_once
from pipeline.core.stores import compressor, difference_compressor, open_clips, train_rows
from pipeline.core.tensors import clip_to_tensor
from pipeline.data.targets_io import PREFETCH, TargetsIO

log = logging.getLogger(__name__)

MAX_CODES = 2**15 - 1  # int16 codes


class Params(StageParams):
    clips_per_batch: int = Field(4, ge=1, description="clips read, encoded and written together; "
                                 "memory grows with it, not with the number of clips")
    frames_per_batch: int = Field(64, ge=1, description="frames per encoder call (bounds activation memory)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when there is one")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast the encoder (GPU; "
                                               "codes may differ from fp32 where two codes nearly tie)")
    writers: int = Field(4, ge=1, description="batches compressed and written at once, in worker "
                         "processes beside the encoder (one more process reads the clips)")
    rows: Literal["all", "pretraining"] = Field("all", description="all: every clip; pretraining: only "
                                                "the clips pre-training reads (train split and unlabelled "
                                                "clips), the others left unwritten (codes -1, differences "
                                                "0): the held-out clips' targets are never read")


def run(params: Params, *, clips: Path, tokenizer: Path, targets: Path,
        shard: Shard | None = None) -> dict[str, Path]:
    """Write the codes and RGB differences of every clip in `clips` to the store `targets`.

    With `shard`, encode only that shard's batches into the shared partial store and return it; a
    later run without `shard` finds them done and commits the store.
    """
    store = open_clips(clips)
    frames = store["frames"]
    model = load_tokenizer(tokenizer)
    check_geometry(frames.shape, model, clips)
    device = pick_device(params.device)
    digest = file_digest(tokenizer)
    tmp = partial_path(targets)
    num_clips = frames.shape[0]
    rows = np.arange(num_clips) if params.rows == "all" else train_rows(store)
    batches = contiguous_batches(rows, params.clips_per_batch)
    attrs = {"rows": params.rows, "written_clips": len(rows),
             "codebook_size": model.codebook_size, "downsample": model.config.downsample_factor,
             "frame_size": int(frames.shape[2]), "num_frames": int(frames.shape[1]),
             "tokenizer": str(tokenizer), "tokenizer_sha256": digest, "clips": str(clips),
             "precision": params.precision, "rgb_diff": "frame[t+1] - frame[t], exact",
             "codes_flipped": "codes of frame[:, ::-1] (mirrored width), in the mirrored frame's layout"}
    signature = work_fingerprint(params, clips, frames.shape, digest)
    _, resumed = plan_once(tmp, signature, lambda store_dir: _plan(store_dir, frames.shape, attrs, signature))
    mine = batches if shard is None else shard.select(batches)
    markers = ProgressMarkers(tmp)
    todo = markers.pending(mine, key=lambda rows: rows.start)
    if resumed and len(todo) < len(mine):
        log.info("resuming: %d of %d batches already written", len(mine) - len(todo), len(mine))
    rate = write_targets(model, clips, frames.shape, tmp, todo, params, device)
    current_run().log_metrics({"data/targets_frames_per_s": rate, "data/clips": num_clips})
    if shard is not None:
        log.info("shard %s: %d of %d batches in %s", shard, len(mine), len(batches), tmp)
        return {"partial": tmp}
    if left := markers.pending(batches, key=lambda rows: rows.start):
        raise StageError(f"{tmp}: {len(left)} batches still missing after the run")  # defensive
    finish_plan(tmp)
    commit(tmp, targets)
    log.info("targets: %d of %d clips (%s) of %d frames -> %s (%d codes per frame, f=%d)", len(rows),
             num_clips, params.rows, frames.shape[1], targets, (frames.shape[2] // attrs["downsample"]) ** 2,
             attrs["downsample"])
    return {"targets": targets}


def run_from_paths(params: Params, paths: Paths, shard: Shard | None = None) -> dict[str, Path]:
    return run(params, clips=paths.clips, tokenizer=paths.artifacts_of("tokenizer") / "vqgan.pt",
               targets=paths.targets, shard=shard)


def contiguous_batches(rows: np.ndarray, size: int) -> list[range]:
    """Sorted `rows` as ranges of at most `size` consecutive rows (a batch never spans a gap)."""
    batches: list[range] = []
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
        batches += [range(int(run[i]), int(run[min(i + size, len(run)) - 1]) + 1)
                    for i in range(0, len(run), size)]
    return batches


def load_tokenizer(path: Path) -> VQGAN:
    """The tokenizer stage's VQGAN; a clear error when it is missing or unreadable."""
    require(path, "tokenizer", "tokenizer")
    try:
        return load_vqgan(path)
    except CheckpointError as err:
        raise StageError(f"tokenizer: {err}") from err


def check_geometry(shape: tuple[int, ...], model: VQGAN, clips: Path) -> None:
    """Whole code cells, at least two frames per clip, codes that fit int16."""
    _, num_frames, height, width = shape[:4]
    f = model.config.downsample_factor
    problems = []
    if height % f or width % f:
        problems.append(f"frames of {height}x{width} px are not a multiple of the tokenizer's "
                        f"down-sampling {f} (decode with decode.store_size a multiple of {f})")
    if num_frames < 2:
        problems.append(f"clips of {num_frames} frame have no RGB difference (decode.num_frames >= 2)")
    if model.codebook_size > MAX_CODES:
        problems.append(f"{model.codebook_size} codes do not fit int16")
    if problems:
        raise StageError(f"{clips}: " + "; ".join(problems))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("targets.device=cuda, but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


@torch.no_grad()
def encode_clips(model: VQGAN, clips: np.ndarray, *, device: torch.device, frames_per_batch: int,
                 precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(B, T, H, W, 3) uint8 -> codes of the frames and of the mirrored frames, each (B, T, h, w) int16."""
    video = clip_to_tensor(torch.from_numpy(clips).to(device)).mul_(2.0).sub_(1.0)  # VQGAN range [-1, 1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        codes = model.encode_video(video, frames_per_batch)
        flipped = model.encode_video(video.flip(-1), frames_per_batch)  # (B, C, T, H, W): -1 is width
    return codes.to(torch.int16).cpu().numpy(), flipped.to(torch.int16).cpu().numpy()


def write_targets(model: VQGAN, clips: Path, frames_shape: tuple[int, ...], store_dir: Path,
                  batches: list[range], params: Params, device: torch.device) -> float:
    """Encode and write `batches` of clips; returns frames/s. Worker processes read the next PREFETCH
    batches and write up to `params.writers` batches while the encoder runs (batches own disjoint
    chunks, so their writes are independent); the workers start before the model moves to `device`."""
    if not batches:
        return 0.0
    frames_per_clip = frames_shape[1]
    total = sum(len(rows) for rows in batches) * frames_per_clip
    with TargetsIO(clips, store_dir, frames_shape[1:], min(params.clips_per_batch, frames_shape[0]),
                   params.writers) as io, progress_bar("targets", unit="frame", total=total) as update:
        start = time.perf_counter()
        reading = deque(io.read(rows) for rows in batches[:PREFETCH])
        model = model.to(device).eval()
        writing: deque[Future] = deque()
        for i in range(len(batches)):
            batch = reading.popleft().result()
            codes, flipped = encode_clips(model, batch.frames, device=device,
                                          frames_per_batch=params.frames_per_batch,
                                          precision=params.precision)
            while len(writing) >= params.writers:
                update(writing.popleft().result())
            writing.append(io.write(batch, codes, flipped))
            if i + PREFETCH < len(batches):
                reading.append(io.read(batches[i + PREFETCH]))
        while writing:
            update(writing.popleft().result())
    return total / max(time.perf_counter() - start, 1e-9)


def create_targets_store(path: Path, frames_shape: tuple[int, ...], downsample: int,
                         attrs: dict) -> zarr.Group:
    """An empty targets store for clips of `frames_shape` (N, T, H, W, 3): one chunk per clip.

    Unwritten codes read -1, so a clip that was never encoded cannot pass for code 0.
    """
    n, t, h, w = frames_shape[:4]
    group = zarr.open_group(str(path), mode="a")
    grid = (h // downsample, w // downsample)
    for name in ("codes", "codes_flipped"):
        group.create_array(name, shape=(n, t, *grid), chunks=(1, t, *grid), dtype="int16",
                           compressors=compressor(), fill_value=-1)
    group.create_array("rgb_diff", shape=(n, t - 1, h, w, 3), chunks=(1, t - 1, h, w, 3), dtype="int16",
                       compressors=difference_compressor(), fill_value=0)
    group.attrs.update(attrs)
    return group


def _plan(store_dir: Path, frames_shape: tuple[int, ...], attrs: dict, signature: str) -> dict:
    create_targets_store(store_dir, frames_shape, attrs["downsample"], attrs)
    return {"signature": signature}


def work_fingerprint(params: Params, clips: Path, shape: tuple[int, ...], tokenizer_sha256: str) -> str:
    """Identifies the work: params (not the device or the writers, so shards may run on CPUs and GPUs
    alike), the tokenizer's bytes and the clips store (path, shape and when its metadata was written)."""
    stamps = [(p.name, p.stat().st_mtime_ns) for p in (Path(clips) / "zarr.json",
                                                      Path(clips) / "frames" / "zarr.json") if p.exists()]
    work = params.model_copy(update={"device": "auto", "writers": 1})
    return fingerprint(work, tokenizer_sha256, str(Path(clips).resolve()), list(shape), stamps)


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
