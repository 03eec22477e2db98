"""`dvc repro` runs the whole DAG (both branches, every stage of dvc.yaml) in a temporary copy of the
repo on tiny params, and afterwards `dvc status` is clean; metrics files are git-tracked headline scalars
and reports/ cached outputs, so an experiment (`dvc exp run -S`) compares with its baseline in
`dvc exp show` and `dvc metrics diff`, and the baseline comes back with git and DVC clean."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy of the repo after `dvc repro` on tiny params: (its root, the environment, repro's stdout)."""
    repo = tmp_path_factory.mktemp("dvc")
    repo = copy_repo(repo / "repo")
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), motion=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MAM2_MLFLOW": "0"}
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    return repo, env, repro.stdout


def test_dvc_repro_then_status_clean(reproduced):
    repo, env, stdout = reproduced
    stages = read_dvc_stages(repo)  # foreach stages as DVC names them: pseudo_labels@motion_gt
    assert len(stages) == 12, list(stages)
    assert all(f"Running stage '{stage}'" in stdout for stage in stages), stdout
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


def test_metrics_are_git_tracked_scalars_and_reports_are_cached_outputs(reproduced):
    """DVC's get-started layout: metrics files (headline numbers only) go to git, reports/ to DVC's cache."""
    repo, _, _ = reproduced
    metrics = sorted((repo / "metrics").rglob("*.json"))
    assert len(metrics) == 9, metrics
    for path in metrics:
        values = json.loads(path.read_text())
        assert all(isinstance(v, int | float) for v in values.values()), (path, values)
        assert len(values) <= 8, (path, values)
    untracked = git(repo, "status", "--porcelain", "--untracked-files=all", "metrics", "reports")
    assert {line[3:] for line in untracked.splitlines() if line.startswith("??")} >= {
        str(path.relative_to(repo)) for path in metrics}, "metrics files are not git-ignored"
    # written by recipes, committed by hand
    proofs = ("reports/refine_proof.", "reports/mam2_vs_videomae.", "reports/mam2_ablations.")
    assert not [line for line in untracked.splitlines() if line[3:].startswith("reports/")
                and not line.endswith(".gitignore") and not line[3:].startswith(proofs)], \
        "reports/ is DVC's, ignored by its .gitignore files"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    reports = {out["path"]: out for stage in read_dvc_stages(repo) for out in lock[stage].get("outs", [])
               if out["path"].startswith("reports/")}
    assert len(reports) == 10 and all(out["md5"] for out in reports.values()), reports
    assert (repo / "reports" / "finetune" / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_experiment_compares_with_its_baseline_and_leaves_git_clean(reproduced):
    """`dvc exp run -S` then `dvc exp show` and `dvc metrics diff` show numbers for the baseline and the
    experiment; restoring the baseline (git restore + dvc checkout) leaves git and DVC clean."""
    repo, env, _ = reproduced
    for key, value in (("user.name", "test"), ("user.email", "test@example.com")):
        git(repo, "config", key, value)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "demo")
    dvc = functools.partial(subprocess.run, cwd=repo, env=env, capture_output=True, text=True)
    run = dvc([str(BIN / "dvc"), "exp", "run", "-n", "steps3", "-S", "finetune.train.steps=3"])
    assert run.returncode == 0, run.stdout + run.stderr
    shown = dvc([str(BIN / "dvc"), "exp", "show", "--json"])
    assert shown.returncode == 0, shown.stderr
    baseline = json.loads(shown.stdout)[-1]
    experiment = baseline["experiments"][0]["revs"][0]
    assert experiment["name"] == "steps3"
    for rev in (baseline, experiment):
        metrics = rev["data"]["metrics"]
        assert "error" not in metrics["metrics/finetune.json"], metrics  # the `!` of git-ignored metrics
        assert isinstance(metrics["metrics/finetune.json"]["data"]["top1"], float)
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    diff = dvc([str(BIN / "dvc"), "metrics", "diff", "--all", "--json", branch, "steps3"])
    assert diff.returncode == 0, diff.stderr
    assert "top1" in json.loads(diff.stdout)["metrics/finetune.json"]
    git(repo, "restore", "params.yaml", "dvc.lock", "metrics")
    checkout = dvc([str(BIN / "dvc"), "checkout"])
    assert checkout.returncode == 0, checkout.stderr
    assert git(repo, "status", "--porcelain") == ""
    status = dvc([str(BIN / "dvc"), "status"])
    assert "up to date" in status.stdout, status.stdout


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout
