"""Ship a model a recipe run trained: copy it into checkpoints/ with its provenance JSON.

    python recipes/ship.py flow      --seconds WALL [--run runs/recipes/motion_pretrain]
    python recipes/ship.py tracker   --seconds WALL [--run runs/recipes/tracker]
    python recipes/ship.py tokenizer --seconds WALL [--run runs/recipes/tokenizer]
    python recipes/ship.py tokenizer --seconds WALL --first-leg recipes/tokenizer.yaml \
        --first-leg recipes/tokenizer_continue.yaml --recipe recipes/tokenizer_polarity.yaml

Each writes `checkpoints/<name>.json`: the command and recipe, the commit, the steps, the device, the
wall time, the scores the stage measured (motion_gt for the motion models; for the tokenizer its run's
own check, and the demo's held-out videos, which the recipe must not have trained on) beside their
trivial baselines, the same scores on held-out clips of the pre-training style (the domain gap), and a
quick check on a few clips rendered from seeds that `tests/test_checkpoints.py` recomputes from the
shipped file. `--recipe` ships another recipe's run (its
run folder is the parent of its `paths.metrics`); `--first-leg` names a recipe whose model that one
continued from (`init_checkpoint`; repeated for a chain, in order), so the provenance lists every leg,
its command and its steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models.flow_io import load_flow_model  # noqa: E402
from models.tracker import load_tracker  # noqa: E402
from models.vqgan import load_vqgan  # noqa: E402
from pipeline.core.params import read_params_file, validate_section  # noqa: E402
from pipeline.core.stores import open_clips  # noqa: E402
from pipeline.data.frames_dataset import split_rows  # noqa: E402
from pipeline.data.synthetic import MOTION_CLASSES, PRETRAIN_STYLE, render_class_clip, render_motion_clip  # noqa: E402
from pipeline.motion.evaluate import (  # noqa: E402
    evaluate_flow_clip,
    evaluate_tracker_clip,
    evenly_spaced,
    flow_metrics,
    mean_over_videos,
    tapvid_metrics,
)
from stages import demo_data  # noqa: E402
from stages.tokenizer import Params as TokenizerParams  # noqa: E402
from stages.tokenizer import evaluate as evaluate_tokenizer  # noqa: E402
from stages.tokenizer import evaluation_frames  # noqa: E402

CHECK_CLIPS, CHECK_PAIRS = 2, 4
GAP_CLIPS, GAP_FRAMES, GAP_SEED = 8, 24, 2**40  # pre-training-style clips no training run draws


def _demo_params() -> demo_data.Params:
    return validate_section(read_params_file(REPO / "params.yaml"), "demo_data", demo_data.Params)


# ----------------------------------------------------------------------------------- flow


def flow_check(model: torch.nn.Module, updates: int) -> dict[str, float]:
    """EPE on the first motion_gt clips (rendered as demo_data renders them), next to zero motion's."""
    params = _demo_params()
    rows, zero = [], []
    for index in range(CHECK_CLIPS):
        clip = demo_data.motion_gt_clip(params, index)
        pairs = evenly_spaced(len(clip.flow), CHECK_PAIRS)
        rows.append(evaluate_flow_clip(model, clip.frames, clip.flow, updates, pairs=pairs)[0]["epe"])
        target = torch.from_numpy(clip.flow[pairs]).permute(0, 3, 1, 2)
        zero.append(flow_metrics(torch.zeros_like(target), target)["epe"])
    return {"clips": CHECK_CLIPS, "pairs_per_clip": CHECK_PAIRS, "flow_updates": updates,
            "epe": float(np.mean(rows)), "epe_zero_motion": float(np.mean(zero))}


def gap_clip(index: int, size: int):
    """Held-out clip `index` in the pre-training style (exact flow and tracks)."""
    return render_motion_clip(size=(size, size), num_frames=GAP_FRAMES, num_points=64,
                              rng=np.random.default_rng(GAP_SEED + index), style=PRETRAIN_STYLE)


def flow_gap(model: torch.nn.Module, updates: int, size: int) -> dict[str, float]:
    """Flow scores on held-out pre-training-style clips (every pair), and zero motion's."""
    rows, zero = [], []
    for index in range(GAP_CLIPS):
        clip = gap_clip(index, size)
        rows.append(evaluate_flow_clip(model, clip.frames, clip.flow, updates)[0])
        target = torch.from_numpy(clip.flow).permute(0, 3, 1, 2)
        zero.append(flow_metrics(torch.zeros_like(target), target))
    scores = mean_over_videos(rows)
    return {"clips": GAP_CLIPS, "frames": GAP_FRAMES, "flow_updates": updates, "epe": scores["epe"],
            "acc_1px": scores["acc_1px"], "epe_zero_motion": mean_over_videos(zero)["epe"]}


# ------------------------------------------------------------------------------- tracker


