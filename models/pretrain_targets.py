"""Per-token regression and classification targets of masked video pre-training.

Every function maps a dense video-shaped tensor to tokens in the encoder's (t h w) order, one row per
tubelet, with features ordered (pt ph pw c) as ``models.video_vit.patchify`` lays them out.

Conventions (the model's ``targets`` dict):

- ``pixels`` / the clip: (B, C, T, H, W) float. VideoMAE normalises each tubelet per channel, so any
  per-channel affine scaling of the input (``[0, 1]`` or mean/std-normalised) gives the same target up to
  the 1e-6 epsilon.
- ``rgb_diff``: (B, C, T-1, H, W), float or int (stored int16 ``frame[t+1] - frame[t]``; its scale does not
  matter after normalisation). Difference ``t`` belongs to frame ``t`` (the motion from frame t to t+1), so
  a tubelet over frames [s, s+tubelet) takes differences s .. s+tubelet-1. The last frame of the clip has no
  next frame: its slot is padded with zeros and *excluded* from the per-tubelet statistics and from the
  loss (``motion_target`` returns a validity mask), rather than asking the model to predict a made-up zero.
- ``codes``: (B, T, H/f, W/f) long VQGAN indices of every frame (f = tokenizer down-sampling). A tubelet
  covers ``tubelet * (patch/f)^2`` codes: one per frame when patch = f (f16 VQGAN, 16 px patches),
  (patch/f)^2 per frame when patch is a multiple k*f. patch < f is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from models.video_vit import patchify


def _as_float(x: Tensor) -> Tensor:
    """At least float32: integers and half precision are promoted, float64 is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalize_patches(tokens: Tensor, channels: int = 3, valid: Tensor | None = None,
                      eps: float = 1e-6, min_std: float = 0.0) -> Tensor:
    """Per tubelet and channel: (x - mean) / (max(unbiased std, min_std) + eps) over the tubelet's voxels.

    tokens (B, N, L*C) with features (l c); ``valid`` (N, L) or (B, N, L) bool restricts the statistics to
    the valid voxels and zeroes the invalid ones. ``min_std`` (in the tokens' units) keeps a near-constant
    tubelet from being scaled up to unit variance. Returns the input's shape in float32 (float64 stays).
    """
    x = rearrange(_as_float(tokens), "b n (l c) -> b n l c", c=channels)
    if valid is None:
        mean = x.mean(dim=2, keepdim=True)
        std = x.var(dim=2, unbiased=True, keepdim=True).sqrt()
        out = (x - mean) / (std.clamp_min(min_std) + eps)
    else:
        v = valid.to(x.dtype)[..., None]  # (N, L, 1) or (B, N, L, 1): reduce over L = dim -2 for both
        n = v.sum(dim=-2, keepdim=True)
        mean = (x * v).sum(dim=-2, keepdim=True) / n.clamp_min(1)
        var = ((x - mean) ** 2 * v).sum(dim=-2, keepdim=True) / (n - 1).clamp_min(1)
        out = (x - mean) / (var.sqrt().clamp_min(min_std) + eps) * v
    return rearrange(out, "b n l c -> b n (l c)")


def pixel_target(clip: Tensor, tubelet_size: int, patch_size: int, normalize: bool = True) -> Tensor:
    """VideoMAE target: clip (B, C, T, H, W) -> (B, N, tubelet*patch^2*C), normalised per tubelet."""
    tokens = patchify(_as_float(clip), tubelet_size, patch_size)
    return normalize_patches(tokens, clip.shape[1]) if normalize else tokens


def motion_target(rgb_diff: Tensor, tubelet_size: int, patch_size: int,
                  normalize: bool = True, min_std: float = 0.0) -> tuple[Tensor, Tensor]:
    """MAM2 motion target from frame differences (B, C, T-1, H, W).

    Returns ``(target, valid)``: target (B, N, tubelet*patch^2*C) float32, normalised per tubelet and channel
    over its valid voxels; valid (N, tubelet*patch^2*C) bool, False on the zero-padded last frame.
    ``min_std`` (in rgb_diff's units) floors the per-tubelet std: a still tubelet's differences are codec
    noise, and scaling them to unit variance would weigh them as much as real motion.
    """
    c, t = rgb_diff.shape[1], rgb_diff.shape[2] + 1
    if t % tubelet_size:
        raise ValueError(f"rgb_diff has {t - 1} frames: a clip of {t} frames is not a whole number of "
                         f"tubelets")
    diff = F.pad(_as_float(rgb_diff), (0, 0, 0, 0, 0, 1))  # (B, C, T, H, W): zero slot for the last frame
    hp, wp = diff.shape[3] // patch_size, diff.shape[4] // patch_size
    frame_valid = torch.arange(t, device=diff.device) < t - 1  # (T,)
    valid = repeat(frame_valid, "(tt pt) -> (tt h w) (pt ph pw)", pt=tubelet_size, h=hp, w=wp,
                   ph=patch_size, pw=patch_size)  # (N, L)
    tokens = patchify(diff, tubelet_size, patch_size)
    if normalize:
        tokens = normalize_patches(tokens, c, valid, min_std=min_std)
    return tokens, repeat(valid, "n l -> n (l c)", c=c)


def codes_per_token(tubelet_size: int, patch_size: int, downsample: int) -> int:
    """Codes under one tubelet: tubelet * (patch/f)^2."""
    if patch_size % downsample:
        raise ValueError(f"patch size {patch_size} must be a multiple of the tokenizer's down-sampling "
                         f"{downsample}")
    return tubelet_size * (patch_size // downsample) ** 2


def code_target(codes: Tensor, tubelet_size: int, patch_size: int, downsample: int) -> Tensor:
    """Appearance target: codes (B, T, H/f, W/f) -> (B, N, tubelet*(patch/f)^2) long, ordered (pt ph pw)."""
    codes_per_token(tubelet_size, patch_size, downsample)
    k = patch_size // downsample
    return rearrange(codes.long(), "b (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw)", pt=tubelet_size,
                     ph=k, pw=k)
