"""Token masks for masked video modelling: tube masking (VideoMAE, MAM2) and random masking.

A mask is a (B, N) bool tensor over the encoder's tokens in (t h w) order, True = masked (hidden from the
encoder, predicted by the decoders). Every sample masks exactly the same number of tokens, so the visible
tokens of a batch gather into a dense (B, N_visible, D) tensor. Masks are drawn on the CPU from an optional
``torch.Generator`` (deterministic for a seeded generator, whatever the device) and then moved.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

from models.video_vit import Grid

MASK_KINDS = ("tube", "random")


def num_masked(n: int, ratio: float) -> int:
    """round(ratio * n) tokens to mask (round(0.9 * 196) = 176), rejecting ratios that leave nothing
    visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * n))


def _random_rows(batch: int, n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """(batch, n) bool with exactly k True per row, uniformly at random."""
    noise = torch.rand(batch, n, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each position's rank in a random permutation
    return rank < k


def tube_mask(batch: int, grid: Grid, ratio: float = 0.9, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """Tube masking: one spatial mask of round(ratio*H'W') patches per clip, repeated on all T' slots.

    Returns (B, T'*H'*W') bool, True = masked; each clip masks round(ratio*H'W') * T' tokens.
    """
    t, h, w = grid
    spatial = _random_rows(batch, h * w, num_masked(h * w, ratio), generator)  # (B, H'W')
    return repeat(spatial, "b hw -> b (t hw)", t=t).to(device)


def random_mask(batch: int, grid: Grid, ratio: float = 0.9, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """Random masking: round(ratio*N) of the N = T'*H'*W' tokens, independently per clip. (B, N) bool."""
    n = grid[0] * grid[1] * grid[2]
    return _random_rows(batch, n, num_masked(n, ratio), generator).to(device)


def make_mask(kind: str, batch: int, grid: Grid, ratio: float = 0.9, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """Mask by name: ``"tube"`` or ``"random"`` (see ``tube_mask`` / ``random_mask``)."""
    if kind == "tube":
        return tube_mask(batch, grid, ratio, generator, device)
    if kind == "random":
        return random_mask(batch, grid, ratio, generator, device)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
