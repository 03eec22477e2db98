"""Tests for models/vqgan.py: official-format checkpoints, code alignment, our own format, errors."""
from __future__ import annotations

import dataclasses
import sys
import time
import types

import pytest
import torch

from models.vqgan import (
    VQGAN,
    CheckpointError,
    VQGANConfig,
    load_taming_checkpoint,
    load_vqgan,
    save_vqgan,
)

# A small model in the official layout (f4, one attention level) so every test runs in well under a second.
OFFICIAL_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 16
    n_embed: 64
    ddconfig:
      double_z: False
      z_channels: 32
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: False
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""
SMALL = VQGANConfig(embed_dim=16, n_embed=64, z_channels=32, resolution=32, ch=32, ch_mult=(1, 1, 2),
                    num_res_blocks=1, attn_resolutions=(8,))


def _fake_module(monkeypatch, dotted: str, **attrs) -> None:
    """Register a module (and its parents) so pickle can name classes from packages we don't have."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for name, obj in attrs.items():
        obj.__module__, obj.__qualname__ = dotted, name
        setattr(sys.modules[dotted], name, obj)


def _reference_model(seed: int = 0) -> VQGAN:
    """SMALL with random weights and a well-spread codebook (taming's init is nearly all ties)."""
    torch.manual_seed(seed)
    model = VQGAN(SMALL).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


@pytest.fixture
def official(tmp_path, monkeypatch):
    """An official-format `.ckpt` (lightning extras, loss.* weights) + `.yaml`, and the source model."""
    class ModelCheckpoint:  # what pytorch-lightning 1.0 pickles as the `callbacks` key
        pass

    _fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
    callback = ModelCheckpoint()
    callback.best_model_path = "logs/last.ckpt"
    model = _reference_model()
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    state["loss.logvar"] = torch.zeros(())
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 123, "epoch": 4, "pytorch-lightning_version": "1.0.8",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}, "cb": callback},
                "optimizer_states": [], "lr_schedulers": []}, ckpt)
    (yaml_path := tmp_path / "model.yaml").write_text(OFFICIAL_YAML)
    return ckpt, yaml_path, model


def test_official_checkpoint_loads_and_codes_round_trip(official):
    ckpt, yaml_path, reference = official
    assert VQGANConfig.from_yaml(yaml_path) == SMALL
    model = load_taming_checkpoint(ckpt, yaml_path)
    assert not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    codebook = model.quantize.embedding.weight
    codes = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    latent = model.codes_to_latent(codes)  # codebook rows laid on a (2, 4, 4) grid
    assert torch.equal(latent.permute(0, 2, 3, 1), codebook[codes])
    assert torch.equal(model.quantize_latent(latent)[2], codes)

    seen = []  # decode must feed exactly those rows to the decoder
    model.post_quant_conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        frames = model.decode(codes)
    assert frames.shape == (2, 3, 16, 16) and torch.equal(seen[0], latent)

    # encode picks, for each position, the nearest codebook row to the encoder's latent.
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode_to_latent(x).permute(0, 2, 3, 1)
    nearest = torch.cdist(z.reshape(-1, 16), codebook.detach()).argmin(1).reshape(2, 4, 4)
    assert torch.equal(model.encode(x), nearest)


def test_codes_of_frame_t_are_codes_of_frame_t():
    model = _reference_model()
    clip = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = model.encode_video(clip, frames_per_batch=4)  # 6 frames in uneven chunks of 4 + 2
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == torch.long
    assert not torch.equal(codes[:, 0], codes[:, 1]) and not torch.equal(codes[0], codes[1])
    for b in range(2):
        for t in range(3):
            assert torch.equal(codes[b, t], model.encode(clip[b:b + 1, :, t])[0]), (b, t)


@pytest.mark.parametrize("change, key", [({"n_embed": 32}, "quantize.embedding.weight"),
                                         ({"ch": 64}, "encoder.conv_in.weight"),
                                         ({"attn_resolutions": ()}, "encoder.down.2.attn.0.q.weight")])