def tracker_scores(model: torch.nn.Module, clips: list, iters: int) -> dict[str, float]:
    """delta_avg / AJ ("first" queries) over clips with exact tracks, and zero motion's delta_avg."""
    rows, zero = [], []
    for clip in clips:
        scores, (queries, _, _) = evaluate_tracker_clip(model, clip.frames, clip.tracks, clip.visible,
                                                        "first", iters)
        points = np.flatnonzero(clip.visible.any(0))
        gt, vis = clip.tracks[:, points], clip.visible[:, points]
        still = np.broadcast_to(gt[queries, np.arange(len(points))][None], gt.shape)
        rows.append(scores)
        zero.append(tapvid_metrics(queries, gt, vis, still, np.ones_like(vis), "first",
                                   clip.frames.shape[1:3]))
    scores = mean_over_videos(rows)
    return {"clips": len(clips), "tracker_iters": iters, "delta_avg": scores["delta_avg"],
            "average_jaccard": scores["average_jaccard"],
            "delta_avg_zero_motion": mean_over_videos(zero)["delta_avg"]}


def tracker_check(model: torch.nn.Module, iters: int) -> dict[str, float]:
    params = _demo_params()
    return tracker_scores(model, [demo_data.motion_gt_clip(params, i) for i in range(CHECK_CLIPS)], iters)


def tracker_gap(model: torch.nn.Module, iters: int, size: int) -> dict[str, float]:
    return tracker_scores(model, [gap_clip(i, size) for i in range(GAP_CLIPS)], iters)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_frames(count: int, seed: int) -> np.ndarray:
    """`count` frames of demo-style class clips (one per clip), rendered from `seed`."""
    params = _demo_params()
    frames = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        clip = render_class_clip(MOTION_CLASSES[i % len(MOTION_CLASSES)], size=(params.size, params.size),
                                 num_frames=8, rng=rng)
        frames.append(clip[i % 8])
    return np.stack(frames)


def tokenizer_held_out(model: torch.nn.Module, recipe_clips: str | None) -> dict:
    """Scores on the demo's held-out videos (data/clips.zarr's val split), as the tokenizer stage
    scores a loaded checkpoint, after checking the recipe trained on none of those videos."""
    store = open_clips(REPO / "data" / "clips.zarr")
    _, val_rows = split_rows(store, 0.0)
    if not len(val_rows):
        raise SystemExit("data/clips.zarr has no val split: run `dvc repro decode` first")
    if recipe_clips:
        recipe_store = open_clips(REPO / recipe_clips)
        train_rows, _ = split_rows(recipe_store, TokenizerParams().val_fraction)
        trained, held_out = videos_of(recipe_store, train_rows), videos_of(store, val_rows)
        if trained & held_out:
            raise SystemExit(f"the recipe trained on {len(trained & held_out)} of the demo's held-out videos")
    frames = evaluation_frames(store, TokenizerParams(), model, where=REPO / "data" / "clips.zarr")
    scores, _ = evaluate_tokenizer(model, frames, batch=32)
    return {**scores, "videos": "data/clips.zarr val split (the demo's held-out videos)"}


def videos_of(store, rows: np.ndarray) -> set[str]:
    """The source video paths of a clips store's `rows`."""
    return {str(store["videos"][v]) for v in np.unique(store["video"][:][rows])}


def tokenizer_check(model: torch.nn.Module) -> dict[str, float]:
    """Reconstruction PSNR on 16 freshly rendered demo-style frames, next to their mean frame's."""
    scores, _ = evaluate_tokenizer(model, tokenizer_frames(16, seed=2**40), batch=16)
    return {"frames": 16, "psnr": scores["psnr"], "baseline_psnr": scores["baseline_psnr"]}


# ------------------------------------------------------------------------------ shipping


@dataclass(frozen=True)
class Shippable:
    stage: str  # the stage whose recipe trains it
    artifact: str  # its file under the run's artifacts/<stage>/
    description: str
    run: str  # the recipe's run folder
    recipe: str
    load: Callable[[Path], torch.nn.Module]
    scores: Callable[[dict], dict]  # from the stage's metrics file
    extra: Callable[[torch.nn.Module, dict], dict]  # (model, recipe doc): check, domain gap, held-out


def _section(recipe: dict, stage: str) -> dict:
    return recipe.get(stage) or {}


def _updates(recipe: dict, key: str, default: int) -> int:
    return int(_section(recipe, "motion_pretrain").get(key, default))


def _clips(recipe: dict) -> str | None:
    """The clips store a recipe trains on, when it names one."""
    return (recipe.get("paths") or {}).get("clips")


