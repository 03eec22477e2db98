"""tokenizer: an official taming checkpoint loads through the stage, a VQGAN trained on demo-like clips
beats the mean frame and keeps its codebook in use, a stopped run resumes to the same model, and the
discriminator only learns from its own loss."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from models.vqgan import VQGAN, VQGANConfig, load_vqgan
from pipeline.core.errors import StageError
from pipeline.core.params import ParamsError, Paths, apply_overrides, read_params_file, validate_section
from pipeline.core.stores import SPLITS, create_clips_store
from pipeline.data.frames_dataset import FramesDataset, held_out_frames, split_rows
from pipeline.data.synthetic import MOTION_CLASSES, render_class_clip
from stages.tokenizer import HEADLINE, Params, TokenizerObjective, comparison_grid, run
from tests.models.test_vqgan import OFFICIAL_YAML, official  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_clips_store(path: Path, *, num_clips: int = 8, num_frames: int = 4, size: int = 32,
                     val_every: int = 4, seed: int = 0) -> Path:
    """A clips store of demo-like rendered clips (textured layers, moving shapes); every
    `val_every`-th clip is in the val split (0: none)."""
    rng = np.random.default_rng(seed)
    frames = np.stack([render_class_clip(MOTION_CLASSES[i % len(MOTION_CLASSES)], size=(size, size),
                                         num_frames=num_frames, rng=rng) for i in range(num_clips)])
    splits = np.zeros(num_clips, int)
    if val_every:
        splits[val_every - 1::val_every] = SPLITS.index("val")
    store = create_clips_store(path, num_clips=num_clips, num_frames=num_frames, size=size,
                               labels=np.zeros(num_clips), videos=np.arange(num_clips),
                               starts=np.zeros(num_clips), splits=splits, video_paths=[], attrs={})
    store["frames"][:] = frames
    return path


def tokenize(tmp_path: Path, clips: Path, **overrides) -> dict[str, Path]:
    params = Params(**overrides)
    return run(params, clips=clips, artifacts=tmp_path / "artifacts", metrics=tmp_path / "tokenizer.json",
               reports=tmp_path / "reports", run_dir=tmp_path / "runs")


def test_official_checkpoint_loads_through_the_stage(tmp_path, official):  # noqa: F811
    ckpt, yaml_path, reference = official  # f4, 64 codes
    clips = make_clips_store(tmp_path / "clips.zarr", size=32)
    out = tokenize(tmp_path, clips, checkpoint=ckpt, config=yaml_path, val_frames=6, grid_frames=3)
    model = load_vqgan(out["tokenizer"])
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    results = json.loads(out["results"].read_text())
    assert results["source"] == str(ckpt) and results["codebook_size"] == 64 and results["downsample"] == 4
    assert results["val_frames"] == 6 and results["train_steps"] == 0 and np.isfinite(results["psnr"])
    # the metrics file (DVC's columns) holds the headline scalars only
    assert json.loads(out["metrics"].read_text()) == {key: results[key] for key in HEADLINE}
    assert out["results"] == tmp_path / "reports" / "results.json"
    grid = np.asarray(Image.open(out["grid"]))  # 2 x 3 frames of 32 px, enlarged and labelled
    assert grid.ndim == 3 and grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32
    originals, recons = np.zeros((3, 32, 32, 3), np.uint8), np.ones((3, 32, 32, 3), np.uint8)
    assert comparison_grid(originals, recons, 3).shape == (64, 96, 3)
    assert not (tmp_path / "runs").exists(), "nothing is trained"

    # our own format loads without a config; an official one without its config says what is missing
    again = tokenize(tmp_path / "again", clips, checkpoint=out["tokenizer"], val_frames=2)
    assert torch.equal(load_vqgan(again["tokenizer"]).quantize.embedding.weight,
                       ours["quantize.embedding.weight"])
    with pytest.raises(StageError, match="tokenizer.config"):
        tokenize(tmp_path / "x", clips, checkpoint=ckpt)
    (bad := tmp_path / "bad.yaml").write_text(OFFICIAL_YAML.replace("n_embed: 64", "n_embed: 32"))
    with pytest.raises(StageError, match=r"tokenizer.checkpoint: .*does not match"):
        tokenize(tmp_path / "x", clips, checkpoint=ckpt, config=bad)
    (bad := tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(StageError, match="tokenizer.config"):
        tokenize(tmp_path / "x", clips, checkpoint=ckpt, config=bad)
    with pytest.raises(FileNotFoundError, match="tokenizer.checkpoint"):
        tokenize(tmp_path / "x", clips, checkpoint=tmp_path / "missing.ckpt")
    assert not (tmp_path / "x" / "artifacts").exists()


def test_params_are_validated_and_partial_train_blocks_keep_stage_defaults():
    with pytest.raises(ParamsError, match="crop_size=40 must be a multiple"):
        validate_section({"tokenizer": {"crop_size": 40}}, "tokenizer", Params)
    with pytest.raises(ParamsError, match="config is only used with checkpoint"):
        validate_section({"tokenizer": {"config": "x.yaml"}}, "tokenizer", Params)
    params = validate_section(apply_overrides({}, ["tokenizer.train.steps=7"]), "tokenizer", Params)
    assert params.train.steps == 7 and params.train.base_lr == Params().train.base_lr == 2e-4
    assert Params(codebook_size=64).vqgan_config().n_embed == 64


def test_frames_dataset_and_held_out_frames(tmp_path):
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=6, num_frames=3, size=32, val_every=3)
    store = zarr.open_group(str(clips), mode="r")
    train_rows, val_rows = split_rows(store, 0.1)
    assert train_rows.tolist() == [0, 1, 3, 4] and val_rows.tolist() == [2, 5]
    dataset = FramesDataset(clips, train_rows, crop_size=16)
    assert len(dataset) == 12
    first, again, other = dataset[(4, 11)], dataset[(4, 11)], dataset[(4, 12)]
    assert first.shape == (3, 16, 16) and torch.equal(first, again) and not torch.equal(first, other)
    assert -1 <= first.min() and first.max() <= 1
    frame = store["frames"][1, 1]  # index 4 = clip 1 (row 1), frame 1: the crop is a window of it
    image = np.round((first.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    windows = [frame[y:y + 16, x:x + 16] for y in range(17) for x in range(17)]
    assert any(np.array_equal(image, w) or np.array_equal(image, w[:, ::-1]) for w in windows)
    held = held_out_frames(store["frames"], val_rows, 4, 24)
    assert held.shape == (4, 24, 24, 3)
    assert np.array_equal(held[0], store["frames"][2, 0, 4:28, 4:28])
    assert np.array_equal(held[-1], store["frames"][5, 2, 4:28, 4:28])
    # without a val split, whole videos are held out
    plain = make_clips_store(tmp_path / "plain.zarr", num_clips=6, num_frames=2, val_every=0)
    train_rows, val_rows = split_rows(zarr.open_group(str(plain), mode="r"), 0.5)
    assert sorted([*train_rows, *val_rows]) == list(range(6)) and len(val_rows) == 3


def _train_small(tmp_path: Path, clips: Path, **overrides) -> tuple[dict, dict[str, Path]]:
    settings = {"codebook_size": 64, "crop_size": 32, "val_frames": 64, "reinit_every": 10,
                "train": {"steps": 120, "batch_size": 8, "warmup_steps": 10, "checkpoint_every": 1000}}
    out = tokenize(tmp_path, clips, **{**settings, **overrides})
    return json.loads(out["results"].read_text()), out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 3 open: 120 steps on 32 px frames (2x2 codes) stay below "
                   "the mean frame (measured without gradient clipping: 15.5 dB vs 15.9 dB, 22% of 64 codes)")
def test_trained_tokenizer_beats_the_mean_frame_and_uses_its_codebook(tmp_path):
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=12, num_frames=4, size=32)
    metrics, out = _train_small(tmp_path, clips)
    assert metrics["source"] == "trained" and metrics["train_steps"] == 120
    assert metrics["psnr"] > metrics["baseline_psnr"] + 2.0, metrics
    assert metrics["codebook_usage"] > 0.5 and metrics["perplexity"] > 16, metrics
    history = out["history"].read_text().splitlines()
    assert history[0].startswith("step,") and len(history) == 1 + 120 // 10


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 3 open: the demo settings beat the mean frame by 3.4 dB "
                   "on the demo clips but not on these rendered ones (measured 15.6 dB vs 16.3 dB, 48% "
                   "of 128 codes, 123 s on 1 thread)")
def test_tokenizer_on_demo_sized_clips(tmp_path):
    """The demo setting (64 px crops, batch 8, 300 steps) on 64 px frames: issue 3's criterion, beat the
    mean frame clearly (3 dB) with over half the codebook in use. 128 codes: the 48 held-out frames
    hold 768 code positions of 6 clips, too few to keep the demo's 256 (or the preset's 512) in use."""
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=24, num_frames=8, size=64)
    metrics, _ = _train_small(tmp_path, clips, codebook_size=128, crop_size=64, val_frames=48,
                              reinit_every=20, train={"steps": 300, "batch_size": 8})
    assert metrics["psnr"] > metrics["baseline_psnr"] + 3.0, metrics
    assert metrics["codebook_usage"] > 0.5, metrics


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tokenizer_on_the_demo_data(tmp_path, monkeypatch):
    """Issue 3's criterion on the demo itself: demo_data, decode and tokenizer with params.yaml's values
    beat the mean frame on the held-out clips (measured +3.35 dB) with most of the codebook in use
    (measured 91% of 256 codes; about 4 min on 1 thread)."""
    monkeypatch.setenv("MAM2_MLFLOW", "0")
    doc = read_params_file(REPO / "params.yaml")
    paths = Paths(raw=tmp_path / "raw", motion_gt=tmp_path / "motion_gt", clips=tmp_path / "clips.zarr",
                  reports=tmp_path / "reports", metrics=tmp_path / "metrics",
                  artifacts=tmp_path / "artifacts", runs=tmp_path / "runs")
    for name in ("demo_data", "decode", "tokenizer"):
        module = importlib.import_module(f"stages.{name}")
        module.run_stage(validate_section(doc, name, module.Params), paths)
    metrics = json.loads((paths.metrics / "tokenizer.json").read_text())
    assert metrics["psnr"] > metrics["baseline_psnr"] + 2.0, metrics
    assert metrics["codebook_usage"] > 0.5, metrics


def test_stopped_run_resumes_to_the_same_model(tmp_path):
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=4, num_frames=2, size=16)
    # 4 autoencoder steps x 4 one-code crops = the 16 vectors the k-means codebook needs; the cut at
    # step 3 falls inside the warm-up, so the resumed run must rebuild the same k-means codebook.
    settings = {"codebook_size": 16, "crop_size": 16, "reinit_every": 2, "val_frames": 4,
                "autoencoder_steps": 4}
    train = {"steps": 6, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 100}
    full = tokenize(tmp_path / "full", clips, **settings, train=train)
    first = tokenize(tmp_path / "cut", clips, **settings, train={**train, "stop_after": 3})
    assert first == {"run_dir": tmp_path / "cut" / "runs"} and not (tmp_path / "cut" / "artifacts").exists()
    second = tokenize(tmp_path / "cut", clips, **settings, train=train)
    a, b = load_vqgan(full["tokenizer"]).state_dict(), load_vqgan(second["tokenizer"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_continues_from_an_init_checkpoint(tmp_path):
    """init_checkpoint starts training from a vqgan.pt of ours: a step of lr 1e-9 keeps its weights, a
    different architecture or a k-means warm-up (which would replace its codebook) is refused."""
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=4, num_frames=2, size=16)
    settings = {"codebook_size": 16, "crop_size": 16, "val_frames": 4, "autoencoder_steps": 0,
                "reinit_every": 0}
    first = tokenize(tmp_path / "first", clips, **settings,
                     train={"steps": 2, "batch_size": 4, "warmup_steps": 0})
    start = load_vqgan(first["tokenizer"]).state_dict()
    still = tokenize(tmp_path / "still", clips, **settings, init_checkpoint=first["tokenizer"],
                     train={"steps": 1, "batch_size": 4, "warmup_steps": 0, "base_lr": 1e-9,
                            "min_lr": 1e-9})
    same = load_vqgan(still["tokenizer"]).state_dict()
    assert all(torch.allclose(start[k].float(), same[k].float(), atol=1e-6) for k in start)
    moved = tokenize(tmp_path / "moved", clips, **settings, init_checkpoint=first["tokenizer"],
                     train={"steps": 2, "batch_size": 4, "warmup_steps": 0})
    assert not all(torch.equal(start[k], v) for k, v in load_vqgan(moved["tokenizer"]).state_dict().items())
    with pytest.raises(StageError, match="tokenizer.init_checkpoint.*codebook_size 32"):
        tokenize(tmp_path / "other", clips, **{**settings, "codebook_size": 32},
                 init_checkpoint=first["tokenizer"], train={"steps": 1, "batch_size": 4})
    with pytest.raises(ValueError, match="autoencoder_steps: 0"):
        Params(**{**settings, "autoencoder_steps": 4}, init_checkpoint=first["tokenizer"])


def test_discriminator_learns_only_from_its_own_loss():
    torch.manual_seed(0)
    config = VQGANConfig(embed_dim=8, n_embed=16, z_channels=8, resolution=16, ch=32, ch_mult=(1, 2),
                         num_res_blocks=1)
    objective = TokenizerObjective(VQGAN(config), Params(discriminator=True, disc_start=1, disc_layers=2,
                                                         crop_size=16, reinit_every=0,
                                                         autoencoder_steps=0))
    frames = torch.rand(4, 3, 16, 16) * 2 - 1
    before = objective(frames)  # step 0: warm-up, no adversarial terms
    assert "d_loss" not in before
    logs = objective(frames)
    assert {"g_loss", "d_loss", "d_weight"} <= logs.keys() and float(logs["d_weight"]) > 0
    objective.zero_grad()
    logs["loss"].backward()
    together = {n: p.grad.clone() for n, p in objective.discriminator.named_parameters()}
    decoder_grad = objective.vqgan.decoder.conv_out.weight.grad.clone()

    objective.zero_grad()
    fake = objective.vqgan(frames).recon.detach()
    disc = objective.discriminator
    (0.5 * (F.relu(1 - disc(frames)).mean() + F.relu(1 + disc(fake)).mean())).backward()
    for name, param in disc.named_parameters():
        torch.testing.assert_close(together[name], param.grad, msg=name)
    objective.zero_grad()
    out = objective.vqgan(frames)
    (out.recon - frames).square().mean().add(out.codebook_loss).backward()
    assert not torch.allclose(decoder_grad, objective.vqgan.decoder.conv_out.weight.grad), \
        "the generator feels the adversarial term"


def test_dead_codes_are_reseeded_on_schedule():
    torch.manual_seed(0)
    objective = TokenizerObjective(VQGAN(VQGANConfig.tiny_f16()), Params(reinit_every=2, crop_size=16,
                                                                             autoencoder_steps=0),
                                   accumulation=1)
    frames = torch.rand(2, 3, 32, 32) * 2 - 1
    assert "codes_reseeded" not in objective(frames) and "codes_reseeded" not in objective(frames)
    assert int(objective.usage.sum()) == 2 * 2 * 4
    logs = objective(frames)  # third call: step 2, re-seeds what the first two batches left unused
    assert 512 - 16 <= float(logs["codes_reseeded"]) < 512
    assert int(objective.usage.sum()) == 8 and int(objective.micro_steps) == 3


def test_autoencoder_warm_up_then_k_means_codebook():
    """Warm-up steps bypass the quantiser; then the codebook starts at k-means centroids of the
    warm-up's latents, so (unlike a random codebook) nearly every code wins some latent."""
    torch.manual_seed(0)
    config = VQGANConfig(embed_dim=8, n_embed=16, z_channels=8, resolution=16, ch=32, ch_mult=(1, 2),
                         num_res_blocks=1, norm_groups=1)
    objective = TokenizerObjective(VQGAN(config), Params(autoencoder_steps=2, reinit_every=0, crop_size=16))
    frames = torch.rand(4, 3, 16, 16) * 2 - 1  # 4 frames x 8x8 latents = 256 vectors per step
    random_codebook = objective.vqgan.quantize.embedding.weight.clone()
    for _ in range(2):
        logs = objective(frames)
        assert float(logs["codebook"]) == 0 and int(objective.usage.sum()) == 0  # no quantiser yet
    assert torch.equal(objective.vqgan.quantize.embedding.weight, random_codebook)
    latents = objective.recent_latents[:int(objective.recent_count)].clone()
    objective(frames)  # step 2: the codebook is initialised, then used
    codebook = objective.vqgan.quantize.embedding.weight
    assert not torch.equal(codebook, random_codebook)
    nearest = torch.cdist(latents, codebook).argmin(dim=1)
    assert len(torch.unique(nearest)) >= 14  # k-means centroids each own some of the latents
    for code in torch.unique(nearest)[:4]:  # and sit near the mean of what they own
        assert torch.allclose(codebook[code], latents[nearest == code].mean(0), atol=0.05)
    with pytest.raises(StageError, match="autoencoder_steps"):
        few = TokenizerObjective(VQGAN(config), Params(autoencoder_steps=1, reinit_every=0, crop_size=16))
        few(frames[:1, :, :4, :4])  # 4 latent vectors (f = 2), 16 codes
        few(frames[:1, :, :4, :4])
