"""Video ViT encoder: token order, visible-only encoding, SDPA, named sizes, position tables."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath

from models.masking import tube_mask
from models.video_vit import (
    ENCODER_SIZES,
    build_encoder,
    interpolate_pos_table,
    patchify,
    scatter_tokens,
    sincos_pos_table,
    split_tokens,
    take_tokens,
    unpatchify,
)


def small_encoder(**kw):
    return build_encoder("tiny", img_size=32, num_frames=8, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                         **kw)


def test_patchify_order_matches_conv3d_tokens():
    enc = small_encoder()
    x = torch.randn(2, 3, 8, 32, 32)
    tokens = rearrange(enc.patch_embed(x), "b d t h w -> b (t h w) d")
    weight = rearrange(enc.patch_embed.weight, "d c pt ph pw -> d (pt ph pw c)")
    expected = patchify(x, 2, 8) @ weight.T + enc.patch_embed.bias
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(unpatchify(patchify(x, 2, 8), (4, 4, 4), 2, 8), x)


def test_split_take_scatter_roundtrip():
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    split = split_tokens(mask)
    assert (split.visible.tolist() == [[1, 3, 4], [0, 4, 5]]
            and split.masked.tolist() == [[0, 2, 5], [1, 2, 3]])
    got = take_tokens(x, split.masked)
    assert got.shape == (2, 3, 5) and torch.equal(got[1], x[1, 1:4])
    assert torch.equal(scatter_tokens(got, split.masked, 6)[mask], x[mask])
    with pytest.raises(ValueError, match="same number"):
        split_tokens(torch.tensor([[True, False], [True, True]]))


def test_encoder_shapes_and_visible_tokens_only():
    torch.manual_seed(0)
    enc = small_encoder().eval()
    x = torch.randn(2, 3, 8, 32, 32)
    assert enc(x).shape == (2, 64, 64)
    mask = tube_mask(2, enc.grid, 0.75, generator=torch.Generator().manual_seed(0))
    out = enc(x, mask)
    assert out.shape == (2, 64 - 48, 64)
    # the masked tubelets' content must not reach the output
    noise = unpatchify(patchify(torch.randn_like(x), 2, 8) * mask[..., None], enc.grid, 2, 8)
    torch.testing.assert_close(enc(x + noise, mask), out)
    with pytest.raises(ValueError, match="same number"):
        enc(x, torch.stack([mask[0], torch.zeros_like(mask[0])]))


def test_encoder_attention_goes_through_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    enc = small_encoder()
    enc(torch.randn(1, 3, 8, 32, 32))
    assert len(calls) == 2  # one per block


def test_named_sizes_build_on_meta():
    with torch.device("meta"):
        base = build_encoder("base")
        large = build_encoder("large")
    assert base.num_patches == 1568 and base.grid == (8, 14, 14)
    n_base = sum(p.numel() for p in base.parameters())
    assert 85.5e6 < n_base < 87e6  # VideoMAE ViT-B: 86.2M
    assert 300e6 < sum(p.numel() for p in large.parameters()) < 310e6
    for name, cfg in ENCODER_SIZES.items():
        with torch.device("meta"):
            enc = build_encoder(name, depth=1)
        assert enc.embed_dim == cfg["embed_dim"] and enc.num_heads == cfg["num_heads"]
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("huge")


def test_drop_path_rises_linearly():
    enc = small_encoder(drop_path_rate=0.2)
    assert isinstance(enc.blocks[1].drop_path1, DropPath)
    assert enc.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    assert not isinstance(enc.blocks[0].drop_path1, DropPath)


def test_position_table_is_regenerated_for_other_grids():
    enc = small_encoder().eval()  # built for a (4, 4, 4) grid
    x = torch.randn(1, 3, 4, 48, 40)  # (2, 6, 5) grid
    assert enc(x).shape == (1, 2 * 6 * 5, 64)
    small, big = sincos_pos_table((4, 4, 4), 66), sincos_pos_table((2, 6, 5), 66)
    small = rearrange(small, "(t h w) d -> t h w d", t=4, h=4)
    big = rearrange(big, "(t h w) d -> t h w d", t=2, h=6)
    torch.testing.assert_close(big[:2, :4, :4], small[:2, :4, :4])  # same code for the same tubelet
    assert torch.equal(enc.pos_embed((4, 4, 4)), enc.pos_embed.table)


def test_interpolate_pos_table():
    old = (2, 3, 4)
    table = torch.randn(2 * 3 * 4, 16)
    torch.testing.assert_close(interpolate_pos_table(table, old, old), table)
    new = (3, 5, 7)  # 2n - 1 along every axis: old rows land on even indices
    out = interpolate_pos_table(table[None], old, new)
    assert out.shape == (1, 3 * 5 * 7, 16)
    grid_new = rearrange(out[0], "(t h w) d -> t h w d", t=3, h=5)
    grid_old = rearrange(table, "(t h w) d -> t h w d", t=2, h=3)
    torch.testing.assert_close(grid_new[::2, ::2, ::2], grid_old)
    torch.testing.assert_close(grid_new[1, 0, 0], (grid_old[0, 0, 0] + grid_old[1, 0, 0]) / 2)
