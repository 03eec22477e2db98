"""MAM2 pre-training model (Masked Appearance-Motion Modeling, arXiv 2210.05234) and the VideoMAE baseline.

    clip ─► encoder (visible tubelets) ─► regressor (latents of the masked tubelets)
                                            ├─► appearance decoder ─► VQGAN code logits ─► cross-entropy
                                            └─► motion decoder ─► RGB differences ─► MSE

``objective`` picks the variant (``OBJECTIVES``): ``mam2``; the ablations ``mam2_appearance`` and
``mam2_motion`` (one target), ``mam2_no_regressor`` (decoders see visible latents + mask tokens,
VideoMAE-style); and ``videomae``: one decoder on visible latents + mask tokens predicting per-tubelet
normalised pixels. Every loss is over the masked tubelets only. Same encoder, masks and data for all, so
the comparison is fair. Target conventions are in ``models.pretrain_targets``.

Beside each model metric ``forward`` returns its trivial baseline on the same masked targets:
``appearance_acc_baseline``, the accuracy of predicting the batch's most frequent masked code everywhere
(the best any constant prediction can do there), ``motion_mse_baseline`` / ``pixel_mse_baseline``, the MSE
of predicting zero (the normalised target's mean square). A model that learnt nothing scores about these.

Choices the MAM2 paper does not confirm (it says only that the regressor follows CAE) are switches:
``align_weight`` (CAE's alignment loss; CAE uses 2, off here by default) and ``regressor_block`` (CAE's
block layout, the default, or a pre-norm one; ``models.mam2_heads``). The defaults follow the ablation
(`recipes/mam2_ablations.py`, `reports/mam2_ablations.md`): CAE's block beat the pre-norm one's code
accuracy on every seed, the alignment loss lost to none on every seed.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.mam2_heads import Decoder, Regressor
from models.pretrain_targets import code_target, codes_per_token, motion_target, pixel_target
from models.video_vit import INPUT_NORMS, VideoViT, build_encoder, split_tokens, take_tokens


class Objective(NamedTuple):
    """Which heads an objective builds."""

    regressor: bool
    appearance: bool
    motion: bool
    pixels: bool


OBJECTIVES: dict[str, Objective] = {
    "mam2": Objective(regressor=True, appearance=True, motion=True, pixels=False),
    "mam2_appearance": Objective(regressor=True, appearance=True, motion=False, pixels=False),
    "mam2_motion": Objective(regressor=True, appearance=False, motion=True, pixels=False),
    "mam2_no_regressor": Objective(regressor=False, appearance=True, motion=True, pixels=False),
    "videomae": Objective(regressor=False, appearance=False, motion=False, pixels=True),
}


class MAM2(nn.Module):
    """Encoder + (regressor) + decoders; ``forward`` returns the weighted loss and its parts.

    Args:
        encoder: the ``VideoViT`` being pre-trained (kept as ``self.encoder`` for saving).
        objective: a key of ``OBJECTIVES``.
        codebook_size, code_downsample: the VQGAN's codebook size and spatial down-sampling f.
        decoder_dim, decoder_depth, decoder_heads: each decoder's width, blocks and heads (VideoMAE's
            384/4/6).
        regressor_depth, regressor_heads: CAE-style regressor at the encoder width (heads default:
            encoder's).
        layer_scale: the regressor's layer-scale init. regressor_drop_path: its stochastic depth rate.
        regressor_block: "prenorm" or "cae", the regressor block's layout (``models.mam2_heads``; the MAM2
            paper confirms neither).
        appearance_weight, motion_weight: loss weights of the two targets.
        align_weight: weight of CAE's alignment loss: MSE between the regressor's predicted latents of
            the masked tubelets and the latents the encoder itself (same weights, no gradient, final
            norm included) gives those tubelets when it sees them; gradients reach the encoder only
            through the regressor's inputs. 0 turns it and its extra encoder pass (over the masked
            tubelets, ~9x the visible ones at ratio 0.9) off; CAE uses 2; the MAM2 paper does not say
            whether it keeps it. Objectives without a regressor ignore it.
        motion_min_std: floor of the motion target's per-tubelet std, in the units of ``rgb_diff`` (a
            fraction of full scale, as the training loop passes it): codec noise stays small.
        input_norm: how the encoder's input is normalised (a key of ``INPUT_NORMS``; VideoMAE: imagenet).
            The targets are made from the clip as given, in [0, 1].
    """

    def __init__(self, encoder: VideoViT, objective: str = "mam2", *, codebook_size: int = 1024,
                 code_downsample: int = 16, decoder_dim: int = 384, decoder_depth: int = 4,
                 decoder_heads: int = 6, regressor_depth: int = 4, regressor_heads: int | None = None,
                 layer_scale: float = 0.1, regressor_block: str = "cae",
                 regressor_drop_path: float = 0.0, appearance_weight: float = 1.0, motion_weight: float = 1.0,
                 align_weight: float = 0.0, motion_min_std: float = 2 / 255,
                 input_norm: str = "imagenet") -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
        spec = self.spec = OBJECTIVES[objective]
        self.objective, self.encoder = objective, encoder
        self.codebook_size, self.code_downsample = codebook_size, code_downsample
        self.appearance_weight, self.motion_weight, self.align_weight = (appearance_weight, motion_weight,
                                                                         align_weight)
        self.motion_min_std = motion_min_std
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {sorted(INPUT_NORMS)}")
        self.input_norm = input_norm
        mean, std = INPUT_NORMS[input_norm]  # (C, 1, 1, 1) buffers broadcast over (B, C, T, H, W)
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1, 1), persistent=False)
        t, p, d = encoder.tubelet_size, encoder.patch_size, encoder.embed_dim
        voxels = t * p * p * encoder.in_chans  # values per tubelet
        self.regressor = Regressor(d, regressor_depth, regressor_heads or encoder.num_heads,
                                   init_values=layer_scale, drop_path_rate=regressor_drop_path,
                                   block=regressor_block) if spec.regressor else None
        dec = partial(Decoder, d, grid=encoder.grid, dim=decoder_dim, depth=decoder_depth,
                      num_heads=decoder_heads, from_visible=not spec.regressor)
        self.codes_per_token = codes_per_token(t, p, code_downsample) if spec.appearance else 0
        self.appearance_decoder = dec(self.codes_per_token * codebook_size) if spec.appearance else None
        self.motion_decoder = dec(voxels) if spec.motion else None
        self.pixel_decoder = dec(voxels) if spec.pixels else None

    def forward(self, clip: Tensor, mask: Tensor,
                targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """clip (B, C, T, H, W) float; mask (B, N) bool, True = masked; targets as the objective needs:

        ``codes`` (B, T, H/f, W/f) long, ``rgb_diff`` (B, C, T-1, H, W), optional ``pixels`` (B, C, T, H, W)
        for ``videomae`` (default: the clip). Returns ``loss`` (weighted sum), ``loss_appearance``,
        ``loss_motion``, ``loss_align``, ``loss_pixel`` (those in use), ``appearance_acc`` (top-1 over masked
        codes), the trivial baselines ``appearance_acc_baseline``, ``motion_mse_baseline``,
        ``pixel_mse_baseline`` (module docstring) and detached predictions for the M masked tubelets in
        token order: ``pred_codes`` (B, M, K)
        long, ``pred_motion`` / ``pred_pixels`` (B, M, tubelet*patch^2*C) in normalised-target units (place
        them with ``video_vit.scatter_tokens(pred, split_tokens(mask).masked, N)`` + ``unpatchify``).
        """
        targets = targets or {}
        enc = self.encoder
        grid = enc.grid_for(clip)
        split = split_tokens(mask, grid[0] * grid[1] * grid[2])
        inputs = (clip - self.mean.to(clip.dtype)) / self.std.to(clip.dtype)  # targets use the clip as given
        latents = enc.encode(inputs, split.visible)  # (B, V, D)
        losses: dict[str, tuple[Tensor, float]] = {}
        out: dict[str, Tensor] = {}

        if self.regressor is not None:
            pos = enc.pos_embed(grid).to(latents.dtype)  # (N, D)
            x = self.regressor(latents, pos[split.visible], pos[split.masked])  # (B, M, D)
            if self.align_weight > 0:  # CAE's alignment loss; not confirmed by the MAM2 paper
                with torch.no_grad():
                    aligned = enc.encode(inputs, split.masked)  # (B, M, D): the masked tubelets, encoded
                losses["align"] = (F.mse_loss(x.float(), aligned.float()), self.align_weight)
        else:
            x = latents  # decoders append mask tokens themselves

        if self.appearance_decoder is not None:
            codes = take_tokens(self._codes(targets, clip), split.masked)  # (B, M, K)
            logits = rearrange(self.appearance_decoder(x, split, grid), "b m (k v) -> b m k v",
                               v=self.codebook_size)
            losses["appearance"] = (F.cross_entropy(logits.float().flatten(0, 2), codes.flatten()),
                                    self.appearance_weight)
            out["pred_codes"] = logits.detach().argmax(-1)
            out["appearance_acc"] = (out["pred_codes"] == codes).float().mean()
            out["appearance_acc_baseline"] = most_frequent_accuracy(codes, self.codebook_size)

        if self.motion_decoder is not None:
            target, valid = motion_target(self._rgb_diff(targets, clip), enc.tubelet_size, enc.patch_size,
                                          min_std=self.motion_min_std)
            target, valid = take_tokens(target, split.masked), valid[split.masked]  # (B, M, P) each
            pred = self.motion_decoder(x, split, grid)
            err = (pred.float() - target) ** 2 * valid
            losses["motion"] = (err.sum() / valid.sum().clamp_min(1), self.motion_weight)
            out["pred_motion"] = pred.detach()
            out["motion_mse_baseline"] = (target.square() * valid).sum() / valid.sum().clamp_min(1)

        if self.pixel_decoder is not None:
            pixels = targets.get("pixels", clip)
            target = take_tokens(pixel_target(pixels, enc.tubelet_size, enc.patch_size),
                                 split.masked)  # (B, M, P)
            pred = self.pixel_decoder(x, split, grid)
            losses["pixel"] = (F.mse_loss(pred.float(), target), 1.0)
            out["pred_pixels"] = pred.detach()
            out["pixel_mse_baseline"] = target.square().mean()

        out["loss"] = sum(w * loss for loss, w in losses.values())
        out.update({f"loss_{name}": loss for name, (loss, _) in losses.items()})
        return out

    def _codes(self, targets: dict[str, Tensor], clip: Tensor) -> Tensor:
        """Validated per-token code indices (B, N, K)."""
        codes = _require(targets, "codes", self.objective)
        b, _, t, h, w = clip.shape
        f = self.code_downsample
        if tuple(codes.shape) != (b, t, h // f, w // f):
            raise ValueError(f"codes must be (B, T, H/f, W/f) = {(b, t, h // f, w // f)}, "
                             f"got {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise ValueError(f"codes must be integer indices in [0, {self.codebook_size})")
        # The range check reads the values back to the host: on an accelerator that would stall every step
        # (and break a compiled graph), so it runs on CPU tensors only. Codes on a GPU come from the loader,
        # which read them from a targets store whose codebook size this model was built with.
        if codes.device.type == "cpu" and not torch.compiler.is_compiling() \
                and bool((codes < 0).any() | (codes >= self.codebook_size).any()):
            raise ValueError(f"codes must be integer indices in [0, {self.codebook_size})")
        return code_target(codes, self.encoder.tubelet_size, self.encoder.patch_size, f)

    def _rgb_diff(self, targets: dict[str, Tensor], clip: Tensor) -> Tensor:
        """Validated frame differences (B, C, T-1, H, W)."""
        diff = _require(targets, "rgb_diff", self.objective)
        b, c, t, h, w = clip.shape
        if tuple(diff.shape) != (b, c, t - 1, h, w):
            raise ValueError(f"rgb_diff must be (B, C, T-1, H, W) = {(b, c, t - 1, h, w)}, "
                             f"got {tuple(diff.shape)}")
        return diff


@torch.no_grad()
def most_frequent_accuracy(codes: Tensor, codebook_size: int) -> Tensor:
    """Accuracy of predicting the most frequent of `codes` (integers in [0, codebook_size)) everywhere.

    Counted with a fixed-size scatter (no host sync, no data-dependent shape), so it runs on any device
    and inside a compiled graph."""
    flat = codes.reshape(-1)
    counts = torch.zeros(codebook_size, dtype=torch.long, device=codes.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts.max().float() / max(flat.numel(), 1)


def _require(targets: dict[str, Tensor], key: str, objective: str) -> Tensor:
    if key not in targets:
        raise KeyError(f"objective {objective!r} needs targets[{key!r}]; got keys {sorted(targets)}")
    return targets[key]


def build_mam2(encoder_name: str = "base", *, img_size: int = 224, num_frames: int = 16, patch_size: int = 16,
               tubelet_size: int = 2, encoder_kw: dict | None = None, **kw) -> MAM2:
    """``MAM2(build_encoder(encoder_name, ...), **kw)``: a named encoder size with its pre-training heads."""
    encoder = build_encoder(encoder_name, img_size, num_frames, patch_size, tubelet_size,
                            **(encoder_kw or {}))
    return MAM2(encoder, **kw)
