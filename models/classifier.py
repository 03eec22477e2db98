"""Action-recognition classifier over a video encoder, and its fine-tuning parameter groups.

    clip (B, C, T, H, W) in [0, 1] ─► input normalisation ─► encoder blocks (all tokens) ─► mean over
             tokens ─► LayerNorm (``fc_norm``) ─► dropout ─► linear ``head`` ─► logits

This is VideoMAE's fine-tuning head (``use_mean_pooling``): the encoder's final norm is an identity and
``fc_norm`` normalises the pooled features instead. A pre-trained encoder's final norm is dropped and
``fc_norm`` starts afresh, as VideoMAE does when it loads a pre-trained checkpoint (non-strictly: its
``norm.*`` weights have nowhere to go). ``final_norm=True`` keeps the encoder's final norm before the
pooling (this project's earlier head; also what a checkpoint saved with it rebuilds). The head starts
tiny (weights and bias scaled by ``head_init_scale`` = 0.001) so the first updates do not wreck the
pre-trained features.
``freeze_encoder()`` turns the model into a linear probe: the encoder runs without gradients and stays
in eval mode (no drop path) whatever ``train()`` is called with.

``layer_decay_param_groups`` builds AdamW groups for layer-wise learning-rate decay (BEiT/VideoMAE):
the head and the norms after the last block get lr x 1, block i (0-based, of ``depth``) lr x
decay^(depth - i), and the patch embedding / position table lr x decay^(depth + 1). Each group carries
``lr_scale`` and ``weight_decay`` as ``pipeline.core.training.train`` expects.

Checkpoints (``save_classifier`` / ``load_classifier``) hold {"format": "mam2.classifier", "config",
"state_dict"}; the config rebuilds the encoder (``build_encoder`` kwargs), the head and the input norm.
``load_classifier`` reads them through `models.checkpoint_io.read_weights`, so a safetensors export of one
loads too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.checkpoint_io import read_weights
from models.video_vit import INPUT_NORMS, Grid, VideoViT, build_encoder, interpolate_pos_table

FORMAT = "mam2.classifier"


class TablePosEmbed(nn.Module):
    """A position table loaded from elsewhere (e.g. VideoMAE's 1-D table), resampled to other grids.

    Drop-in replacement for ``VideoViT.pos_embed`` (``forward(grid) -> (N, D)``). The table is a
    persistent buffer, so it is saved with the model; other grids are trilinearly interpolated.
    """

    def __init__(self, table: Tensor, grid: Grid) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.register_buffer("table", table.reshape(-1, table.shape[-1]).float().clone())

    def forward(self, grid: Grid) -> Tensor:
        if tuple(grid) == self.grid:
            return self.table
        return interpolate_pos_table(self.table, self.grid, tuple(grid))


class VideoClassifier(nn.Module):
    """Encoder over all tokens + mean pooling + LayerNorm + linear head; returns logits (B, classes).

    ``final_norm=False`` (VideoMAE's mean pooling) replaces ``encoder.norm`` by an identity, dropping any
    weights it had; True keeps it as it is (an encoder whose norm is already an identity keeps that).
    """

    def __init__(self, encoder: VideoViT, num_classes: int, *, head_init_scale: float = 0.001,
                 head_dropout: float = 0.0, input_norm: str = "none", final_norm: bool = False) -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {sorted(INPUT_NORMS)}")
        if not final_norm:
            encoder.norm = nn.Identity()
        self.encoder, self.num_classes, self.input_norm = encoder, num_classes, input_norm
        mean, std = INPUT_NORMS[input_norm]
        # (C, 1, 1, 1): broadcasts over (B, C, T, H, W); not persistent, the config rebuilds it
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1, 1), persistent=False)
        dim = encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)
        self.encoder_frozen = False

    def freeze_encoder(self) -> VideoClassifier:
        """Linear probe: no gradients into the encoder, which stays in eval mode."""
        self.encoder_frozen = True
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        return self

    def train(self, mode: bool = True) -> VideoClassifier:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # a probe reads fixed features: no drop path, no dropout
        return self

    def features(self, clip: Tensor) -> Tensor:
        """Pooled, normalised features (B, D) of clips (B, C, T, H, W) in [0, 1]."""
        x = (clip - self.mean.to(clip.dtype)) / self.std.to(clip.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            tokens = self.encoder(x)  # (B, N, D), all tokens
        return self.fc_norm(tokens.mean(dim=1))

    def forward(self, clip: Tensor) -> Tensor:
        return self.head(self.head_dropout(self.features(clip)))


# ----------------------------------------------------------------------------- layer-wise lr decay
def layer_id(name: str, depth: int) -> int:
    """Depth index of a classifier parameter: 0 = embedding, i + 1 = block i, depth + 1 = head side."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1  # encoder.norm, fc_norm, head


def decays_weight(name: str, param: Tensor) -> bool:
    """Weight decay on matrices and convolutions only (not biases, norms, position tables)."""
    return param.ndim > 1 and not name.endswith(".bias") and "pos_embed" not in name


def layer_decay_param_groups(model: VideoClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale`` = layer_decay^(depth + 1 - layer_id): one group per (layer, decay?).

    Frozen parameters are left out, so a linear probe gets only the head side (scale 1).
    """
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decay = layer_id(name, depth), decays_weight(name, param)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "layer": layer})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------- checkpoints
def classifier_config(model: VideoClassifier, encoder_config: dict[str, Any], class_names: list[str]) -> dict:
    """Everything `load_classifier` needs besides the weights."""
    pos = model.encoder.pos_embed
    return {"encoder": dict(encoder_config), "num_classes": model.num_classes,
            "class_names": list(class_names), "input_norm": model.input_norm,
            "final_norm": not isinstance(model.encoder.norm, nn.Identity),
            "pos_table_grid": list(pos.grid) if isinstance(pos, TablePosEmbed) else None}


def save_classifier(model: VideoClassifier, config: dict[str, Any], path: Path | str) -> Path:
    """Write the classifier and its config (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save({"format": FORMAT, "config": config, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def build_classifier_from_config(config: dict[str, Any], **encoder_overrides: Any) -> VideoClassifier:
    """An untrained classifier with the architecture a `classifier_config` describes."""
    encoder = build_encoder(**{**config["encoder"], **encoder_overrides})
    if config.get("pos_table_grid"):
        grid = tuple(config["pos_table_grid"])
        encoder.pos_embed = TablePosEmbed(torch.zeros(grid[0] * grid[1] * grid[2], encoder.embed_dim), grid)
    # a config without the key predates the identity default: its classifiers kept the final norm
    return VideoClassifier(encoder, config["num_classes"], input_norm=config.get("input_norm", "none"),
                           final_norm=config.get("final_norm", True))


def load_classifier(path: Path | str) -> tuple[VideoClassifier, dict[str, Any]]:
    """Rebuild a classifier saved by `save_classifier` (or exported to safetensors; eval mode)."""
    state = read_weights(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mam2 classifier checkpoint (format {FORMAT!r})")
    model = build_classifier_from_config(state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), state["config"]

