"""VideoMAE checkpoints: both published layouts load with zero missing keys; mismatches name the keys;
our encoder and classifier written in those layouts load back as the same function."""

from __future__ import annotations

import math

import pytest
import torch

from models.classifier import TablePosEmbed, VideoClassifier
from models.video_vit import build_encoder
from models.videomae_convert import (
    VideoMAEConversionError,
    load_head,
    load_videomae_classifier,
    load_videomae_encoder,
    read_videomae_state,
    videomae_classifier_state,
    videomae_encoder_config,
    videomae_encoder_state,
    videomae_sincos_table,
)

SIZE = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2)
WIDTH = dict(embed_dim=64, depth=2, num_heads=4)  # 64 is no published width: heads given explicitly
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")


def source_encoder():
    """The encoder the fake checkpoint is written from; k bias zero, as VideoMAE has none."""
    torch.manual_seed(1)
    encoder = build_encoder("tiny", **SIZE, **WIDTH)
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.qkv.bias.normal_()
            block.attn.qkv.bias[64:128] = 0
    return encoder


def videomae_state(encoder, *, pretrained: bool = True, num_classes: int = 3) -> dict[str, torch.Tensor]:
    """Our weights under VideoMAE's published names (pre-trained: `encoder.` prefix and decoder keys;
    fine-tuned: no prefix, fc_norm + head instead of the final norm, a learnt pos_embed)."""
    sd, prefix = encoder.state_dict(), "encoder." if pretrained else ""
    out = {f"{prefix}patch_embed.proj.weight": sd["patch_embed.weight"],
           f"{prefix}patch_embed.proj.bias": sd["patch_embed.bias"]}
    for i in range(len(encoder.blocks)):
        for key in BLOCK_KEYS:
            out[f"{prefix}blocks.{i}.{key}"] = sd[f"blocks.{i}.{key}"]
        q, _, v = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        out[f"{prefix}blocks.{i}.attn.q_bias"], out[f"{prefix}blocks.{i}.attn.v_bias"] = q, v
    if pretrained:
        out.update({"encoder.norm.weight": sd["norm.weight"], "encoder.norm.bias": sd["norm.bias"],
                    "encoder_to_decoder.weight": torch.randn(32, 64), "mask_token": torch.zeros(1, 1, 32),
                    "decoder.blocks.0.attn.qkv.weight": torch.randn(96, 32),
                    "decoder.norm.weight": torch.ones(32), "decoder.head.weight": torch.randn(384, 32)})
    else:
        out.update({"fc_norm.weight": torch.rand(64), "fc_norm.bias": torch.rand(64),
                    "head.weight": torch.randn(num_classes, 64), "head.bias": torch.randn(num_classes),
                    "pos_embed": torch.randn(1, 2 * 4 * 4, 64)})
    return out


def test_pretrained_layout_loads_every_encoder_key(tmp_path):
    source = source_encoder()
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": videomae_state(source)}, path)
    encoder, config, head, report = load_videomae_encoder(
        path, **{k: SIZE[k] for k in ("img_size", "num_frames")}, source_num_frames=4, source_img_size=32,
        num_heads=4)
    assert report.layout == "pretrain" and report.missing == [] and report.offending == []
    assert len(report.ignored) == 5 and head == {}
    assert config["embed_dim"] == 64 and config["depth"] == 2 and config["patch_size"] == 8
    ours, theirs = encoder.state_dict(), source.state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    # same weights + VideoMAE's 1-D table -> the same function as the source with that table
    table = videomae_sincos_table(2 * 4 * 4, 64)
    assert torch.equal(encoder.pos_embed((2, 4, 4)), table)
    source.pos_embed = TablePosEmbed(table, (2, 4, 4))
    x = torch.rand(2, 3, 4, 32, 32)
    torch.testing.assert_close(encoder.eval()(x), source.eval()(x))


