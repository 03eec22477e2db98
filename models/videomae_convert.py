"""Load a published VideoMAE checkpoint into our encoder (and classifier head), with a key report.

VideoMAE's layouts (its released pre-trained and fine-tuned checkpoints, wrapped under "model" or
"module"):

- pre-trained: ``encoder.patch_embed.proj.*``, ``encoder.blocks.N.*``, ``encoder.norm.*`` plus
  pre-training-only ``decoder.*``, ``encoder_to_decoder.*``, ``mask_token`` (ignored here);
- fine-tuned: the same without the ``encoder.`` prefix, plus ``fc_norm.*`` (mean pooling; then there is
  no final ``norm``) and ``head.*``; ``pos_embed`` (1, N, D) when the table was learnt.

Both load completely into the encoder. The classifier (`models.classifier.VideoClassifier`, mean pooling)
then does what VideoMAE's fine-tuning does: a pre-trained checkpoint's final ``norm`` is dropped and
``fc_norm`` starts afresh; a fine-tuned checkpoint's ``fc_norm`` is loaded by `load_head`.

Inside a block the names are timm's except the attention bias: VideoMAE keeps separate ``q_bias`` and
``v_bias`` and no k bias, so ``qkv.bias`` = [q_bias, 0, v_bias]; layer scales ``gamma_1``/``gamma_2``
become timm's ``ls1.gamma``/``ls2.gamma``. Everything that is neither ours nor known to be
pre-training-only is an error, as is any encoder weight the checkpoint lacks or has in another shape:
`VideoMAEConversionError` lists the offending keys.

Position table: VideoMAE uses a 1-D sin-cos table over the flattened (t h w) token index (fixed, so
not stored) or a learnt one (stored). Its features were learnt with that table, so we keep it: the
stored table, or the 1-D table regenerated for the source grid, is interpolated onto the fine-tuning
grid (``interpolate_pos_table``) and installed as a `TablePosEmbed`.

The other way (`videomae_encoder_state`, `videomae_classifier_state`): our encoder under the pre-trained
layout's names, our classifier under the fine-tuned layout's, every weight as it is except the attention
bias, split into ``q_bias`` / ``v_bias`` (our k bias is dropped: a bias added to every key shifts all of
a query's attention logits alike, which the softmax ignores, so outputs agree to float rounding). Our
position table is written as ``pos_embed`` (1, N, D), the table of the encoder's own grid (VideoMAE's
learnt-table layout), so `load_videomae_encoder` at that clip size gives back the same function.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.checkpoint_io import read_weights
from models.classifier import TablePosEmbed, VideoClassifier
from models.video_vit import ENCODER_SIZES, Grid, VideoViT, build_encoder, grid_size, interpolate_pos_table

# Keys of VideoMAE's pre-training heads: present in pre-trained checkpoints, useless for fine-tuning.
PRETRAIN_ONLY = re.compile(r"^(decoder\.|encoder_to_decoder\.|mask_token$|decoder_pos_embed$)")
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
# Attention heads of VideoMAE's published widths (head width 64 up to ViT-L, then 16 heads).
VIDEOMAE_HEADS = {cfg["embed_dim"]: cfg["num_heads"] for cfg in ENCODER_SIZES.values()} | {1280: 16, 1408: 16}


class VideoMAEConversionError(ValueError):
    """The checkpoint does not fit the encoder; the message lists the offending keys."""


@dataclass
class ConversionReport:
    """Which of the checkpoint's keys went where, and which of ours it could not fill."""

    source: str
    layout: str = ""
    matched: list[str] = field(default_factory=list)     # our encoder keys filled
    missing: list[str] = field(default_factory=list)     # our encoder keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys nobody understands
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs ours"
    ignored: list[str] = field(default_factory=list)     # pre-training-only keys
    head: list[str] = field(default_factory=list)        # fc_norm/head keys present
    notes: list[str] = field(default_factory=list)

    @property
    def offending(self) -> list[str]:
        return [*self.missing, *self.unexpected, *self.mismatched]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.source} ({self.layout} VideoMAE layout): {len(self.matched)} encoder keys matched, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} "
                 f"shape mismatches, {len(self.ignored)} pre-training-only keys ignored"]
        for name in ("missing", "unexpected", "mismatched"):
            if getattr(self, name):
                lines.append(f"  {name}: {', '.join(getattr(self, name))}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading
def read_videomae_state(source: Path | str | dict) -> dict[str, Tensor]:
    """The flat tensor dict of a VideoMAE checkpoint (a path or a loaded object), unwrapped from
    "model"/"module"/"state_dict" and stripped of a DDP "module." prefix."""
    obj = read_weights(Path(source)) if not isinstance(source, dict) else source
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise VideoMAEConversionError(f"{source if not isinstance(source, dict) else 'checkpoint'}: "
                                      f"no tensor state dict under 'model', 'module' or at the top level")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def split_layout(state: dict[str, Tensor]) -> tuple[str, dict[str, str], dict[str, Tensor]]:
    """(layout "pretrain" | "finetuned", stripped name -> checkpoint name, the state with the
    pre-trained ``encoder.`` prefix removed)."""
    prefix = "encoder." if any(k.startswith("encoder.patch_embed.") for k in state) else ""
    names = {k.removeprefix(prefix) if prefix else k: k for k in state}
    return ("pretrain" if prefix else "finetuned"), names, {k: state[v] for k, v in names.items()}


def videomae_encoder_config(state: dict[str, Tensor], *, img_size: int, num_frames: int,
                            num_heads: int | None = None, **overrides: Any) -> dict[str, Any]:
    """`build_encoder` kwargs of the encoder a VideoMAE state dict holds, at a new clip size.

    Width, depth, tubelet, patch, MLP ratio and layer scale come from the weights; the number of
    heads cannot, so it comes from the published widths (or ``num_heads``).
    """
    _, _, state = split_layout(state)
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 5:
        raise VideoMAEConversionError("checkpoint has no Conv3d patch embedding "
                                      "(patch_embed.proj.weight or encoder.patch_embed.proj.weight)")
    dim, in_chans, tubelet, patch, _ = proj.shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    heads = num_heads or VIDEOMAE_HEADS.get(dim)
    if heads is None:
        raise VideoMAEConversionError(f"cannot tell the number of attention heads of width {dim}; set it "
                                      f"explicitly (finetune.videomae_num_heads)")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    name = next((n for n, c in ENCODER_SIZES.items() if c["embed_dim"] == dim), "base")
    config = {"name": name, "img_size": img_size, "num_frames": num_frames, "patch_size": patch,
              "tubelet_size": tubelet, "in_chans": in_chans, "embed_dim": dim, "depth": depth,
              "num_heads": heads, "mlp_ratio": hidden / dim}
    if "blocks.0.gamma_1" in state:
        config["init_values"] = 1.0  # any value builds the LayerScale; the weights overwrite it
    return {**config, **overrides}


# ----------------------------------------------------------------------------- conversion
def _our_name(key: str) -> str | None:
    """Our encoder key for a (prefix-free) VideoMAE encoder key, or None if it is not one."""
    if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return key.replace(".proj", "")
    if key in ("norm.weight", "norm.bias"):
        return key
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if not m:
        return None
    rest = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}.get(m.group(2), m.group(2))
    return f"blocks.{m.group(1)}.{rest}"