SHIPPABLE = {
    "flow": Shippable(
        "motion_pretrain", "flow.pt", "torchvision raft_small, trained from scratch by motion_pretrain",
        "runs/recipes/motion_pretrain", "recipes/motion_pretrain.yaml",
        lambda path: load_flow_model(path).eval(),
        lambda metrics: {"motion_gt": {k: v for k, v in metrics.items() if k.startswith("flow_")}},
        lambda model, recipe: {
            "check": flow_check(model, _updates(recipe, "eval_flow_updates", 8)),
            "pretraining_style": flow_gap(model, _updates(recipe, "eval_flow_updates", 8), 128)}),
    "tracker": Shippable(
        "motion_pretrain", "tracker.pt", "PIPs v1 architecture (scaled default config), trained from "
        "scratch by motion_pretrain", "runs/recipes/tracker", "recipes/tracker.yaml",
        lambda path: load_tracker(path).eval(),
        lambda metrics: {"motion_gt": {k: v for k, v in metrics.items() if k.startswith("track_")}},
        lambda model, recipe: {
            "check": tracker_check(model, _updates(recipe, "eval_tracker_iters", 6)),
            "pretraining_style": tracker_gap(model, _updates(recipe, "eval_tracker_iters", 6), 128)}),
    "tokenizer": Shippable(
        "tokenizer", "vqgan.pt", "VQGAN (taming architecture, tiny_f16 preset), trained by the tokenizer "
        "stage on 512 rendered videos of the demo's former style (random contrast polarity), then on 512 of "
        "its current style (objects lit over a background in shadow; demo_data seed 1 both), none of them "
        "the demo's",
        "runs/recipes/tokenizer", "recipes/tokenizer.yaml",
        lambda path: load_vqgan(path).eval(),
        lambda metrics: {"recipe_val": metrics},
        lambda model, recipe: {"held_out_demo_frames": tokenizer_held_out(model, _clips(recipe)),
                               "check": tokenizer_check(model)}),
}


def _train_steps(section: dict, model: str) -> int | None:
    train = section.get("train") or section.get("tracker_train" if model == "tracker" else "flow_train")
    return (train or {}).get("steps")


def run_folder(recipe: dict) -> Path:
    """The run folder a recipe writes: the parent of its `paths.metrics`."""
    metrics = (recipe.get("paths") or {}).get("metrics")
    if not metrics:
        raise SystemExit("the recipe names no paths.metrics; give --run")
    return Path(metrics).parent


def half_precision(obj):
    """`obj` with every fp32 tensor stored as fp16 (nested dicts and lists kept)."""
    if torch.is_tensor(obj):
        return obj.half() if obj.dtype == torch.float32 else obj
    if isinstance(obj, dict):
        return {k: half_precision(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(half_precision(v) for v in obj)
    return obj


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", choices=sorted(SHIPPABLE))
    parser.add_argument("--run", type=Path, help="the recipe's run folder (default: the recipe's)")
    parser.add_argument("--recipe", type=Path, help="the recipe that trained it (default: the model's)")
    parser.add_argument("--first-leg", type=Path, action="append", default=[],
                        help="a recipe whose model --recipe continued from (repeat for a chain, in order)")
    parser.add_argument("--seconds", type=float, required=True, help="wall time of the recipe run(s)")
    parser.add_argument("--device", help="what trained it (default: this machine's CPU)")
    args = parser.parse_args()
    spec = SHIPPABLE[args.model]
    recipe_path = (args.recipe or Path(spec.recipe)).as_posix()
    recipe = read_params_file(REPO / recipe_path)
    section = _section(recipe, spec.stage)
    run = REPO / (args.run or (run_folder(recipe) if args.recipe else spec.run))
    metrics = json.loads((run / "metrics" / f"{spec.stage}.json").read_text())
    out = REPO / "checkpoints"
    out.mkdir(exist_ok=True)
    target = out / spec.artifact
    shutil.copyfile(run / "artifacts" / spec.stage / spec.artifact, target)
    storage = "fp32"
    if target.stat().st_size > 8 * 2**20:  # fp16 storage; loading casts back to the model's fp32
        torch.save(half_precision(torch.load(target, map_location="cpu", weights_only=True)), target)
        storage = "fp16"
    if target.stat().st_size > 8 * 2**20:
        raise SystemExit(f"{target} is {target.stat().st_size / 2**20:.1f} MB; shipped models stay <= 8 MB")
    model = spec.load(target)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    recipes = [(leg.as_posix(), _section(read_params_file(REPO / leg), spec.stage)) for leg in args.first_leg]
    recipes.append((recipe_path, section))
    legs = [{"command": f"mam2 {spec.stage} --params {path}", "recipe": leg,
             "steps": _train_steps(leg, args.model)} for path, leg in recipes]
    provenance = {
        "model": spec.description, "command": " && ".join(leg["command"] for leg in legs),
        "recipe": section, "commit": commit.strip(), "steps": sum(leg["steps"] or 0 for leg in legs),
        **({"legs": legs} if len(legs) > 1 else {}),
        "device": args.device or f"CPU ({platform.processor() or platform.machine()})",
        "wall_seconds": round(args.seconds),
        "wall_note": "the whole recipe run(s): data, training and scoring",
        "storage": storage,
        **spec.scores(metrics), **spec.extra(model, recipe),
    }
    target.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
