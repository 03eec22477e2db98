"""Study (run by hand, not part of `make bench`): why MAM2's motion head does not beat predicting zero on
the demo, while its appearance head beats the most frequent code.

Reads the demo's decoded pre-training clips and the params of `pretrain` (as `dvc repro` left them) and
measures two things:

1. **Where zero's error lies.** The motion target is each masked tubelet's frame differences, normalised
   per tubelet and channel (std floored at `pretrain.motion_min_std`). Predicting zero scores the mean
   square of the normalised target; this splits that score by the tubelet's raw std in bands of x/255,
   so it shows how much of it sits in tubelets that barely change (codec noise, grain, a slow textured
   background) and is scaled up by the normalisation.
2. **Whether the target can even be memorised.** The demo's model (its own init and heads) trains on one
   fixed batch of `--clips` clips (8) and one fixed mask for `--steps` steps (AdamW, `--lr`, no weight
   decay): the code accuracy against the most frequent code's, and the motion MSE against zero's, every
   25 steps. A target that the model cannot fit on clips it has seen `--steps` times is not one it will
   predict on clips it has not seen; with one clip it shows whether the model can fit the target at all,
   and how long predicting zero holds it first.

Writes bench/results/motion_target_study-<device>.json; prints the figures last.

    python bench/motion_target_study.py [--params params.yaml] [--steps 300] [--clips 8] [--lr 1e-3]
                                        [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import print_figures, save_results  # noqa: E402
from models.pretrain_targets import motion_target  # noqa: E402
from pipeline.core.params import Paths, read_params_file, validate_section  # noqa: E402
from pipeline.data.pretrain_data import PretrainDataset  # noqa: E402
from pipeline.data.shared_batch import collate_shared  # noqa: E402
from stages import pretrain  # noqa: E402

BANDS = (0, 2, 4, 8, 16, 32, 256)  # tubelet std bands, in x/255


def error_by_band(dataset: PretrainDataset, params: pretrain.Params) -> dict:
    """Zero's MSE on the normalised motion target of every clip (augmentation seed 0), and its share per
    band of the tubelet's raw std (over its valid voxels and channels, in x/255)."""
    batch = collate_shared([dataset[(i, 0)] for i in range(len(dataset))])
    _, _, targets = pretrain.model_inputs(batch, motion=True)
    diff = targets["rgb_diff"]  # in [-1, 1]: the floor is in these units
    normalised, valid = motion_target(diff, params.tubelet_size, params.patch_size,
                                      min_std=params.motion_min_std)
    raw, _ = motion_target(diff, params.tubelet_size, params.patch_size, normalize=False)
    weight = valid.float()  # (N, L*C): the last frame's zero-padded slot does not count
    count = weight.sum(-1)  # (N,)
    squares = (normalised ** 2 * weight).sum(-1) / count  # (B, N) zero's MSE per tubelet
    mean = (raw * weight).sum(-1, keepdim=True) / count[:, None]
    std = (((raw - mean) ** 2 * weight).sum(-1) / (count - 1)).sqrt() * 255  # (B, N) raw std, x/255
    total = float(squares.sum())
    out = {"tubelets": int(squares.numel()), "zero_mse": float(squares.mean()),
           "floor_x255": params.motion_min_std * 255}
    for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
        inside = (std >= low) & (std < high)
        out[f"std_{low}_{high}_tubelet_share"] = float(inside.float().mean())
        out[f"std_{low}_{high}_zero_mse_share"] = float(squares[inside].sum()) / total
    return out


def memorise_one_batch(dataset: PretrainDataset, params: pretrain.Params, steps: int,
                       lr: float, clips: int = 8) -> list[dict]:
    """Code accuracy and motion MSE (with their baselines) while fitting one fixed batch."""
    torch.manual_seed(0)
    model = pretrain.build_model(params, dataset).train()
    batch = collate_shared([dataset[(i, 0)] for i in range(clips)])  # one batch, one mask, fixed
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve, started = [], time.perf_counter()
    for step in range(steps + 1):
        out = pretrain.mam2_loss(model, batch, motion=True)
        if step % 25 == 0:
            row = {"step": step, **{k: float(out[k].detach()) for k in (
                "appearance_acc", "appearance_acc_baseline", "loss_motion", "motion_mse_baseline")}}
            curve.append(row)
            print(f"step {step}: code accuracy {row['appearance_acc']:.3f} (most frequent "
                  f"{row['appearance_acc_baseline']:.3f}), motion MSE {row['loss_motion']:.4f} (zero "
                  f"{row['motion_mse_baseline']:.4f}); {time.perf_counter() - started:.0f} s", flush=True)
        if step < steps:
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", type=int, default=300, help="steps on the one batch")
    parser.add_argument("--clips", type=int, default=8, help="clips in the one batch")
    parser.add_argument("--tag", help="results go to motion_target_study-<tag>-<device>.json (another "
                        "data set, another batch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    doc = read_params_file(args.params)
    params, paths = validate_section(doc, "pretrain", pretrain.Params), validate_section(doc, "paths", Paths)
    if params.objective != "mam2":
        raise SystemExit(f"pretrain.objective is {params.objective}: the study needs mam2's two targets")
    dataset = PretrainDataset(paths.clips, paths.targets, pretrain.sampling_for(params))
    bands = error_by_band(dataset, params)
    curve = memorise_one_batch(dataset, params, args.steps, args.lr, args.clips)
    first, last = curve[0], curve[-1]
    figures = {
        **bands,
        "memorise_steps": args.steps,
        "memorise_code_acc_first": first["appearance_acc"], "memorise_code_acc_last": last["appearance_acc"],
        "memorise_code_acc_most_frequent": last["appearance_acc_baseline"],
        "memorise_motion_mse_first": first["loss_motion"], "memorise_motion_mse_last": last["loss_motion"],
        "memorise_motion_mse_zero": last["motion_mse_baseline"],
    }
    name = "motion_target_study" + (f"-{args.tag}" if args.tag else "")
    device = save_results(name, {"params": str(args.params), "clips": len(dataset),
                                 "memorise_clips": args.clips, "lr": args.lr, "figures": figures,
                                 "curve": curve})
    print(f"\nmotion_target_study ({device}, {len(dataset)} pre-training clips)")
    print_figures(figures, width=36)


if __name__ == "__main__":
    main()