def test_mismatched_config_is_a_checkpoint_error_naming_keys(official, change, key):
    ckpt, _, _ = official
    with pytest.raises(CheckpointError, match="does not match") as err:
        load_taming_checkpoint(ckpt, dataclasses.replace(SMALL, **change))
    assert key in str(err.value)
    if "n_embed" in change:
        assert "(64, 16) vs config (32, 16)" in str(err.value)


def test_unreadable_or_foreign_files_are_checkpoint_errors(tmp_path, monkeypatch):
    text = tmp_path / "model.ckpt"
    text.write_text("model:\n  params: {}\n")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _reference_model().state_dict()}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    for path in (text, truncated, tmp_path / "missing.ckpt"):
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
            load_taming_checkpoint(path, SMALL)
    torch.save({"model": torch.zeros(1)}, bare := tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_taming_checkpoint(bare, SMALL)

    class Payload:  # any non-lightning global stays refused
        pass

    _fake_module(monkeypatch, "evil_pkg", Payload=Payload)
    torch.save({"state_dict": {}, "x": Payload()}, evil := tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil_pkg.Payload"):
        load_taming_checkpoint(evil, SMALL)


def test_yaml_missing_key_is_named(tmp_path):
    for drop, key in [("    n_embed: 64\n", "model.params.n_embed"),
                      ("      ch: 32\n", "model.params.ddconfig.ch")]:
        (path := tmp_path / "bad.yaml").write_text(OFFICIAL_YAML.replace(drop, ""))
        with pytest.raises(ValueError, match=key):
            VQGANConfig.from_yaml(path)
    (path := tmp_path / "bad.yaml").write_text("params: {}\n")
    with pytest.raises(ValueError, match="missing key model$"):
        VQGANConfig.from_yaml(path)


def test_official_preset_shape_and_parameter_count():
    config = VQGANConfig.imagenet_f16_1024()
    assert config.downsample_factor == 16 and VQGANConfig.imagenet_f16_16384().n_embed == 16384
    model = VQGAN(config)
    n = sum(p.numel() for p in model.parameters())
    assert 60e6 < n < 90e6, n  # taming's f16 VQGAN without its loss: ~72 M
    assert model.codebook_size == 1024 and model.quantize.embedding.weight.shape == (1024, 256)
    assert "encoder.down.4.attn.1.q.weight" in model.state_dict()  # attention at 16x16 only
    assert "encoder.down.3.attn.0.q.weight" not in model.state_dict()


def test_save_load_forward_and_dead_code_reinit(tmp_path):
    model = _reference_model()
    loaded = load_vqgan(save_vqgan(model, tmp_path / "tok.pt"))
    assert loaded.config == SMALL and not (tmp_path / "tok.pt.tmp").exists()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.save({"a": 1}, plain := tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a mam2.vqgan"):
        load_vqgan(plain)

    out = model.train()(x)
    assert out.recon.shape == x.shape and out.codes.shape == (2, 4, 4) and out.codebook_loss.ndim == 0
    (out.recon.square().mean() + out.codebook_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.quantize.embedding.weight.grad is not None

    usage = model.code_usage(out.codes)
    assert usage.sum() == 32 and (usage == 0).any()
    before = model.quantize.embedding.weight.detach().clone()
    n = model.reinit_dead_codes(usage, out.latent, generator=torch.Generator().manual_seed(0))
    after = model.quantize.embedding.weight.detach()
    assert n == int((usage == 0).sum())
    assert torch.equal(after[usage > 0], before[usage > 0]) and not torch.equal(after, before)
    # each re-seeded code sits (almost) on one of the encoder's outputs
    latents = out.latent.detach().permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.cdist(after[usage == 0], latents).min(1).values.max() < 0.04 * latents.std()


def test_tiny_preset_encodes_64px_frames_quickly():
    model = VQGAN(VQGANConfig.tiny_f16()).eval()
    frames = torch.rand(8, 3, 64, 64) * 2 - 1
    start = time.perf_counter()
    codes = model.encode(frames)
    assert codes.shape == (8, 4, 4) and int(codes.max()) < 512
    assert time.perf_counter() - start < 5.0  # ~0.03 s on 2 cores; generous for loaded CI machines
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(frames[..., :60])
    with pytest.raises(ValueError, match="uint8"):
        model.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
