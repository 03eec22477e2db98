"""The MAM2-vs-VideoMAE experiment runner: every variant in its own folder, the E / E/2 split, the
scratch run on the same architecture, a table, and finished variants kept on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import StageError
from pipeline.orchestrate.experiment import VARIANTS, main, run_experiment, variant_params
from stages import finetune, pretrain
from tests.pipeline.data.test_pretrain_data import write_stores

PRETRAIN = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_frames": 4, "input_size": 16, "patch_size": 8,
            "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "regressor_depth": 1,
            "mask_ratio": 0.5, "sample_clips": 0,
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1}}
FINETUNE = {"num_frames": 4, "frame_step": 1, "input_size": 16, "eval_crops": 1, "mixup": 0.0, "cutmix": 0.0,
            "rand_augment": False, "crop_scale": [0.4, 1.0],
            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1}}


@pytest.fixture
def project(tmp_path, monkeypatch, one_thread) -> Path:
    """A project folder with tiny clips + targets stores (8 train, 4 val clips) and a params.yaml."""
    write_stores(tmp_path / "data", clips=12, frames=6, size=32, splits=[0] * 8 + [1] * 4,
                 labels=[n % 2 for n in range(12)], smooth=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": PRETRAIN, "finetune": FINETUNE}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAM2_MLFLOW", "0")
    return tmp_path


def test_variants_split_epochs_and_share_the_architecture():
    pre, fine = pretrain.Params(epochs=10, depth=3), finetune.Params(depth=7)
    by_name = {v.name: v for v in VARIANTS}
    half, _ = variant_params(by_name["mam2_E/2"], pre, fine, None)
    assert half.epochs == 5 and half.objective == "mam2"
    full, ft = variant_params(by_name["videomae_E"], pre, fine, 4.0)  # --epochs wins over pretrain.epochs
    assert full.epochs == 4 and full.objective == "videomae" and ft.init == "pretrain"
    no_epochs = pretrain.Params(train={"steps": 9})
    half_steps, _ = variant_params(by_name["videomae_E/2"], no_epochs, fine, None)
    assert half_steps.train.steps == 5 and half_steps.epochs is None
    none, scratch = variant_params(by_name["scratch"], pre, fine, None)
    assert none is None and scratch.init == "scratch" and scratch.depth == 3  # pretrain's architecture


def test_experiment_writes_a_table_from_separate_runs(project):
    report = run_experiment(params_file=Path("params.yaml"), epochs=None)
    table = report.read_text()
    assert report == Path("reports/mam2_vs_videomae.md")
    for variant in VARIANTS:
        assert f"| {variant.name} |" in table
        folder = project / "runs" / "experiment" / variant.name.replace("/", "_")
        row = json.loads((folder / "result.json").read_text())
        assert 0.0 <= row["top1"] <= 1.0 and row["wall_seconds"] > 0
        assert (folder / "metrics" / "finetune.json").exists()
        assert (folder / "artifacts" / "pretrain" / "encoder.pt").exists() == (variant.objective is not None)
    steps = {v.name: json.loads((project / "runs" / "experiment" / v.name.replace("/", "_") / "result.json")
                                .read_text())["pretrain_steps"] for v in VARIANTS}
    assert steps == {"mam2_E": 4, "mam2_E/2": 2, "videomae_E": 4, "videomae_E/2": 2, "scratch": 0}
    # a rerun keeps the finished variants instead of training again
    stamp = {p: p.stat().st_mtime_ns for p in (project / "runs" / "experiment").rglob("result.json")}
    assert main(["mam2-vs-videomae", "--variants", "scratch,mam2_E"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_linear_probes_flops_and_per_target_losses_join_the_rows(project):
    """--modes full,linear evaluates each encoder both ways in its own folders; each pre-trained row has
    its counted training FLOPs per clip and its per-target losses beside their trivial baselines."""
    argv = ["mam2-vs-videomae", "--variants", "mam2_E,videomae_E,scratch", "--modes", "full,linear"]
    assert main(argv) == 0
    rows = {name: json.loads((project / "runs" / "experiment" / name / "result.json").read_text())
            for name in ("mam2_E", "videomae_E", "scratch")}
    for name, row in rows.items():
        assert 0 <= row["top1_linear"] <= 1 and 0 <= row["top1_full"] <= 1 and row["top1"] == row["top1_full"]
        assert (project / "runs" / "experiment" / name / "metrics" / "linear.json").exists()
    targets = {"appearance_acc", "appearance_acc_baseline", "motion_mse", "motion_mse_baseline"}
    assert targets <= set(rows["mam2_E"])
    assert {"loss_pixel", "pixel_mse_baseline"} <= set(rows["videomae_E"])
    # MAM2's regressor and two decoders cost more per step than VideoMAE's one decoder
    assert rows["mam2_E"]["pretrain_gflops_per_clip"] > rows["videomae_E"]["pretrain_gflops_per_clip"] > 0
    assert rows["scratch"]["pretrain_tflops"] == 0
    table = (project / "reports" / "mam2_vs_videomae.md").read_text()
    assert "| top-1 full | top-1 linear |" in table and "Most frequent class" in table


def test_unknown_variant_fails(project):
    with pytest.raises(StageError, match="unknown variant"):
        run_experiment(variants=["mam2_E/3"])


def test_missing_targets_fail_before_any_training(project):
    import shutil

    shutil.rmtree(project / "data" / "targets.zarr")
    with pytest.raises(FileNotFoundError,
                       match=r"targets.zarr, needed by mam2_E, mam2_E/2 \(run `mam2 tokenizer`"):
        run_experiment()
    assert not (project / "runs").exists()  # nothing trained


@pytest.mark.slow  # MLflow's SQLite store setup alone takes ~15 s on busy cores

def test_runs_are_tagged_for_side_by_side_comparison(project, monkeypatch):
    """With tracking on, each stage run carries experiment, variant and objective tags, and the
    summary run holds every variant's top-1."""
    import mlflow

    monkeypatch.setenv("MAM2_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    run_experiment(variants=["videomae_E/2", "scratch"])
    runs = mlflow.search_runs(experiment_names=["mam2"], output_format="list")
    tags = sorted((r.data.tags["stage"], r.data.tags["variant"], r.data.tags.get("objective")) for r in runs)
    assert tags == [("experiment", "summary", None), ("finetune", "scratch", "none"),
                    ("finetune", "videomae_E/2", "videomae"), ("pretrain", "videomae_E/2", "videomae")]
    finetunes = [r for r in runs if r.data.tags["stage"] == "finetune"]
    assert all("val/top1" in r.data.metrics for r in finetunes)  # the same key: one column in the UI
    summary = next(r for r in runs if r.data.tags["stage"] == "experiment")
    assert set(summary.data.metrics) >= {"videomae_E_2/top1_full", "scratch/top1_full"}
