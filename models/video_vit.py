"""Video ViT encoder over space-time tubelets (VideoMAE's backbone), plus token helpers.

A clip (B, C, T, H, W) is cut into non-overlapping tubelets of ``tubelet x patch x patch`` voxels by a
Conv3d whose kernel equals its stride; tokens are laid out in (t h w) order, the order ``Conv3d``'s
output flattens to and the order ``patchify`` uses, so token ``i`` of the encoder, of a mask and of a
target always refer to the same tubelet.

Position table: a fixed 3-D sin-cos table (separate sin-cos codes for the t, h and w coordinates,
concatenated), not VideoMAE's 1-D table over the flattened index. The 3-D table is a function of the
tubelet's integer (t, h, w) coordinates only, so a tubelet keeps the same code when the clip has more or
fewer frames or pixels: the table is simply regenerated for any grid (VideoMAE's 1-D table changes meaning
with the grid, the fine-tuning problem its users report). ``interpolate_pos_table`` resamples any (N, D)
table laid out in (t h w) order (e.g. a 1-D table from an outside checkpoint) to another grid.

Attention runs through ``F.scaled_dot_product_attention``: timm's ``Attention`` does so when its
``fused_attn`` flag is set, which ``enable_sdpa`` forces regardless of the TIMM_FUSED_ATTN environment.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

Grid = tuple[int, int, int]  # (T', H', W'): tubelets along time, height, width

# name -> width, depth, heads (ViT-T/S/B/L); img/frame/patch sizes are given to build_encoder
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
# Per-channel RGB statistics of ImageNet: VideoMAE normalises its inputs with them in pre-training and
# fine-tuning alike, and so do MAM2 and the classifier here (the encoder checkpoint records which).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

# name -> the pre-training heads at paper scale: decoders as VideoMAE sizes them (ViT-S 192/4/3, ViT-B
# 384/4/6, ViT-L 512/4/8; ViT-T by the same rule, half the width at 32 dims a head) and the CAE-style
# regressor of 4 blocks. A smaller demo model writes its shrinkage in params.yaml.
HEAD_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(decoder_dim=96, decoder_depth=4, decoder_heads=3, regressor_depth=4),
    "small": dict(decoder_dim=192, decoder_depth=4, decoder_heads=3, regressor_depth=4),
    "base": dict(decoder_dim=384, decoder_depth=4, decoder_heads=6, regressor_depth=4),
    "large": dict(decoder_dim=512, decoder_depth=4, decoder_heads=8, regressor_depth=4),
}


# ----------------------------------------------------------------------------- token helpers
def grid_size(num_frames: int, height: int, width: int, tubelet_size: int, patch_size: int) -> Grid:
    """Tubelet grid (T', H', W') of a clip; raises if the clip is not a whole number of tubelets."""
    if num_frames % tubelet_size or height % patch_size or width % patch_size:
        raise ValueError(
            f"clip of {num_frames}x{height}x{width} (T x H x W) is not divisible into "
            f"{tubelet_size}x{patch_size}x{patch_size} tubelets"
        )
    return num_frames // tubelet_size, height // patch_size, width // patch_size


def patchify(video: Tensor, tubelet_size: int, patch_size: int) -> Tensor:
    """(B, C, T, H, W) -> (B, N, tubelet*patch*patch*C), features ordered (pt ph pw c)."""
    return rearrange(
        video, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=tubelet_size, ph=patch_size,
        pw=patch_size
    )


def unpatchify(tokens: Tensor, grid: Grid, tubelet_size: int, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of ``patchify``: (B, N, tubelet*patch*patch*C) -> (B, C, T, H, W)."""
    t, h, w = grid
    return rearrange(
        tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
        t=t, h=h, w=w, pt=tubelet_size, ph=patch_size, pw=patch_size, c=channels,
    )


class TokenSplit(NamedTuple):
    """Token indices of a mask: ``visible`` (B, V) and ``masked`` (B, M), each in ascending token order."""

    visible: Tensor
    masked: Tensor


def split_tokens(mask: Tensor, num_tokens: int | None = None) -> TokenSplit:
    """Split a (B, N) bool mask (True = masked) into token indices; one host sync per call.

    Every sample must mask the same number of tokens, so the visible (or masked) tokens of a batch gather
    into a dense tensor. Index gathers avoid boolean indexing, which syncs the device at every use.
    """
    if mask.dtype != torch.bool or mask.dim() != 2 or (num_tokens is not None
                                                       and mask.shape[1] != num_tokens):
        want = f"(B, {num_tokens})" if num_tokens is not None else "(B, N)"
        raise ValueError(f"mask must be bool of shape {want}, got {mask.dtype} {tuple(mask.shape)}")
    counts = mask.sum(1).tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"every sample must mask the same number of tokens, got counts {counts}")
    n_vis = mask.shape[1] - (counts[0] if counts else 0)
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible (0) first, token order kept
    return TokenSplit(order[:, :n_vis], order[:, n_vis:])


def take_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Tokens ``ids`` (B, K) of a batch x (B, N, ...) -> (B, K, ...). (For an (N, ...) table:
    ``table[ids]``.)"""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, ids]


def scatter_tokens(values: Tensor, ids: Tensor, num_tokens: int, fill: float = 0.0) -> Tensor:
    """Inverse of ``take_tokens``: (B, K, P) placed at token indices ``ids`` (B, K) of a (B, N, P) tensor."""
    out = values.new_full((values.shape[0], num_tokens, *values.shape[2:]), fill)
    out[torch.arange(values.shape[0], device=values.device)[:, None], ids] = values
    return out


# ----------------------------------------------------------------------------- position tables
def _sincos_1d(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(N,) float coordinates -> (N, dim) [sin | cos] codes at geometrically spaced frequencies."""
    omega = temperature ** (-torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim // 2))
    angle = pos.double()[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_pos_table(grid: Grid, dim: int) -> Tensor:
    """Fixed 3-D sin-cos table (T'*H'*W', dim) in (t h w) token order.

    Each spatial axis gets 2*(dim//6) channels and time the rest (1024 = 344 + 340 + 340), so any even
    width works. Entry (t, h, w) depends only on those integers, so tables of different grids agree on
    the positions they share.
    """
    if dim % 2:
        raise ValueError(f"sin-cos position table needs an even width, got {dim}")
    d_hw = 2 * (dim // 6)
    d_t = dim - 2 * d_hw
    t, h, w = (torch.arange(n, dtype=torch.float64) for n in grid)
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.cat(
        [_sincos_1d(tt.flatten(), d_t), _sincos_1d(hh.flatten(), d_hw), _sincos_1d(ww.flatten(), d_hw)], dim=1
    )


def interpolate_pos_table(table: Tensor, old_grid: Grid, new_grid: Grid) -> Tensor:
    """Resample a (N, D) or (1, N, D) table laid out in (t h w) order from ``old_grid`` to ``new_grid``.

    Trilinear with aligned corners: the corner tubelets keep their codes exactly and a grid of 2n-1 along
    an axis reproduces the old rows at even indices. Meant for tables loaded from elsewhere (a learnt or
    1-D VideoMAE table); this module's own sin-cos table is regenerated instead.
    """
    squeeze = table.dim() == 2
    t, h, w = old_grid
    vol = rearrange(table.reshape(-1, table.shape[-1]), "(t h w) d -> 1 d t h w", t=t, h=h, w=w)
    vol = F.interpolate(vol.float(), size=tuple(new_grid), mode="trilinear", align_corners=True)
    out = rearrange(vol, "1 d t h w -> (t h w) d").to(table.dtype)
    return out if squeeze else out[None]


class SinCosPosEmbed(nn.Module):
    """Fixed sin-cos table: cached for the default grid (non-persistent buffer), regenerated for others."""

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.register_buffer("table", sincos_pos_table(self.grid, dim), persistent=False)

    def forward(self, grid: Grid) -> Tensor:
        """(N, dim) table for ``grid``."""
        if tuple(grid) == self.grid:
            return self.table
        return sincos_pos_table(tuple(grid), self.dim).to(self.table.device)


# ----------------------------------------------------------------------------- encoder
def enable_sdpa(module: nn.Module) -> nn.Module:
    """Make every timm ``Attention`` in ``module`` use ``F.scaled_dot_product_attention``."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused_attn = True
    return module


def init_weights(m: nn.Module) -> None:
    """VideoMAE/MAE init: xavier-uniform Linear (and Conv3d, seen as a Linear), zero bias, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Conv3d)):
        w = m.weight
        fan_out, fan_in = w.shape[0], math.prod(w.shape[1:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(w, -bound, bound)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                init_values: float | None = None) -> nn.ModuleList:
    """``depth`` pre-norm timm Blocks (qkv bias, LayerNorm eps 1e-6), drop path rising linearly to the
    rate."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # python: meta-device safe
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values, drop_path=r,
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for r in rates
    )
    return enable_sdpa(blocks)


class VideoViT(nn.Module):
    """ViT over tubelets. ``forward(x, mask)`` encodes only the visible tokens when a mask is given."""

    def __init__(self, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 init_values: float | None = None) -> None:
        super().__init__()
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.grid = grid_size(num_frames, img_size, img_size, tubelet_size, patch_size)
        kernel = (tubelet_size, patch_size, patch_size)
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)
        self.pos_embed = SinCosPosEmbed(embed_dim, self.grid)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, init_values)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)

    @property
    def num_patches(self) -> int:
        """Tokens of a clip at the configured size (1568 for 16 x 224^2 with 2x16x16 tubelets)."""
        return math.prod(self.grid)

    def grid_for(self, x: Tensor) -> Grid:
        """Tubelet grid of a clip (B, C, T, H, W) of any size."""
        return grid_size(*x.shape[2:], self.tubelet_size, self.patch_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W); mask (B, N) bool, True = masked (dropped). Returns (B, N_visible, D)."""
        keep = None if mask is None else split_tokens(mask, math.prod(self.grid_for(x))).visible
        return self.encode(x, keep)

    def encode(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encode only the tokens ``keep`` (B, K) (all when None): (B, C, T, H, W) -> (B, K, D)."""
        grid = self.grid_for(x)
        x = rearrange(self.patch_embed(x), "b d t h w -> b (t h w) d")
        x = x + self.pos_embed(grid).to(x.dtype)
        if keep is not None:
            x = take_tokens(x, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def build_encoder(name: str, img_size: int = 224, num_frames: int = 16, patch_size: int = 16,
                  tubelet_size: int = 2, **kw) -> VideoViT:
    """Encoder of a named size (``ENCODER_SIZES``); ``kw`` overrides any VideoViT argument."""
    if name not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder size {name!r}; choose one of {sorted(ENCODER_SIZES)}")
    cfg = {**ENCODER_SIZES[name], **kw}
    return VideoViT(img_size=img_size, num_frames=num_frames, patch_size=patch_size,
                    tubelet_size=tubelet_size, **cfg)


__all__ = [
    "ENCODER_SIZES", "HEAD_SIZES", "IMAGENET_MEAN", "IMAGENET_STD", "INPUT_NORMS", "Grid", "SinCosPosEmbed",
    "TokenSplit", "VideoViT", "build_encoder", "enable_sdpa", "grid_size", "init_weights",
    "interpolate_pos_table", "make_blocks", "patchify", "scatter_tokens", "sincos_pos_table",
    "split_tokens", "take_tokens", "unpatchify",
]