def videomae_sincos_table(num_tokens: int, dim: int) -> Tensor:
    """VideoMAE's fixed table: the Transformer's 1-D sinusoid over the flattened token index,
    sin on even and cos on odd channels, channel pair j at frequency 10000^(-2j/dim)."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    angle = pos * freq[None]
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float()


def source_pos_table(state: dict[str, Tensor], dim: int, source_grid: Grid, report: ConversionReport
                     ) -> tuple[Tensor, Grid]:
    """The table the checkpoint was trained with and its grid: stored ``pos_embed`` or regenerated."""
    stored = state.get("pos_embed")
    if stored is None:
        report.notes.append(f"no pos_embed stored: VideoMAE's fixed 1-D sin-cos table regenerated for the "
                            f"source grid {source_grid}")
        return videomae_sincos_table(math.prod(source_grid), dim), source_grid
    table = stored.reshape(-1, stored.shape[-1])
    t = source_grid[0]
    side = math.isqrt(table.shape[0] // t) if table.shape[0] % t == 0 else 0
    if table.shape[-1] != dim or side * side * t != table.shape[0]:
        report.mismatched.append(f"pos_embed: {tuple(stored.shape)} is not a ({t} x s x s, {dim}) table")
        return videomae_sincos_table(math.prod(source_grid), dim), source_grid
    report.matched.append("pos_embed")
    return table, (t, side, side)


def convert_videomae(state: dict[str, Tensor], encoder: VideoViT, *, source_num_frames: int = 16,
                     source_img_size: int = 224, source: str = "checkpoint"
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], ConversionReport]:
    """Map a VideoMAE state dict onto ``encoder``'s keys. Returns (encoder weights, head weights
    ``fc_norm.*``/``head.*``, report); raises `VideoMAEConversionError` listing offending keys.

    Installs the position table (`TablePosEmbed` on the encoder's own grid) and, for a fine-tuned
    checkpoint pooled through ``fc_norm`` without a final ``norm``, replaces ``encoder.norm`` by an
    identity, as VideoMAE's fine-tuned model has it.
    """
    layout, names, state = split_layout(state)
    report = ConversionReport(source=source, layout=layout)
    ours = encoder.state_dict()
    converted: dict[str, Tensor] = {}
    head = {k: v for k, v in state.items() if k in HEAD_KEYS}
    report.head = sorted(head)
    for key, value in state.items():
        if key in HEAD_KEYS or key == "pos_embed":
            continue
        if PRETRAIN_ONLY.match(key):
            report.ignored.append(key)
            continue
        if key.endswith((".attn.q_bias", ".attn.v_bias")):
            if key[: -len("q_bias")] + "qkv.bias" not in ours:
                report.unexpected.append(names[key])
            continue  # merged into qkv.bias below
        name = _our_name(key)
        if name is None or name not in ours:
            report.unexpected.append(names[key])
            continue
        converted[name] = value
    _merge_qkv_bias(state, converted, ours)
    if "norm.weight" not in converted and "fc_norm.weight" in head:
        encoder.norm = nn.Identity()
        ours = {k: v for k, v in ours.items() if not k.startswith("norm.")}
        report.notes.append("fine-tuned with fc_norm and no final norm: encoder.norm is an identity")
    for name, value in converted.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            report.mismatched.append(f"{name}: {tuple(value.shape)} vs ours {tuple(ours[name].shape)}")
    report.missing = sorted(set(ours) - set(converted))
    report.matched += sorted(set(converted) & set(ours) - {m.split(":")[0] for m in report.mismatched})
    src_grid = grid_size(source_num_frames, source_img_size, source_img_size, encoder.tubelet_size,
                         encoder.patch_size)
    table, src_grid = source_pos_table(state, encoder.embed_dim, src_grid, report)
    if report.offending:
        raise VideoMAEConversionError("VideoMAE checkpoint does not fit the encoder:\n" + report.summary())
    if tuple(src_grid) != tuple(encoder.grid):
        table = interpolate_pos_table(table, src_grid, encoder.grid)
        report.notes.append(f"position table interpolated from grid {src_grid} to {encoder.grid}")
    encoder.pos_embed = TablePosEmbed(table, encoder.grid)
    return converted, head, report


def _merge_qkv_bias(state: dict[str, Tensor], converted: dict[str, Tensor], ours: dict[str, Tensor]) -> None:
    """VideoMAE's q_bias / v_bias (no k bias) -> timm's qkv.bias = [q, 0, v]; no biases -> zeros."""
    for name in ours:
        if not name.endswith(".attn.qkv.bias") or name in converted:
            continue
        prefix = name[: -len("qkv.bias")]
        q, v = state.get(prefix + "q_bias"), state.get(prefix + "v_bias")
        if q is not None and v is not None:
            converted[name] = torch.cat([q, torch.zeros_like(q), v])
        elif q is None and v is None and prefix + "qkv.weight" in state:
            converted[name] = torch.zeros_like(ours[name])  # a checkpoint trained without qkv bias


def load_videomae_encoder(path: Path | str, *, img_size: int, num_frames: int, source_num_frames: int = 16,
                          source_img_size: int = 224, num_heads: int | None = None, **overrides: Any
                          ) -> tuple[VideoViT, dict[str, Any], dict[str, Tensor], ConversionReport]:
    """Build our encoder for clips of ``num_frames`` x ``img_size``^2 from a VideoMAE checkpoint.

    Returns (encoder, its build config, head weights for `load_head`, report).
    """
    state = read_videomae_state(path)
    config = videomae_encoder_config(state, img_size=img_size, num_frames=num_frames, num_heads=num_heads,
                                     **overrides)
    encoder = build_encoder(**config)
    weights, head, report = convert_videomae(state, encoder, source_num_frames=source_num_frames,
                                             source_img_size=source_img_size, source=str(path))
    encoder.load_state_dict(weights, strict=False)  # completeness was checked key by key above
    return encoder, config, head, report


def load_videomae_classifier(path: Path | str, *, img_size: int, num_frames: int, source_num_frames: int = 16,
                             source_img_size: int = 224, num_heads: int | None = None,
                             input_norm: str = "imagenet") -> tuple[VideoClassifier, dict[str, Any],
                                                                     ConversionReport]:
    """A classifier from a fine-tuned VideoMAE checkpoint (encoder, ``fc_norm`` and ``head``), in eval
    mode: (classifier, its encoder's build config, report). A checkpoint without a head is refused."""
    encoder, config, head, report = load_videomae_encoder(
        path, img_size=img_size, num_frames=num_frames, source_num_frames=source_num_frames,
        source_img_size=source_img_size, num_heads=num_heads)
    if "head.weight" not in head:
        raise VideoMAEConversionError(f"{path}: no classification head (head.weight); a pre-trained "
                                      f"checkpoint holds an encoder only")
    model = VideoClassifier(encoder, int(head["head.weight"].shape[0]), input_norm=input_norm,
                            final_norm=not isinstance(encoder.norm, nn.Identity))
    load_head(model, head, report)
    return model.eval(), config, report


def load_head(model: VideoClassifier, head: dict[str, Tensor], report: ConversionReport) -> None:
    """Copy a checkpoint's ``fc_norm`` into the classifier, and its ``head`` when the classes agree."""
    if "fc_norm.weight" in head and head["fc_norm.weight"].shape == model.fc_norm.weight.shape:
        model.fc_norm.load_state_dict({"weight": head["fc_norm.weight"], "bias": head["fc_norm.bias"]})
        report.notes.append("fc_norm loaded from the checkpoint")
    if "head.weight" not in head:
        return
    if head["head.weight"].shape == model.head.weight.shape:
        model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
        report.notes.append("classification head loaded from the checkpoint")
    else:
        report.notes.append(f"checkpoint head has {head['head.weight'].shape[0]} classes, the data "
                            f"{model.num_classes}: head initialised afresh")


# ----------------------------------------------------------------------------- export (ours -> VideoMAE)
def _videomae_key(key: str) -> str:
    """VideoMAE's (prefix-free) name of one of our encoder keys: the inverse of `_our_name`."""
    if key in ("patch_embed.weight", "patch_embed.bias"):
        return key.replace("patch_embed.", "patch_embed.proj.")
    m = re.match(r"(blocks\.\d+\.)ls([12])\.gamma$", key)
    return f"{m.group(1)}gamma_{m.group(2)}" if m else key


def videomae_encoder_state(encoder: VideoViT, *, prefix: str = "encoder."
                           ) -> tuple[dict[str, Tensor], list[str]]:
    """Our encoder's weights under VideoMAE's names (``prefix`` "encoder.": the pre-trained layout, "":
    the fine-tuned one), with ``pos_embed`` (1, N, D) = the table of its own grid. Returns (state, notes
    on what a VideoMAE user must know)."""
    state: dict[str, Tensor] = {}
    k_bias = 0.0
    for key, value in encoder.state_dict().items():
        if key.startswith("pos_embed."):
            continue  # a stored table: written below for the encoder's grid, as every table is
        if key.endswith(".attn.qkv.bias"):
            q, k, v = value.detach().chunk(3)
            k_bias = max(k_bias, float(k.abs().max()))
            state[f"{prefix}{key[:-len('qkv.bias')]}q_bias"] = q.clone()
            state[f"{prefix}{key[:-len('qkv.bias')]}v_bias"] = v.clone()
            continue
        state[prefix + _videomae_key(key)] = value.detach().clone()
    with torch.no_grad():
        state[prefix + "pos_embed"] = encoder.pos_embed(encoder.grid).detach().float().clone()[None]
    notes = [f"pos_embed holds this encoder's position table for its grid {tuple(encoder.grid)} "
             f"(VideoMAE's learnt-table layout, use_learnable_pos_emb); it is not VideoMAE's 1-D sin-cos "
             f"table"]
    if k_bias:
        notes.append(f"the attention k bias is dropped (VideoMAE has none; max |k bias| {k_bias:.3g}): it "
                     f"shifts every logit of a query alike, so outputs agree to float rounding")
    return state, notes


def videomae_classifier_state(model: VideoClassifier) -> tuple[dict[str, Tensor], list[str]]:
    """Our classifier under VideoMAE's fine-tuned names: encoder keys without prefix, ``fc_norm.*``,
    ``head.*`` and ``pos_embed``. Returns (state, notes)."""
    state, notes = videomae_encoder_state(model.encoder, prefix="")
    for key in HEAD_KEYS:
        module, name = key.split(".")
        state[key] = getattr(getattr(model, module), name).detach().clone()
    if not isinstance(model.encoder.norm, nn.Identity):
        notes.append("this classifier keeps the encoder's final norm before pooling (final_norm): "
                     "load_videomae_encoder keeps it, VideoMAE's mean-pooling model has no place for it")
    if model.input_norm != "imagenet":
        notes.append(f"this classifier normalises its input with {model.input_norm!r}; VideoMAE's "
                     f"pipelines normalise with ImageNet's statistics")
    return state, notes
