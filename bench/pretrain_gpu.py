"""GPU-scale run of the real stages: targets then pretrain with ViT-B on 16 x 224^2 clips, against the bare
step.

A clips store of rendered clips (16 frames of 224 x 224) and a tiny_f16 tokenizer are made in a scratch
directory; the targets stage encodes them on the GPU, then the pretrain stage trains MAM2 with a ViT-B/16
encoder and the paper's heads (decoders 384 wide, 4 blocks, 6 heads; regressor 4 blocks) through the
shared training loop: bf16 autocast, data-loader workers, checkpoints, resume state. The reference in
the same run is the bare training step of the same model on a batch already on the GPU
(`bench/pretrain_step.py`'s step): the ratio stage/bare is what the loader and the loop cost. The run
also checks what a smoke run must show: the loss falls and the stage writes its artifacts.

Writes bench/results/pretrain_gpu-<device>.json; prints the figures last. Needs CUDA.

    python bench/pretrain_gpu.py [--clips 64] [--steps 40] [--batch 16] [--workers 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAM2_MLFLOW", "0")
os.environ.setdefault("MAM2_PROGRESS", "0")

import torch  # noqa: E402

from bench.pretrain_step import make_step, synthetic_batch, time_steps  # noqa: E402
from bench.results_file import print_figures, save_results  # noqa: E402
from bench.targets import make_clips, make_tokenizer  # noqa: E402
from models.mam2 import MAM2  # noqa: E402
from models.video_vit import build_encoder  # noqa: E402
from stages import pretrain, targets  # noqa: E402

FRAMES, SIZE = 16, 224


def stage_params(steps: int, batch: int, workers: int, compile_model: bool) -> pretrain.Params:
    return pretrain.Params(
        model="base", num_frames=FRAMES, input_size=SIZE, sample_clips=2,
        train={"steps": steps, "batch_size": batch, "base_lr": 1.5e-4, "warmup_steps": steps // 4,
               "workers": workers, "compile": compile_model, "checkpoint_every": steps,
               "log_every": 1, "system_metrics_every": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (both sides)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/pretrain_gpu.py: skipped, it needs CUDA (ViT-B on 16 x 224^2 clips)")
        return
    device = torch.device("cuda")
    params = stage_params(args.steps, args.batch, args.workers, args.compile)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-gpu-") as scratch:
        work = Path(scratch)
        start = time.perf_counter()
        clips = make_clips(work / "clips.zarr", args.clips, FRAMES, SIZE)
        codebook = make_tokenizer(work / "vqgan.pt", clips).codebook_size
        render_s = time.perf_counter() - start
        start = time.perf_counter()
        targets.run(targets.Params(device="cuda"), clips=work / "clips.zarr", tokenizer=work / "vqgan.pt",
                    targets=work / "targets.zarr")
        targets_s = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        # the loop's own per-log throughput (history.csv leaves machine figures to MLflow)
        table: list[dict] = []
        train = pretrain.train

        def keep_history(*args, **kwargs):
            result = train(*args, **kwargs)
            table.extend(result.history)
            return result

        pretrain.train = keep_history
        pretrain.run(params, clips=work / "clips.zarr", targets=work / "targets.zarr",
                     tokenizer=work / "vqgan.pt", artifacts=work / "artifacts", run_dir=work / "run",
                     metrics=work / "metrics.json", reports=work / "reports")
        pretrain.train = train
        pretrain_s = time.perf_counter() - start
        stage_memory = torch.cuda.max_memory_allocated(device) / 2**30
        summary = json.loads((work / "metrics.json").read_text())
        written = sorted(p.name for p in (work / "artifacts").iterdir())
        # The stage's steady throughput: the median over the second half of the steps (after compile/warm-up).
        rates = sorted(r["clips_per_s"] for r in table[len(table) // 2:])
        stage_rate = rates[len(rates) // 2]
    torch.manual_seed(0)
    model = MAM2(build_encoder(**pretrain.encoder_config(params)), params.objective, codebook_size=codebook,
                 code_downsample=16, **params.heads(),
                 layer_scale=params.layer_scale).to(device)
    runner = torch.compile(model) if args.compile else model
    bare_s = time_steps(make_step(runner, torch.bfloat16, device),
                        synthetic_batch(model, args.batch, FRAMES, SIZE, device), 5, device)
    results = {
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "clips": args.clips,
        "frames": FRAMES, "size": SIZE, "batch": args.batch, "steps": args.steps, "workers": args.workers,
        "compiled": args.compile, "render_s": round(render_s, 1), "targets_stage_s": round(targets_s, 1),
        "pretrain_stage_s": round(pretrain_s, 1), "first_loss": table[0]["loss"],
        "last_loss": summary["loss"], "loss_fell": summary["loss"] < table[0]["loss"], "artifacts": written,
        "stage_max_memory_gb": round(stage_memory, 2), "stage_clips_per_s": stage_rate,
        "bare_step_clips_per_s": args.batch / bare_s, "ratio_stage_vs_bare": stage_rate * bare_s / args.batch,
    }
    name = save_results("pretrain_gpu", results, cuda=True)
    print(f"pretrain at GPU scale on {name}: ViT-B/16 MAM2, {FRAMES} x {SIZE}^2, batch {args.batch}, "
          f"{args.steps} steps")
    print_figures(results, width=26)


if __name__ == "__main__":
    main()
