"""Benchmark: pre-training step throughput (clips/s) and model FLOPs utilisation (MFU).

A step is what the training loop does: forward (loss), backward, AdamW update, on a synthetic batch of
the real shapes (clip, codes, RGB differences, tube mask at 0.9). FLOPs of one forward + backward are
counted with `torch.utils.flop_counter.FlopCounterMode`; MFU = counted FLOPs x steps/s / peak FLOP/s.

- CPU: the CPU demo's model (params.yaml's pretrain section: a 4-block tiny encoder, small heads) at
  the demo batch, fp32. The peak is measured in the same run: the best FLOP/s of a large fp32 matmul.
- CUDA (when present): ViT-B/16 MAM2 on 16 x 224^2 clips (paper sizes: decoders 384/4/6, regressor 4,
  1024 codes) in bf16 autocast (+ torch.compile unless --no-compile) at the largest batch that fits,
  against an eager fp32 reference of the same model (TF32 off) at the largest batch that fits it (at
  most the bf16 batch). Peak: the device's dense bf16 spec where known, else a measured bf16 matmul.

Writes bench/results/pretrain_step-<device>.json; prints the figures last.

    python bench/pretrain_step.py [--steps 5] [--no-compile] [--cpu-only]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results_file import print_figures, save_results  # noqa: E402

os.environ.setdefault("MAM2_MLFLOW", "0")

from models.mam2 import MAM2, build_mam2  # noqa: E402
from models.masking import tube_mask  # noqa: E402
from models.video_vit import build_encoder  # noqa: E402
from pipeline.core.flops import training_step_flops  # noqa: E402
from pipeline.core.params import read_params_file, validate_section  # noqa: E402
from stages.pretrain import Params, encoder_config  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
BF16_PEAK = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12, "H100 PCIe": 756e12,
             "H100 NVL": 835e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}
BATCHES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def demo_params() -> Params:
    """params.yaml's pretrain section: the CPU demo's sizes."""
    return validate_section(read_params_file(REPO / "params.yaml"), "pretrain", Params)


def demo_model(codebook: int = 512, f: int = 16) -> MAM2:
    """The CPU demo's model, as params.yaml's pretrain section sizes it."""
    p = demo_params()
    return MAM2(build_encoder(**encoder_config(p)), p.objective, codebook_size=codebook, code_downsample=f,
                **p.heads(), layer_scale=p.layer_scale)


def synthetic_batch(model: MAM2, batch: int, frames: int, size: int, device: torch.device) -> tuple:
    """A clip in [0, 1], random codes, its frame differences and a 0.9 tube mask, on `device`."""
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(batch, 3, frames, size, size, generator=g)
    s = size // model.code_downsample
    targets = {"codes": torch.randint(0, model.codebook_size, (batch, frames, s, s), generator=g),
               "rgb_diff": clip[:, :, 1:] - clip[:, :, :-1]}
    mask = tube_mask(batch, model.encoder.grid, 0.9, generator=g)
    return clip.to(device), mask.to(device), {k: v.to(device) for k, v in targets.items()}


def make_step(model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device):
    """One training step (forward, backward, AdamW) as a closure over its optimiser."""
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=fused)

    def step(clip, mask, targets) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(clip, mask, targets)["loss"]
        loss.backward()
        optimizer.step()

    return step


def count_flops(model: MAM2, inputs: tuple, dtype: torch.dtype | None, device: torch.device) -> float:
    """FLOPs of one forward + backward pass."""
    return training_step_flops(lambda: model(*inputs), model, dtype, device.type)


def time_steps(step, inputs: tuple, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds per step: the best of `steps` timed steps after `warmup`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(*inputs)
    sync()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step(*inputs)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul: the achievable peak of this device and dtype."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(model: MAM2, batch: int, frames: int, size: int, dtype: torch.dtype | None, device: torch.device,
            steps: int, peak: float, compile_model: bool = False) -> dict:
    """Clips/s, FLOPs per clip and MFU of training steps at `batch`."""
    inputs = synthetic_batch(model, batch, frames, size, device)
    flops = count_flops(model, inputs, dtype, device)  # counted on the eager model
    runner = model
    if compile_model:
        runner = torch.compile(model)
    seconds = time_steps(make_step(runner, dtype, device), inputs, steps, device)
    result = {"batch": batch, "dtype": str(dtype or torch.float32).removeprefix("torch."),
              "compiled": compile_model, "step_s": seconds, "clips_per_s": batch / seconds,
              "gflops_per_clip": flops / batch / 1e9, "achieved_tflops": flops / seconds / 1e12,
              "mfu": flops / seconds / peak}
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def cpu_figures(steps: int) -> dict:
    """The demo model on CPU at the demo batch, fp32, against a measured fp32 matmul peak."""
    torch.manual_seed(0)
    p = demo_params()
    peak = matmul_flops(torch.device("cpu"), torch.float32, 2048)
    run = measure(demo_model(), p.train.batch_size, p.num_frames, p.input_size, None, torch.device("cpu"),
                  steps, peak)
    return {"cpu_threads": torch.get_num_threads(), "cpu_matmul_peak_tflops": peak / 1e12,
            "cpu_demo": {"model": f"{p.model} depth {p.depth}, {p.num_frames}x{p.input_size}^2", **run}}


def fits(make, batch: int, frames: int, size: int, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether two training steps at `batch` run without running out of GPU memory."""
    try:
        model = make()
        inputs = synthetic_batch(model, batch, frames, size, device)
        step = make_step(model, dtype, device)
        step(*inputs)
        step(*inputs)
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def largest_batch(make, frames: int, size: int, dtype: torch.dtype | None, device: torch.device,
                  cap: int | None = None) -> int:
    """The largest of BATCHES (up to `cap`) that fits; tries them in increasing order."""
    best = 0
    for batch in (b for b in BATCHES if cap is None or b <= cap):
        ok = fits(make, batch, frames, size, dtype, device)
        gc.collect()  # the failed attempt's tensors go with its frame; release them before the next
        torch.cuda.empty_cache()
        if not ok:
            break
        best = batch
    if not best:
        raise RuntimeError(f"not even batch {BATCHES[0]} fits in GPU memory")
    return best


