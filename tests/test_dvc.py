"""`dvc repro` runs the whole DAG (both branches, every stage of dvc.yaml) in a temporary copy of the
repo on tiny params, and afterwards `dvc status` is clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
import zarr

from pipeline.orchestrate.flows import read_dvc_stages

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "demo_data": {"classes": ["translate_left", "translate_right"], "videos_per_class": 2,
                  "num_frames": 12, "size": 64, "include_samples": False, "motion_gt_clips": 1,
                  "motion_gt_frames": 4, "motion_gt_points": 4},
    "decode": {"num_frames": 9, "stride": 1, "clips_per_video": 1, "store_size": 64, "workers": 0},
    "tokenizer": {"codebook_size": 16, "crop_size": 32, "val_frames": 4, "grid_frames": 2,
                  "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1}},
    "targets": {"clips_per_batch": 2},
    "pretrain": {"num_frames": 4, "input_size": 32, "decoder_dim": 16, "decoder_depth": 1,
                 "decoder_heads": 1, "regressor_depth": 1, "depth": 1, "sample_clips": 1,
                 "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}},
    "finetune": {"num_frames": 4, "frame_step": 1, "input_size": 32, "eval_clips": 1, "eval_crops": 1,
                 "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}},
}
_MOTION_TRAIN = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
# The motion branch on tiny data: the tracker's 8-frame windows need clips of 9 frames (decoded clips
# and motion_gt alike), and the tiny demo has no unlabelled (real) clips, so every clip is labelled.
TINY_MOTION = {
    "demo_data": {"motion_gt_frames": 9},
    "motion_pretrain": {"flow_updates": 2, "tracker_points": 8, "tracker_iters": 2, "eval_flow_updates": 2,
                        "eval_tracker_iters": 2, "eval_pairs_per_clip": 2, "flow_train": _MOTION_TRAIN,
                        "tracker_train": _MOTION_TRAIN},
    "pseudo_labels": {"clip_filter": "all", "max_clips": None, "pairs_per_clip": 2,
                      "windows_per_clip": 1, "grid_step": 16, "flow_updates": 2, "tracker_iters": 2,
                      "alpha": 1.0, "beta": 50.0, "colour": 1.0, "tau": 1000.0, "scale_thresholds": False},
    "densify": {"window_size": 2, "max_queries_per_window": 32, "static_speed": 0.0},
    "refine": {"targets": ["motion_gt"], "flow_updates": 2, "tracker_iters": 2, "eval_pairs": 2,
               "eval_pairs_per_clip": 2, "flow_train": _MOTION_TRAIN, "track_train": _MOTION_TRAIN,
               "track_augment": {"crop": [48, 48]}},
}


def tiny_params(params: dict, *, motion: bool = False) -> dict:
    """`params` (params.yaml's contents) with the tiny sections merged in, one level deep."""
    for tiny in (TINY, TINY_MOTION) if motion else (TINY,):
        for section, values in tiny.items():
            params.setdefault(section, {}).update(values)
    return params


def copy_repo(dest: Path) -> Path:
    """Copy the files git would ship (tracked + untracked, not ignored) into a fresh git repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def test_dvc_repro_then_status_clean(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), motion=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MAM2_MLFLOW": "0"}
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    stages = read_dvc_stages(repo)  # foreach stages as DVC names them: pseudo_labels@motion_gt
    assert len(stages) == 12, list(stages)
    assert all(f"Running stage '{stage}'" in repro.stdout for stage in stages), repro.stdout
    store = zarr.open_group(str(repo / "data/clips.zarr"), mode="r")
    assert store["frames"].shape == (4, 9, 64, 64, 3)
    assert (repo / "dvc.lock").exists() and (repo / "reports/decode.json").exists()
    targets = zarr.open_group(str(repo / "data/targets.zarr"), mode="r")
    assert targets["codes"].shape == (4, 9, 4, 4) and targets["rgb_diff"].shape == (4, 8, 64, 64, 3)
    for out in ("artifacts/tokenizer/vqgan.pt", "metrics/tokenizer.json", "artifacts/pretrain/encoder.pt",
                "metrics/pretrain.json", "reports/pretrain/history.csv", "metrics/finetune.json",
                "reports/finetune/confusion.png", "artifacts/motion_pretrain/flow.pt",
                "metrics/pseudo_labels/clips.json", "metrics/pseudo_labels/motion_gt.json",
                "metrics/densify/clips.json", "metrics/densify/motion_gt.json",
                "artifacts/refine/motion_gt/flow.pt", "metrics/refine.json"):
        assert (repo / out).is_file(), out
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
