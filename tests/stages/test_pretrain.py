"""pretrain: a quick run on a tiny store learns and writes loadable artifacts, resumes exactly, derives
steps from epochs, runs under a two-process torchrun (gloo), and fails clearly on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models.encoder_io import load_encoder
from models.mam2 import OBJECTIVES
from models.vqgan import VQGAN, VQGANConfig, save_vqgan
from pipeline.core.mlflow_runs import mlflow_run
from pipeline.core.params import ParamsError, validate_section
from pipeline.core.training import TrainParams
from pipeline.orchestrate.cli import main as mam2_main
from stages.finetune import Params as FinetuneParams
from stages.pretrain import ObjectiveName, Params, help_notes, resolve_steps, run
from tests.pipeline.data.test_pretrain_data import CODEBOOK, write_stores

REPO = Path(__file__).resolve().parents[2]

# A model of a few thousand weights on 4 x 16^2 clips of 8 px tubelets (2 x 2 x 2 tokens).
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_frames": 4, "input_size": 16, "patch_size": 8,
        "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "regressor_depth": 1, "mask_ratio": 0.5}
TRAIN = {"steps": 60, "batch_size": 4, "base_lr": 3e-3, "lr_scaling": "none", "warmup_steps": 2,
         "checkpoint_every": 30, "log_every": 5, "system_metrics_every": 0.2}



def tiny_params(**overrides) -> Params:
    train = {**TRAIN, **overrides.pop("train", {})}
    return Params.model_validate({**TINY, **overrides, "train": train})


def pretrain(root: Path, params: Params, *, targets: Path | None = None,
             tokenizer: Path | None = None) -> dict:
    data = root / "data"
    return run(params, clips=data / "clips.zarr", targets=targets or data / "targets.zarr",
               tokenizer=tokenizer or root / "no-tokenizer.pt", artifacts=root / "artifacts",
               run_dir=root / "runs", metrics=root / "metrics.json", reports=root / "reports")


def history(root: Path) -> list[dict]:
    lines = (root / "reports" / "history.csv").read_text().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, line.split(",")), strict=True)) for line in lines[1:]]


def fell(rows: list[dict], key: str, factor: float) -> bool:
    """Whether the mean of the last three logged values is below `factor` x the mean of the first two
    (each log is one step's batch, so single values are noisy)."""
    first, last = [r[key] for r in rows[:2]], [r[key] for r in rows[-3:]]
    return sum(last) / len(last) < factor * sum(first) / len(first)


def learnable_stores(root: Path) -> None:
    """Two clips of drifting gratings at the input size: a tiny model learns them within 60 steps."""
    write_stores(root / "data", clips=2, frames=4, size=16, smooth=True)


def tiny_vqgan(path: Path) -> Path:
    """An untrained VQGAN with the fixture's codebook and f = 8, enough to decode codes into images."""
    torch.manual_seed(0)
    config = VQGANConfig(embed_dim=8, n_embed=CODEBOOK, z_channels=8, resolution=16, ch=32,
                         ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    return save_vqgan(VQGAN(config), path)


def test_mam2_run_learns_writes_loadable_artifacts_and_logs(tmp_path, one_thread, monkeypatch):
    learnable_stores(tmp_path)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact folder goes beside its store, in the working directory
    monkeypatch.setenv("MAM2_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tiny_params(flip=False)
    with mlflow_run("pretrain", params) as tracked:
        outputs = pretrain(tmp_path, params, tokenizer=tiny_vqgan(tmp_path / "vqgan.pt"))
    rows = history(tmp_path)
    assert fell(rows, "loss_appearance", 0.7) and fell(rows, "loss_motion", 0.7), rows
    metrics = json.loads(outputs["results"].read_text())
    headline = ("loss", "appearance_acc", "appearance_acc_baseline", "motion_mse", "motion_mse_baseline")
    assert json.loads(outputs["metrics"].read_text()) == {key: metrics[key] for key in headline}
    assert metrics["steps"] == 60 and metrics["train_clips"] == 2 and "clips_per_s" not in metrics
    assert metrics["train_gflops_per_clip"] > 0  # counted forward + backward of one clip
    assert {"loss", "loss_appearance", "loss_motion", "motion_mse", "appearance_acc"} <= set(metrics)
    # the trivial baselines beside them, on the same masked targets: a constant code, a zero difference
    assert 0 < metrics["appearance_acc_baseline"] <= 1 and 0 < metrics["motion_mse_baseline"] <= 1 + 1e-4
    assert metrics["motion_mse"] < metrics["motion_mse_baseline"], metrics  # learnt: beats predicting zero
    assert "pixel_mse_baseline" not in metrics and "loss_pixel" not in metrics
    encoder, config = load_encoder(tmp_path / "artifacts" / "encoder.pt")
    assert config == {"name": "tiny", "img_size": 16, "num_frames": 4, "patch_size": 8, "tubelet_size": 2,
                      "depth": 1, "embed_dim": 32, "num_heads": 2}
    full = torch.load(tmp_path / "artifacts" / "model.pt", weights_only=True)
    assert full["format"] == "mam2.pretrain" and full["codebook_size"] == CODEBOOK
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, full["state_dict"][f"encoder.{key}"]), key
    reports = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert reports == ["codes_target_vs_pred.png", "history.csv", "motion_target_vs_pred.png", "results.json"]
    # 2 clips x 3 bands (masked input, target, prediction) of 16 px + 2 px gaps; 3 differences or 4 frames;
    # the 18 px cells enlarged x4, with row labels left, column labels and the title above
    for name, width in (("motion_target_vs_pred.png", 54), ("codes_target_vs_pred.png", 72)):
        height_px, width_px, _ = np.asarray(Image.open(tmp_path / "reports" / name)).shape
        assert height_px > 4 * 108 and width_px > 4 * width + 100, name
    run_data = mlflow.MlflowClient().get_run(tracked.run_id).data
    logged = set(run_data.metrics)
    assert {"train/loss_appearance", "train/loss_motion", "train/appearance_acc", "train/lr",
            "train/clips_per_s", "data/train_clips", "train/appearance_acc_baseline",
            "train/motion_mse_baseline"} <= logged
    assert any(key.startswith("system/") for key in logged), sorted(logged)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(tracked.run_id, "samples")}
    assert artifacts == {"samples/codes_target_vs_pred.png", "samples/motion_target_vs_pred.png"}


def test_videomae_runs_without_a_targets_store(tmp_path, one_thread):
    learnable_stores(tmp_path)
    pretrain(tmp_path, tiny_params(objective="videomae", flip=False), targets=tmp_path / "absent.zarr")
    rows = history(tmp_path)
    assert fell(rows, "loss_pixel", 0.6), rows
    assert "loss_appearance" not in rows[0] and "appearance_acc_baseline" not in rows[0]
    assert rows[-1]["loss_pixel"] < rows[-1]["pixel_mse_baseline"] <= 1 + 1e-4, rows[-1]
    load_encoder(tmp_path / "artifacts" / "encoder.pt")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["frames_masked.png", "history.csv",
                                                                        "results.json"]
    # the pixel objective's headline: its MSE beside predicting zero, no appearance or motion columns
    headline = json.loads((tmp_path / "metrics.json").read_text())
    assert set(headline) == {"loss", "pixel_mse", "pixel_mse_baseline"}
    assert json.loads((tmp_path / "reports" / "results.json").read_text())["train_gflops_per_clip"] > 0


def test_resume_and_stored_differences_give_the_same_encoder(tmp_path, one_thread):
    """4 steps straight; 2 steps (stop_after), then a rerun to 4; and 4 steps reading the stored RGB
    differences instead of computing them from the frames: the same weights, bit for bit."""
    for name in ("a", "b", "c"):
        write_stores(tmp_path / name / "data", clips=4, frames=4, size=16)
    params = tiny_params(sample_clips=0, train={"steps": 4, "checkpoint_every": 1})
    pretrain(tmp_path / "a", params)
    pretrain(tmp_path / "b", params.model_copy(update={"train": params.train.model_copy(
        update={"stop_after": 2})}))
    assert not (tmp_path / "b" / "artifacts").exists()  # nothing is published before the last step
    pretrain(tmp_path / "b", params)
    pretrain(tmp_path / "c", params.model_copy(update={"motion_source": "store"}))
    straight, _ = load_encoder(tmp_path / "a" / "artifacts" / "encoder.pt")
    for other in ("b", "c"):
        encoder, _ = load_encoder(tmp_path / other / "artifacts" / "encoder.pt")
        for (key, a), b in zip(straight.state_dict().items(), encoder.state_dict().values(), strict=True):
            assert torch.equal(a, b), (other, key)
    # the resumed run's history holds both segments; rerunning a finished run trains nothing, keeps it
    assert [row["step"] for row in history(tmp_path / "b")] == [2, 4]
    assert history(tmp_path / "b")[-1]["loss"] == history(tmp_path / "a")[-1]["loss"]
    metrics = (tmp_path / "b" / "metrics.json").read_text()
    (tmp_path / "b" / "artifacts" / "encoder.pt").unlink()
    pretrain(tmp_path / "b", params)
    assert (tmp_path / "b" / "metrics.json").read_text() == metrics
    assert (tmp_path / "b" / "artifacts" / "encoder.pt").exists()


def test_epochs_set_the_steps_and_partial_train_blocks_keep_stage_defaults():
    params = Params.model_validate({"epochs": 2.5, "train": {"batch_size": 4}})
    assert resolve_steps(params, 10).steps == 7  # ceil(2.5 x 10 / 4)
    assert params.train.base_lr == Params().train.base_lr == 1.5e-4  # VideoMAE's, before batch scaling
    tuned = validate_section({"finetune": {"train": {"batch_size": 4}}}, "finetune", FinetuneParams)
    assert tuned.train.betas == FinetuneParams().train.betas != TrainParams().betas
    assert resolve_steps(Params(), 10).steps == Params().train.steps
    with pytest.raises(ParamsError, match="pretrain: .*num_heads"):
        validate_section({"pretrain": {"embed_dim": 100, "num_heads": 3}}, "pretrain", Params)
    with pytest.raises(ParamsError, match="pretrain.objective"):
        validate_section({"pretrain": {"objective": "mae"}}, "pretrain", Params)
    assert set(get_args(ObjectiveName)) == set(OBJECTIVES)  # the params offer every objective the model has


def test_cae_switches_reach_the_model(tmp_path, one_thread):
    """align_weight and regressor_block (CAE's choices, switches because the MAM2 paper confirms neither)
    build the model they name and log the alignment loss."""
    write_stores(tmp_path / "data", clips=2, frames=4, size=16)
    params = tiny_params(align_weight=2.0, regressor_block="cae", sample_clips=0,
                         train={"steps": 2, "log_every": 1})
    pretrain(tmp_path, params)
    metrics = json.loads((tmp_path / "reports" / "results.json").read_text())
    assert np.isfinite(metrics["loss_align"]) and metrics["loss_align"] > 0
    full = torch.load(tmp_path / "artifacts" / "model.pt", weights_only=True)
    assert full["params"]["regressor_block"] == "cae" and full["params"]["align_weight"] == 2.0
    assert Params().regressor_block == "cae" and Params().align_weight == 0.0  # as the ablation decided
    with pytest.raises(ParamsError, match="pretrain.regressor_block"):
        validate_section({"pretrain": {"regressor_block": "postnorm"}}, "pretrain", Params)


def cli(root: Path, *prefix: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the stage's CLI with a params file of the tiny settings, in `root`."""
    params = {"pretrain": {**TINY, "sample_clips": 0, "train": {**TRAIN, "steps": 4}},
              "paths": {"clips": "data/clips.zarr", "artifacts": "artifacts", "runs": "runs",
                        "metrics": "metrics", "reports": "reports"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MAM2_MLFLOW": "0", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, "-m", "stages.pretrain", *extra], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_reports_missing_targets_and_bad_params_clearly(tmp_path, monkeypatch, capsys):
    write_stores(tmp_path / "data", clips=4, frames=4, size=16)
    (tmp_path / "data" / "targets.zarr").rename(tmp_path / "data" / "elsewhere.zarr")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAM2_MLFLOW", "0")
    assert mam2_main(["pretrain", "--set", "pretrain.train.steps=1"]) == 1
    assert ("error: targets store not found: data/targets.zarr (run `mam2 targets` first)"
            in capsys.readouterr().err)
    assert mam2_main(["pretrain", "--set", "pretrain.mask_ratio=1.0"]) == 2
    assert "pretrain.mask_ratio" in capsys.readouterr().err


def test_two_process_torchrun_matches_one_process(tmp_path, one_thread):  # ~10 s: in `make test`
    for name in ("one", "two"):
        write_stores(tmp_path / name / "data", clips=4, frames=4, size=16)
    pretrain(tmp_path / "one", tiny_params(sample_clips=0, train={"steps": 4}))  # what cli() sets
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ddp = cli(tmp_path / "two", *torchrun)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, _ = load_encoder(tmp_path / "one" / "artifacts" / "encoder.pt")
    two, _ = load_encoder(tmp_path / "two" / "artifacts" / "pretrain" / "encoder.pt")
    for (key, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        if key.endswith("qkv.bias"):
            # A key bias shifts every logit of a query equally: its gradient is rounding noise, which
            # Adam's normalisation turns into steps; compare the query and value biases only.
            width = a.shape[0] // 3
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        assert torch.allclose(a, b, atol=1e-6), key
    assert json.loads((tmp_path / "two" / "reports" / "pretrain" / "results.json").read_text())["steps"] == 4


def test_a_named_size_sets_every_dimension_at_paper_scale():
    """`model: base` is ViT-B with the paper's heads (12 blocks, decoders 384/4/6, regressor 4); the
    demo's smaller model is written in params.yaml, not in a default."""
    from models.video_vit import build_encoder
    from pipeline.core.params import read_params_file
    from stages.pretrain import encoder_config

    params = Params(model="base")
    assert params.heads() == {"decoder_dim": 384, "decoder_depth": 4, "decoder_heads": 6,
                              "regressor_depth": 4}
    with torch.device("meta"):  # shapes only: no memory for ViT-B's weights
        encoder = build_encoder(**encoder_config(params))
    assert len(encoder.blocks) == 12 and encoder.embed_dim == 768 and encoder.num_heads == 12
    assert 86e6 < sum(p.numel() for p in encoder.parameters()) < 88e6  # ViT-B with a 2x16x16 tubelet embed
    assert Params(model="base", decoder_depth=2).heads()["decoder_depth"] == 2, "a set field wins"
    lines = [line.split() for line in help_notes().splitlines()]
    assert ["base", "768/12/12", "384/4/6", "4", "blocks"] in lines, "--help shows the size-derived defaults"
    demo = validate_section(read_params_file(Path(__file__).resolve().parents[2] / "params.yaml"),
                            "pretrain", Params)
    assert demo.depth == 4 and demo.heads()["regressor_depth"] == 2, "the demo's shrinkage, in params.yaml"
