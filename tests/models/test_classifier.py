"""Classifier head, layer-wise lr decay groups, linear-probe freezing, checkpoints, loaded position tables."""

from __future__ import annotations

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
    assert scale_of[id(named["encoder.norm.weight"])] == 1.0
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
