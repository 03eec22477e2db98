"""The heads on top of the video encoder: MAM2's CAE-style latent regressor and the prediction decoders.

Regressor (CAE's, Chen et al. 2022): queries for the masked tubelets start as one learnable mask token;
each block lets them cross-attend to keys/values = [visible latents ; queries], adding the fixed position
table to queries and keys. Only the queries are updated: the visible latents come from the encoder
unchanged into every block, so the encoder alone must carry the representation. Residual branches use
layer-scale (0.1) so the regressor starts near identity.

The block's layout is a switch (``block``), because the MAM2 paper says only that its regressor follows
CAE and confirms neither layout:

- ``"cae"`` (the default: it beat ``"prenorm"`` on every seed of ``recipes/mam2_ablations.py``), CAE's
  released ``RegressorBlock``: after the attention residual, the query stream itself is
  normalised (``norm2``) and the MLP residual is added to the normalised stream,
  ``q = q + g1 * attn(...); q = norm2(q); q = q + g2 * mlp(q)``;
- ``"prenorm"``, this project's first version (a standard pre-norm Transformer branch):
  ``q = q + g1 * attn(...); q = q + g2 * mlp(norm2(q))``.

Both have the same parameters (names and shapes), so only the forward differs.

Decoder: ``depth`` timm blocks at a narrow width, LayerNorm, Linear to the per-token prediction. It runs
VideoMAE-style (visible latents + mask tokens, predictions read off the mask tokens) or on the regressor's
predicted latents of the masked tubelets only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from models.video_vit import Grid, SinCosPosEmbed, TokenSplit, init_weights, make_blocks


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, M, D) over keys/values (B, L, D) via scaled-dot-product
    attention."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)  # a key bias shifts every logit of a query equally: useless
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, M, D), k and v (B, L, D) -> (B, M, D)."""
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.num_heads) for f, x in
                   ((self.q, q), (self.k, k), (self.v, v)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


REGRESSOR_BLOCKS = ("cae", "prenorm")


class RegressorBlock(nn.Module):
    """Cross-attention + MLP on the queries only, layer-scaled residuals; ``layout`` "cae" or "prenorm"
    places the second norm (module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.1,
                 drop_path: float = 0.0, layout: str = "cae") -> None:
        super().__init__()
        if layout not in REGRESSOR_BLOCKS:
            raise ValueError(f"unknown regressor block {layout!r}; choose one of {list(REGRESSOR_BLOCKS)}")
        self.layout = layout
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), init_values))
        self.gamma2 = nn.Parameter(torch.full((dim,), init_values))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, q: Tensor, pos_q: Tensor, latents: Tensor, pos_vis: Tensor) -> Tensor:
        """q, pos_q (B, M, D): queries of masked tubelets; latents, pos_vis (B, V, D): visible tubelets."""
        kv = torch.cat([latents, q], dim=1)  # (B, V+M, D)
        pos_kv = torch.cat([pos_vis, pos_q], dim=1)
        a = self.attn(self.norm_q(q + pos_q), self.norm_k(kv + pos_kv), self.norm_v(kv))
        q = q + self.drop_path(self.gamma1 * a)
        if self.layout == "cae":  # CAE: the stream itself is normalised, then the MLP residual added
            q = self.norm2(q)
            return q + self.drop_path(self.gamma2 * self.mlp(q))
        return q + self.drop_path(self.gamma2 * self.mlp(self.norm2(q)))


class Regressor(nn.Module):
    """Predicts the encoder-space latents of masked tubelets from the visible ones (B, V, D) -> (B, M, D)."""

    def __init__(self, dim: int, depth: int = 4, num_heads: int = 12, mlp_ratio: float = 4.0,
                 init_values: float = 0.1, drop_path_rate: float = 0.0, block: str = "cae") -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # python: meta-device safe
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, mlp_ratio, init_values, r, layout=block)
                                    for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latents: Tensor, pos_vis: Tensor, pos_mask: Tensor) -> Tensor:
        """latents (B, V, D) with positions pos_vis (B, V, D); pos_mask (B, M, D) of the masked tubelets."""
        q = self.mask_token.expand(pos_mask.shape[0], pos_mask.shape[1], -1).to(latents.dtype)
        for blk in self.blocks:
            q = blk(q, pos_mask, latents, pos_vis)
        return self.norm(q)


class Decoder(nn.Module):
    """Linear in_dim -> dim (no bias), blocks at ``dim``, LayerNorm, Linear -> ``out_dim`` per token.

    ``from_visible`` picks the input mode once: the learnable mask token exists only in the VideoMAE mode,
    so no parameter goes unused (DDP requires every parameter to receive a gradient).
    """

    def __init__(self, in_dim: int, out_dim: int, grid: Grid, dim: int = 384, depth: int = 4,
                 num_heads: int = 6, mlp_ratio: float = 4.0, from_visible: bool = True) -> None:
        super().__init__()
        self.from_visible = from_visible
        self.proj = nn.Linear(in_dim, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if from_visible else None
        self.pos_embed = SinCosPosEmbed(dim, grid)
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, split: TokenSplit, grid: Grid) -> Tensor:
        """Predictions (B, M, out_dim) for the masked tubelets ``split.masked``, in token order.

        from_visible=True: x (B, V, in_dim) are the encoder's visible latents; mask tokens are appended
        (VideoMAE). False: x (B, M, in_dim) are predicted latents of the masked tubelets (regressor).
        """
        pos = self.pos_embed(grid).to(x.dtype)  # (N, dim)
        pos_mask = pos[split.masked]  # (B, M, dim)
        if self.from_visible:
            queries = self.mask_token.to(x.dtype) + pos_mask
            x = torch.cat([self.proj(x) + pos[split.visible], queries], dim=1)  # (B, V+M, dim)
        else:
            x = self.proj(x) + pos_mask
        for blk in self.blocks:
            x = blk(x)
        m = pos_mask.shape[1]
        return self.head(self.norm(x[:, x.shape[1] - m:]))
