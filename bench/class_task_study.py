"""Study (run by hand, not part of `make bench`): can the demo's motion classes be learnt from pixels
at the demo's scale, from scratch?

Renders `--per-class` training clips and `--val-per-class` validation clips of every motion class in
memory, in the demo's class style (`pipeline.data.synthetic.CLASS_STYLE`, 128 px rendered, area-resized
to 64 px, 8 frames 4 rendered frames apart: what the demo's fine-tune sees after decode's stride 2 and its
frame_step 2), trains the demo's classifier (a 4-block ViT-T/16 from scratch, ImageNet-normalised
inputs, mean pooling + fc_norm) with AdamW and a one-cycle schedule, and prints the training loss and
the validation top-1 with its 95% Wilson interval every `--eval-every` steps. No augmentation by
default: the question is whether the motion is learnt before the clips are memorised.

`--mixed-contrast` renders the demo's former style, in which object and background brightness are both
drawn from the full range, so a clip's contrast polarity is random: there the clips are memorised and
validation stays at chance, while the current style (objects lit over a background in shadow) is learnt.
Two older probes of the former style: `--simple` renders the easiest version of the task (one
smooth-textured object, no grain, a static background), and `--symmetries` adds the augmentations that
map a class onto another exactly (time reversal swaps every class with its opposite, a horizontal flip
swaps left/right and the rotations, a vertical flip up/down and the rotations; each with probability
0.5, the label swapped with it), under which a clip's appearance says nothing about its label.

Writes bench/results/class_task_study[_mixed_contrast][_simple][_symmetries]-<device>.json; prints the
figures last.

    python bench/class_task_study.py [--per-class 32] [--val-per-class 8] [--steps 1200] [--threads 2]
                                     [--mixed-contrast] [--simple] [--symmetries]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import save_results  # noqa: E402
from models.classifier import VideoClassifier  # noqa: E402
from models.video_vit import build_encoder  # noqa: E402
from pipeline.classify.evaluate import wilson_interval  # noqa: E402
from pipeline.data.synthetic import (  # noqa: E402
    CLASS_STYLE,
    CLASS_STYLES,
    MOTION_CLASSES,
    SceneStyle,
    render_class_clip,
)

RENDERED, INPUT, FRAMES, STEP = 128, 64, 8, 4
SIMPLE_STYLE = dataclasses.replace(CLASS_STYLES["random"], textures=("noise",), num_objects=(1, 1),
                                   object_size=(0.25, 0.3), background_speed=0.0, grain=0.0)
# the class each symmetry maps a class to (MOTION_CLASSES order: left, right, up, down, cw, ccw, in,
# out), and the clip axis it flips (C, T, H, W)
SYMMETRIES = {"time reversal": ([1, 0, 3, 2, 5, 4, 7, 6], 1),
              "horizontal flip": ([1, 0, 2, 3, 5, 4, 6, 7], 3),
              "vertical flip": ([0, 1, 3, 2, 5, 4, 6, 7], 2)}


def render(seed: int, cls: int, index: int, style: SceneStyle = CLASS_STYLE) -> np.ndarray:
    """One clip (3, FRAMES, INPUT, INPUT) float32 in [0, 1]."""
    frames = render_class_clip(MOTION_CLASSES[cls], size=(RENDERED, RENDERED),
                               num_frames=(FRAMES - 1) * STEP + 1,
                               rng=np.random.default_rng([seed, cls, index]), style=style)[::STEP]
    x = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 255
    return F.interpolate(x, size=(INPUT, INPUT), mode="area").numpy()


def dataset(seed: int, first: int, count: int, style: SceneStyle = CLASS_STYLE
            ) -> tuple[torch.Tensor, torch.Tensor]:
    jobs = [(cls, first + i) for cls in range(len(MOTION_CLASSES)) for i in range(count)]
    clips = np.stack([render(seed, cls, index, style) for cls, index in jobs])
    return torch.from_numpy(clips), torch.tensor([cls for cls, _ in jobs])


def apply_symmetries(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each symmetry on a random half of the batch (B, C, T, H, W), labels mapped with it."""
    x, y = x.clone(), y.clone()
    for mapping, axis in SYMMETRIES.values():
        chosen = torch.rand(len(x), generator=generator) < 0.5
        x[chosen] = x[chosen].flip(axis + 1)
        y[chosen] = torch.tensor(mapping)[y[chosen]]
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=32, help="training clips per class")
    parser.add_argument("--val-per-class", type=int, default=8, help="validation clips per class")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mixed-contrast", action="store_true",
                        help="the former demo style: contrast polarity drawn at random")
    parser.add_argument("--simple", action="store_true", help="the easiest version of the former style")
    parser.add_argument("--symmetries", action="store_true", help="label-swapping flips and reversal")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tick = time.perf_counter()
    style = SIMPLE_STYLE if args.simple else CLASS_STYLES["random" if args.mixed_contrast else "fixed"]
    x_train, y_train = dataset(args.seed, 0, args.per_class, style)
    x_val, y_val = dataset(args.seed, args.per_class, args.val_per_class, style)
    render_s = time.perf_counter() - tick
    torch.manual_seed(args.seed)
    model = VideoClassifier(build_encoder("tiny", depth=4, img_size=INPUT, num_frames=FRAMES),
                            len(MOTION_CLASSES), input_norm="imagenet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    rows, tick, generator = [], time.perf_counter(), torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(x_train), (args.batch,))
        x, y = x_train[batch], y_train[batch]
        if args.symmetries:
            x, y = apply_symmetries(x, y, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                right = int((model(x_val).argmax(1) == y_val).sum())
            model.train()
            low, high = wilson_interval(right, len(y_val))
            rows.append({"step": step, "train_loss": loss.item(), "val_top1": right / len(y_val),
                         "val_ci95": [low, high], "seconds": time.perf_counter() - tick})
            print(f"step {step}: train loss {loss.item():.3f}, val top-1 {right / len(y_val):.3f} "
                  f"({low:.2f}-{high:.2f}), {time.perf_counter() - tick:.0f} s", flush=True)
    flags = ("mixed_contrast", "simple", "symmetries")
    variant = "".join(f"_{flag}" for flag in flags if getattr(args, flag))
    path = save_results(f"class_task_study{variant}", {
        "per_class": args.per_class, "val_per_class": args.val_per_class, "steps": args.steps,
        "mixed_contrast": args.mixed_contrast, "simple": args.simple, "symmetries": args.symmetries,
        "batch": args.batch, "lr": args.lr, "render_seconds": render_s, "curve": rows})
    best = max(rows, key=lambda row: row["val_top1"])
    chance = 1 / len(MOTION_CLASSES)
    print(f"\n{path}\ntrain clips {len(y_train)}, val clips {len(y_val)}; chance {chance:.3f}\n"
          f"final: train loss {rows[-1]['train_loss']:.3f}, val top-1 {rows[-1]['val_top1']:.3f}; "
          f"best val top-1 {best['val_top1']:.3f} at step {best['step']}")


if __name__ == "__main__":
    main()