def test_pretrained_layout_under_mean_pooling_drops_norm_and_starts_fc_norm_afresh(tmp_path):
    """As VideoMAE fine-tunes a pre-trained checkpoint (use_mean_pooling, non-strict load): the encoder's
    final norm becomes an identity and fc_norm starts at (1, 0); final_norm=True keeps the loaded norm."""
    source = source_encoder()
    with torch.no_grad():
        source.norm.weight.normal_()
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": videomae_state(source)}, path)
    size = dict(img_size=32, num_frames=4, source_num_frames=4, source_img_size=32, num_heads=4)
    encoder, _, head, report = load_videomae_encoder(path, **size)
    assert "norm.weight" in report.matched and torch.equal(encoder.norm.weight, source.norm.weight)
    model = VideoClassifier(encoder, 3, input_norm="imagenet")
    load_head(model, head, report)
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    assert torch.equal(model.fc_norm.weight, torch.ones(64))  # fresh
    assert torch.equal(model.fc_norm.bias, torch.zeros(64))
    kept = VideoClassifier(load_videomae_encoder(path, **size)[0], 3, final_norm=True)
    assert torch.equal(kept.encoder.norm.weight, source.norm.weight)


def test_finetuned_layout_with_head_pos_table_and_new_grid(tmp_path):
    source = source_encoder()
    state = videomae_state(source, pretrained=False)
    path = tmp_path / "videomae_ft.pth"
    torch.save({"module": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-saved
    encoder, _, head, report = load_videomae_encoder(path, img_size=48, num_frames=8, source_num_frames=4,
                                                     source_img_size=32, num_heads=4)
    assert report.layout == "finetuned" and report.offending == [] and "pos_embed" in report.matched
    assert isinstance(encoder.norm, torch.nn.Identity) and encoder.grid == (4, 6, 6)
    table = encoder.pos_embed((4, 6, 6)).view(4, 6, 6, 64)
    stored = state["pos_embed"].view(2, 4, 4, 64)
    torch.testing.assert_close(table[0, 0, 0], stored[0, 0, 0])  # corners kept by the interpolation
    torch.testing.assert_close(table[-1, -1, -1], stored[-1, -1, -1])
    model = VideoClassifier(encoder, 3, input_norm="imagenet")
    load_head(model, head, report)
    assert torch.equal(model.head.weight, state["head.weight"])
    assert torch.equal(model.fc_norm.bias, state["fc_norm.bias"])
    other = VideoClassifier(build_encoder("tiny", **SIZE, **WIDTH), 5)
    load_head(other, head, report)
    assert not torch.equal(other.head.weight[:3], state["head.weight"]) and "5" in report.notes[-1]
    assert model(torch.rand(1, 3, 8, 48, 48)).shape == (1, 3)


def test_mismatched_checkpoint_lists_the_offending_keys():
    state = videomae_state(source_encoder())
    state["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(10, 4)
    state["encoder.blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    del state["encoder.blocks.1.norm2.weight"]
    with pytest.raises(VideoMAEConversionError) as err:
        load_videomae_encoder_from_state(state)
    message = str(err.value)
    for key in ("encoder.blocks.0.attn.relative_position_bias_table", "blocks.1.mlp.fc1.weight: (100, 64)",
                "blocks.1.norm2.weight"):
        assert key in message
    assert "missing: blocks.1.norm2.weight" in message


def test_deeper_checkpoint_is_rejected_not_truncated():
    state = videomae_state(source_encoder())
    with pytest.raises(VideoMAEConversionError, match="blocks.1"):
        load_videomae_encoder_from_state(state, depth=1)


def load_videomae_encoder_from_state(state, **overrides):
    from models.videomae_convert import convert_videomae

    config = videomae_encoder_config(state, img_size=32, num_frames=4, num_heads=4, **overrides)
    return convert_videomae(state, build_encoder(**config), source_num_frames=4, source_img_size=32)


def test_config_of_published_vit_b_shapes():
    with torch.device("meta"):
        state = {"encoder.patch_embed.proj.weight": torch.empty(768, 3, 2, 16, 16),
                 **{f"encoder.blocks.{i}.mlp.fc1.weight": torch.empty(3072, 768) for i in range(12)}}
    config = videomae_encoder_config(state, img_size=224, num_frames=16)
    assert ((config["name"], config["embed_dim"], config["depth"], config["num_heads"])
            == ("base", 768, 12, 12))
    assert (config["patch_size"], config["tubelet_size"], config["mlp_ratio"]) == (16, 2, 4.0)
    with pytest.raises(VideoMAEConversionError, match="heads"):
        videomae_encoder_config({"patch_embed.proj.weight": torch.empty(96, 3, 2, 16, 16)}, img_size=224,
                                num_frames=16)


def test_videomae_table_is_the_transformer_sinusoid():
    table = videomae_sincos_table(10, 8)
    for pos in (0, 3, 9):
        for j in range(8):
            angle = pos / 10000 ** (2 * (j // 2) / 8)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6)


def test_unreadable_layouts_are_rejected(tmp_path):
    with pytest.raises(VideoMAEConversionError, match="no tensor state dict"):
        read_videomae_state({"epoch": 3, "args": "x"})
    path = tmp_path / "x.pth"
    torch.save({"model": {"something.else": torch.zeros(2)}}, path)
    with pytest.raises(VideoMAEConversionError, match="patch embedding"):
        load_videomae_encoder(path, img_size=32, num_frames=4)


# ----------------------------------------------------------------------------- ours -> VideoMAE
def test_encoder_export_uses_the_names_the_loader_reads_and_round_trips(tmp_path):
    """The pre-trained layout written from our encoder (k bias zero: nothing dropped) loads back with zero
    missing keys, the same tensors, and our position table as pos_embed: the same function."""
    torch.manual_seed(2)
    source = build_encoder("tiny", **SIZE, **WIDTH, init_values=0.1)  # layer scales: gamma_1 / gamma_2
    with torch.no_grad():
        for block in source.blocks:
            block.attn.qkv.bias.normal_()
            block.attn.qkv.bias[64:128] = 0
    state, notes = videomae_encoder_state(source)
    assert all(key.startswith("encoder.") for key in state)
    assert {"encoder.patch_embed.proj.weight", "encoder.blocks.0.gamma_1", "encoder.blocks.1.attn.q_bias",
            "encoder.blocks.1.attn.v_bias", "encoder.norm.weight", "encoder.pos_embed"} <= set(state)
    assert not any("qkv.bias" in key or "ls1" in key for key in state) and len(notes) == 1  # no k bias note
    path = tmp_path / "exported.pth"
    torch.save({"model": state}, path)
    encoder, config, head, report = load_videomae_encoder(path, img_size=32, num_frames=4, num_heads=4,
                                                          source_num_frames=4, source_img_size=32)
    assert report.layout == "pretrain" and report.offending == [] and report.ignored == [] and head == {}
    assert config["init_values"] is not None and "pos_embed" in report.matched
    ours = encoder.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert torch.equal(encoder.pos_embed(encoder.grid), source.pos_embed(source.grid))
    x = torch.rand(2, 3, 4, 32, 32)
    assert torch.equal(encoder.eval()(x), source.eval()(x))


def test_classifier_export_round_trips_to_the_same_logits(tmp_path):
    """A fine-tuned-layout export of a classifier with a non-zero k bias: the k bias is dropped (noted),
    everything else loads back as it was, and the logits agree (softmax ignores a per-query shift)."""
    torch.manual_seed(3)
    model = VideoClassifier(build_encoder("tiny", **SIZE, **WIDTH), 5, input_norm="imagenet",
                            head_init_scale=1.0)
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.attn.qkv.bias.normal_()  # k bias too
        model.fc_norm.weight.normal_()
    state, notes = videomae_classifier_state(model)
    assert {"fc_norm.weight", "head.bias", "pos_embed", "blocks.0.attn.q_bias"} <= set(state)
    assert not any(key.startswith(("encoder.", "norm.")) for key in state)  # no final norm: mean pooling
    assert any("k bias is dropped" in note for note in notes)
    path = tmp_path / "classifier.pth"
    torch.save({"model": state, "mam2": {"format": "mam2.classifier"}}, path)
    back, _, report = load_videomae_classifier(path, img_size=32, num_frames=4, source_num_frames=4,
                                               source_img_size=32, num_heads=4)
    assert report.layout == "finetuned" and report.offending == [] and back.num_classes == 5
    assert isinstance(back.encoder.norm, torch.nn.Identity) and back.input_norm == "imagenet"
    for key in ("head.weight", "fc_norm.weight", "encoder.blocks.1.mlp.fc2.weight"):
        assert torch.equal(back.state_dict()[key], model.state_dict()[key]), key
    x = torch.rand(2, 3, 4, 32, 32)
    torch.testing.assert_close(back(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(VideoMAEConversionError, match="no classification head"):
        torch.save({"model": videomae_encoder_state(build_encoder("tiny", **SIZE, **WIDTH))[0]},
                   tmp_path / "enc.pth")
        load_videomae_classifier(tmp_path / "enc.pth", img_size=32, num_frames=4, source_num_frames=4,
                                 source_img_size=32, num_heads=4)
