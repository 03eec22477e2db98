"""Classifier head (identity + fc_norm under mean pooling), layer-wise lr decay groups, linear-probe freezing,
checkpoints, loaded position tables."""

from __future__ import annotations

import copy

import pytest
import torch

from models.classifier import (
    TablePosEmbed,
    VideoClassifier,
    classifier_config,
    layer_decay_param_groups,
    load_classifier,
    save_classifier,
)
from models.video_vit import build_encoder, sincos_pos_table

CONFIG = dict(name="tiny", img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=32, depth=3,
              num_heads=2)


def classifier(**kw) -> VideoClassifier:
    torch.manual_seed(0)
    return VideoClassifier(build_encoder(**CONFIG), 5, **kw)


def test_layer_decay_scales():
    model = classifier()
    decay, depth = 0.75, 3
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(scale_of) == {id(p) for p in named.values()}  # every parameter, once
    assert scale_of[id(named["head.weight"])] == 1.0 and scale_of[id(named["fc_norm.weight"])] == 1.0
    assert "encoder.norm.weight" not in named  # mean pooling: the encoder's final norm is an identity
    kept = dict(classifier(final_norm=True).named_parameters())
    groups = layer_decay_param_groups(classifier(final_norm=True), weight_decay=0.05, layer_decay=decay)
    assert {g["lr_scale"] for g in groups for p in g["params"] if p is kept["encoder.norm.weight"]} <= {1.0}
    for i in range(depth):
        for key in (f"encoder.blocks.{i}.attn.qkv.weight", f"encoder.blocks.{i}.mlp.fc2.bias"):
            assert scale_of[id(named[key])] == pytest.approx(decay ** (depth - i))
    embed = scale_of[id(named["encoder.patch_embed.weight"])]
    assert embed == pytest.approx(decay ** (depth + 1)) and embed == min(scale_of.values())
    assert wd_of[id(named["head.weight"])] == 0.05 and wd_of[id(named["head.bias"])] == 0.0
    assert wd_of[id(named["encoder.blocks.1.norm1.weight"])] == 0.0


def test_layer_decay_lr_reaches_the_optimizer(tmp_path):
    """Through the shared loop, each group's lr is the schedule's lr x its scale."""
    from pipeline.core.training import TrainParams, train

    model = classifier()
    params = TrainParams(steps=1, batch_size=2, base_lr=0.1, lr_scaling="none", warmup_steps=0,
                         schedule="constant", log_every=1, checkpoint_every=1)
    groups = layer_decay_param_groups(model, 0.0, 0.5)

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, key):
            return torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(key[1]))

    train(model, Clips(), lambda m, x: {"loss": m(x).square().mean()}, params, tmp_path, param_groups=groups)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]
    lrs = sorted({round(g["lr"], 8) for g in state["param_groups"]})
    assert lrs == [round(0.1 * 0.5 ** k, 8) for k in (4, 3, 2, 1, 0)]


def test_head_starts_small_and_linear_probe_freezes_the_encoder():
    model = classifier(head_init_scale=0.001)
    assert model.head.weight.abs().max() < 0.001 * 0.02 * 5  # normal with std 0.02, scaled
    x = torch.rand(2, 3, 4, 16, 16)
    assert model(x).abs().max() < 0.01  # logits start near zero
    model.freeze_encoder().train()
    assert not model.encoder.training and model.fc_norm.training
    model(x).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None and model.fc_norm.weight.grad is not None
    trainable = [p for g in layer_decay_param_groups(model, 0.05, 0.75) for p in g["params"]]
    assert {id(p) for p in trainable} == {id(p) for p in [*model.fc_norm.parameters(),
                                                          *model.head.parameters()]}


def test_input_norm_and_pooling():
    model = classifier(input_norm="imagenet").eval()
    x = torch.rand(2, 3, 4, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    expected = model.head(model.fc_norm(model.encoder((x - mean) / std).mean(1)))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="input_norm"):
        classifier(input_norm="zscore")


def test_mean_pooling_drops_the_final_norm_unless_asked():
    """VideoMAE's head: identity instead of the encoder's final norm, fc_norm (fresh) after pooling;
    final_norm=True is the earlier head (final norm, pool, fc_norm)."""
    torch.manual_seed(0)
    encoder = build_encoder(**CONFIG)
    with torch.no_grad():
        encoder.norm.weight.normal_()
    old_norm = encoder.norm
    x = torch.rand(2, 3, 4, 16, 16)
    with torch.no_grad():
        tokens = encoder.patch_embed(x).flatten(2).transpose(1, 2) + encoder.pos_embed(encoder.grid)
        for blk in encoder.eval().blocks:
            tokens = blk(tokens)  # the last block's output, before any norm
    kept = VideoClassifier(copy.deepcopy(encoder), 5, final_norm=True).eval()
    assert isinstance(kept.encoder.norm, torch.nn.LayerNorm)
    torch.testing.assert_close(kept.features(x), kept.fc_norm(old_norm(tokens).mean(1)))
    model = VideoClassifier(encoder, 5).eval()
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    assert not [k for k in model.state_dict() if k.startswith("encoder.norm.")]
    torch.testing.assert_close(model.features(x), model.fc_norm(tokens.mean(1)))
    assert torch.equal(model.fc_norm.weight, torch.ones(32))  # fresh
    assert torch.equal(model.fc_norm.bias, torch.zeros(32))


def test_checkpoint_roundtrip_keeps_the_head_kind(tmp_path):
    """A saved classifier rebuilds with or without the final norm, as it was saved; a config written before
    the identity default (no final_norm key) kept the norm."""
    x = torch.rand(2, 3, 4, 16, 16)
    for final_norm in (False, True):
        model = classifier(final_norm=final_norm)
        config = classifier_config(model, CONFIG, list("abcde"))
        assert config["final_norm"] is final_norm
        loaded, _ = load_classifier(save_classifier(model, config, tmp_path / f"{final_norm}.pt"))
        assert isinstance(loaded.encoder.norm, torch.nn.Identity) is not final_norm
        torch.testing.assert_close(loaded(x), model.eval()(x))
    model = classifier(final_norm=True)
    config = classifier_config(model, CONFIG, list("abcde"))
    del config["final_norm"]
    loaded, _ = load_classifier(save_classifier(model, config, tmp_path / "old.pt"))
    assert isinstance(loaded.encoder.norm, torch.nn.LayerNorm)


def test_checkpoint_roundtrip_with_loaded_table(tmp_path):
    model = classifier()
    grid = model.encoder.grid
    model.encoder.pos_embed = TablePosEmbed(torch.randn(grid[0] * grid[1] * grid[2], 32), grid)
    model.encoder.norm = torch.nn.Identity()
    with torch.no_grad():
        model.head.weight.normal_()
    config = classifier_config(model, CONFIG, ["a", "b", "c", "d", "e"])
    path = save_classifier(model, config, tmp_path / "classifier.pt")
    loaded, loaded_config = load_classifier(path)
    x = torch.rand(2, 3, 4, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded_config["class_names"][-1] == "e" and isinstance(loaded.encoder.norm, torch.nn.Identity)


def test_table_pos_embed_regrids():
    table = sincos_pos_table((2, 3, 3), 12)
    pos = TablePosEmbed(table, (2, 3, 3))
    assert torch.equal(pos((2, 3, 3)), table)
    wider = pos((2, 5, 5))  # 2n-1 along h and w keeps the old rows at even indices
    assert wider.shape == (50, 12)
    torch.testing.assert_close(wider.view(2, 5, 5, 12)[:, ::2, ::2], table.view(2, 3, 3, 12))