def cuda_figures(steps: int, compile_model: bool) -> dict:
    """ViT-B/16 MAM2 at 16 x 224^2: bf16 at its largest batch against eager fp32 at its own."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference means fp32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device)
    measured = matmul_flops(device, torch.bfloat16, 8192)
    spec = next((v for k, v in BF16_PEAK.items() if k in name), None)
    peak = spec or measured

    def make() -> MAM2:
        torch.manual_seed(0)
        return build_mam2("base", img_size=224, num_frames=16, codebook_size=1024).to(device)

    figures: dict = {"gpu": name, "bf16_peak_tflops": peak / 1e12,
                     "peak_source": "spec" if spec else "measured", "bf16_matmul_tflops": measured / 1e12}
    bf16_batch = largest_batch(make, 16, 224, torch.bfloat16, device)
    fp32_batch = largest_batch(make, 16, 224, None, device, cap=bf16_batch)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        figures["vit_b_bf16"] = measure(make(), bf16_batch, 16, 224, torch.bfloat16, device, steps, peak,
                                        compile_model)
    except Exception as err:  # a compile failure should not cost the eager figures
        if not compile_model:
            raise
        figures["compile_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        torch.cuda.empty_cache()
        figures["vit_b_bf16"] = measure(make(), bf16_batch, 16, 224, torch.bfloat16, device, steps, peak)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    figures["vit_b_fp32_eager"] = measure(make(), fp32_batch, 16, 224, None, device, steps, peak)
    figures["speedup_bf16_vs_fp32"] = (figures["vit_b_bf16"]["clips_per_s"]
                                       / figures["vit_b_fp32_eager"]["clips_per_s"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (best is kept)")
    parser.add_argument("--no-compile", action="store_true", help="bf16 run without torch.compile")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA figures")
    args = parser.parse_args()
    results = {"torch": torch.__version__, **cpu_figures(args.steps)}
    cuda = torch.cuda.is_available() and not args.cpu_only
    if cuda:
        results.update(cuda_figures(args.steps, not args.no_compile))
    device = save_results("pretrain_step", results, cuda=cuda)
    print(f"pretrain step benchmark on {device} (torch {torch.__version__})")
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            print_figures(value, indent=4, width=22)
        elif isinstance(value, float):
            print(f"  {key:<24}{value:12.4g}")
        else:
            print(f"  {key:<24}{value!s:>12}")


if __name__ == "__main__":
    main()
