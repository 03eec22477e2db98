"""Optical flow model: torchvision's RAFT, checkpoint converters, the sequence loss and backward warping.

The flow model is torchvision's ``raft_small`` / ``raft_large`` built with ``weights=None`` (weights
cannot be downloaded here). Weights come from a path, in one of two formats:

- a torchvision state_dict (``raft_small_C_T_V2-*.pth`` and friends): same keys as the model;
- an original princeton-vl/RAFT checkpoint (``raft-things.pth``, ``raft-small.pth``): saved from an
  ``nn.DataParallel`` wrapper, so keys start with ``module.``, and the modules have other names
  (``fnet``/``cnet``/``update_block.encoder``/``update_block.gru``/``update_block.mask``).

The renaming is derived, key by key, from torchvision's names (``_original_names``); the reverse
direction (``original_raft_state_dict``) exists so the mapping can be tested both ways and so our
weights can be handed to code that expects the original format. The mapping was checked once against
princeton-vl/RAFT's own module definitions (both variants): same key set, same outputs.

Tensors: images (B, 3, H, W), flow (B, 2, H, W) in pixels, channel 0 = x (right), 1 = y (down).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.optical_flow import RAFT, raft_large, raft_small

from models.checkpoint_io import CheckpointError, read_weights  # noqa: F401 - re-exported for loaders

__all__ = [
    "FLOW_MODELS",
    "CheckpointError",
    "build_flow_model",
    "check_fits",
    "estimate_flow",
    "flow_sequence_loss",
    "load_flow_checkpoint",
    "original_raft_state_dict",
    "pad_to_multiple",
    "read_weights",
    "to_unit_range",
    "torchvision_state_dict_from_original",
    "unpad",
    "warp",
]

FLOW_MODELS = {"raft_small": raft_small, "raft_large": raft_large}

# torchvision's correlation pyramid pools the 1/8-resolution feature map 3 times and needs >= 2 cells
# at the coarsest level, hence inputs of at least 8 * 2 * 2**3 = 128 px on each side.
RAFT_MIN_SIZE = 128
RAFT_STRIDE = 8


def build_flow_model(name: str = "raft_small") -> RAFT:
    """Build an untrained torchvision RAFT by name (``raft_small`` or ``raft_large``)."""
    if name not in FLOW_MODELS:
        raise ValueError(f"unknown flow model {name!r}; choose one of {sorted(FLOW_MODELS)}")
    return FLOW_MODELS[name](weights=None, progress=False)


# ----------------------------------------------------------------------------------------- padding


def pad_to_multiple(x: Tensor, multiple: int, min_size: int = 0) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Replicate-pad the last two dims of ``x`` (..., H, W) to a multiple of ``multiple``, at least
    ``min_size``.

    Padding is split evenly between the two sides (the content stays centred, as the original RAFT
    does for Sintel). Returns the padded tensor and ``pads = (left, right, top, bottom)``; a pixel
    coordinate (x, y) in the input is (x + left, y + top) in the padded tensor. Integer inputs come
    back as float (replicate padding exists for floating point only).
    """
    h, w = x.shape[-2:]
    new_h = max(-(-h // multiple) * multiple, -(-min_size // multiple) * multiple)
    new_w = max(-(-w // multiple) * multiple, -(-min_size // multiple) * multiple)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    pads = (left, new_w - w - left, top, new_h - h - top)
    x = x if x.is_floating_point() else x.float()
    if pads == (0, 0, 0, 0):
        return x, pads
    # F.pad's replicate mode wants (N, C, H, W); fold all leading dims into N and back.
    out = F.pad(x.reshape(-1, 1, h, w), pads, mode="replicate")
    return out.reshape(*x.shape[:-2], new_h, new_w), pads


def unpad(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """Crop the padding added by ``pad_to_multiple`` off the last two dims of ``x``."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


def to_unit_range(img: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return img.float() / 255.0 if img.dtype == torch.uint8 else img.float()


# -------------------------------------------------------------------------------------- inference


def estimate_flow(
    model: RAFT, img0: Tensor, img1: Tensor, num_updates: int = 12, return_all: bool = False
) -> Tensor | list[Tensor]:
    """Flow from ``img0`` to ``img1``: (B, 3, H, W) uint8 or float in [0, 1] -> (B, 2, H, W) pixels.

    Any H, W works: the pair is replicate-padded to a multiple of 8 and at least 128 px (what
    torchvision's RAFT needs), and the flow is cropped back. Returns the last of the ``num_updates``
    predictions, or with ``return_all=True`` the list of all of them (what ``flow_sequence_loss``
    needs). Gradients flow unless the caller wraps this in ``torch.no_grad()``.
    """
    if img0.shape != img1.shape or img0.dim() != 4 or img0.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) images of one shape, got {tuple(img0.shape)}, "
                         f"{tuple(img1.shape)}")
    # torchvision's RAFT expects [-1, 1], as the original's ``2 * (img / 255) - 1``.
    pair = torch.stack([to_unit_range(img0), to_unit_range(img1)]) * 2 - 1  # (2, B, 3, H, W)
    pair, pads = pad_to_multiple(pair, RAFT_STRIDE, RAFT_MIN_SIZE)
    preds = model(pair[0], pair[1], num_flow_updates=num_updates)
    preds = [unpad(p, pads) for p in preds]
    return preds if return_all else preds[-1]


def lands_inside(flow: Tensor) -> Tensor:
    """(B, H, W) bool: pixels whose flow target x + f lies inside the image."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device), torch.arange(w, device=flow.device),
                            indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def warp(image: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Backward-warp: ``out[:, :, y, x] = image[:, :, y + flow_y, x + flow_x]``, bilinear.

    image (B, C, H, W), flow (B, 2, H, W) in pixels. With the flow f from frame 0 to frame 1,
    ``warp(frame1, f)`` is frame 1 brought into frame 0's grid, and ``f + warp(b, f)`` is the
    forward-backward residual the pseudo-label filter thresholds. Samples outside the image take
    ``padding_mode`` (zeros by default, so callers can mask them out).
    """
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    x = xs + flow[:, 0]  # (B, H, W)
    y = ys + flow[:, 1]
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(image.to(flow.dtype), grid, mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


def flow_sequence_loss(preds: list[Tensor], target: Tensor, valid: Tensor | None = None,
                       gamma: float = 0.85) -> Tensor:
    """RAFT's sequence loss: sum_i gamma^(n-1-i) * masked-mean |pred_i - target| over the n updates.

    preds: list of (B, 2, H, W); target (B, 2, H, W); valid (B, H, W) bool/float or None (all valid).
    Later updates weigh more. Unlike the original (which averages over all pixels, so sparse labels
    give small losses), the L1 is averaged over valid pixels only, so the scale does not depend on
    how many pseudo-labels survived the consistency check.
    """
    if valid is None:
        valid = torch.ones_like(target[:, 0])
    weight = valid.to(target.dtype)[:, None]  # (B, 1, H, W)
    denom = (weight.sum() * target.shape[1]).clamp(min=1.0)
    n = len(preds)
    loss = target.new_zeros(())
    for i, pred in enumerate(preds):
        loss = loss + gamma ** (n - 1 - i) * ((pred - target).abs() * weight).sum() / denom
    return loss


# ------------------------------------------------------------------------------ checkpoint formats

# Renaming rules, torchvision name -> original princeton-vl/RAFT name, applied in order (first match).
# Both encoders share one layout: a stem conv+norm, three stages of two residual/bottleneck blocks,
# a 1x1 output conv. torchvision wraps every conv(+norm)(+relu) in a Sequential (``.0`` conv,
# ``.1`` norm); the original names them conv1/norm1 ... The norm of the stride-2 projection
# (``downsample.1``) is also registered on the original block as norm3 (residual) or norm4
# (bottleneck), so the original state_dict holds it under both names.
_ENCODER_RULES = [
    (r"^convnormrelu\.0\.", "conv1."),
    (r"^convnormrelu\.1\.", "norm1."),
    (r"^conv\.", "conv2."),
    (r"^(layer\d\.\d)\.convnormrelu(\d)\.0\.", r"\1.conv\2."),
    (r"^(layer\d\.\d)\.convnormrelu(\d)\.1\.", r"\1.norm\2."),
    (r"^(layer\d\.\d)\.downsample\.", r"\1.downsample."),
]
_UPDATE_RULES = [
    (r"^update_block\.motion_encoder\.convcorr(\d)\.0\.", r"update_block.encoder.convc\1."),
    (r"^update_block\.motion_encoder\.convflow(\d)\.0\.", r"update_block.encoder.convf\1."),
    (r"^update_block\.motion_encoder\.conv\.0\.", "update_block.encoder.conv."),
    (r"^update_block\.flow_head\.", "update_block.flow_head."),
    (r"^mask_predictor\.convrelu\.0\.", "update_block.mask.0."),
    (r"^mask_predictor\.conv\.", "update_block.mask.2."),
]
_ENCODER_PREFIXES = {"feature_encoder.": "fnet.", "context_encoder.": "cnet."}
_GRU_RE = re.compile(r"^update_block\.recurrent_block\.convgru(\d)\.conv([zrq])\.")


def _is_small(model_or_state: nn.Module | dict) -> bool:
    """raft_small has no convex-upsampling mask predictor; that is what tells the variants apart."""
    keys = model_or_state.keys() if isinstance(model_or_state, dict) else model_or_state.state_dict().keys()
    return not any(k.startswith("mask_predictor.") for k in keys)


def _original_names(tv_key: str, small: bool) -> list[str]:
    """Original RAFT name(s) of one torchvision key; the first is canonical, the rest are aliases."""
    for tv_prefix, orig_prefix in _ENCODER_PREFIXES.items():
        if tv_key.startswith(tv_prefix):
            rest = tv_key[len(tv_prefix) :]
            for pattern, repl in _ENCODER_RULES:
                if re.match(pattern, rest):
                    name = orig_prefix + re.sub(pattern, repl, rest)
                    break
            else:
                raise KeyError(f"no original-RAFT name for {tv_key!r}")
            alias = re.match(r"^(.*layer\d\.\d)\.downsample\.1\.(.*)$", name)
            if alias:  # the projection's norm, also registered as norm3 / norm4
                return [name, f"{alias.group(1)}.norm{4 if small else 3}.{alias.group(2)}"]
            return [name]
    gru = _GRU_RE.match(tv_key)
    if gru:
        # raft_small has one 3x3 ConvGRU (convz); raft_large a separable pair (convz1: 1x5, convz2: 5x1).
        suffix = "" if small else gru.group(1)
        return [_GRU_RE.sub(f"update_block.gru.conv{gru.group(2)}{suffix}.", tv_key)]
    for pattern, repl in _UPDATE_RULES:
        if re.match(pattern, tv_key):
            return [re.sub(pattern, repl, tv_key)]
    raise KeyError(f"no original-RAFT name for {tv_key!r}")


def original_raft_state_dict(tv_state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Rename a torchvision RAFT state_dict to the original princeton-vl/RAFT layout (aliases included)."""
    small = _is_small(tv_state)
    out = {}
    for key, value in tv_state.items():
        for name in _original_names(key, small):
            out[prefix + name] = value
    return out


def _strip_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop the ``module.`` prefix nn.DataParallel / DDP put on every key."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def torchvision_state_dict_from_original(
    orig_state: dict[str, Tensor], model: RAFT
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """Rename an original-RAFT state_dict onto ``model``'s keys.

    Returns (renamed state_dict, unexpected original keys, {torchvision key: original key it came from}).
    """
    small = _is_small(model)
    orig_state = _strip_prefix(orig_state)
    lookup = {}  # original name (canonical or alias) -> torchvision name
    for tv_key in model.state_dict():
        for name in _original_names(tv_key, small):
            lookup[name] = tv_key
    out, unexpected, source = {}, [], {}
    for key, value in orig_state.items():
        if key not in lookup:
            unexpected.append(key)
        elif lookup[key] not in out:  # an alias carries the same tensor: keep the first seen
            out[lookup[key]], source[lookup[key]] = value, key
    return out, unexpected, source


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Accept a bare state_dict or one nested under a common key ({"state_dict": ...}, {"model": ...})."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict (expected a dict of tensors)")
    return obj


def check_fits(
    state: dict[str, Tensor], expected: dict[str, Tensor], header: str, name=str, optional=(), unexpected=()
) -> None:
    """Raise ``CheckpointError(header + key lists)`` unless ``state`` has exactly ``expected``'s keys and
    shapes.

    ``name`` renders a key for the message; keys ending in one of ``optional`` may be absent;
    ``unexpected`` adds keys already found not to fit (e.g. during renaming).
    """
    unexpected = list(unexpected) + [k for k in state if k not in expected]
    missing = [name(k) for k in expected if k not in state and not k.endswith(tuple(optional))]
    misshaped = [
        f"{name(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        lines = [header]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20])
                             + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def load_flow_checkpoint(model: RAFT, path: str | Path) -> RAFT:
    """Load torchvision or original-RAFT weights from ``path`` into ``model`` (in place; returns it).

    The format is recognised from the keys (original checkpoints use ``fnet.``/``cnet.``). Anything
    that does not fit raises ``CheckpointError`` naming the missing, unexpected and mis-shaped keys;
    the model is left untouched then. BatchNorm's ``num_batches_tracked`` counters may be absent.
    """
    path = Path(path)
    state = _strip_prefix(_unwrap(read_weights(path), path))
    small = _is_small(model)
    original = any(k.startswith(("fnet.", "cnet.")) for k in state)
    unexpected, source = [], {}
    if original:
        state, unexpected, source = torchvision_state_dict_from_original(state, model)

    def name(k: str) -> str:  # report original checkpoints in their own names, with ours alongside
        return f"{source.get(k, _original_names(k, small)[0])} (= {k})" if original else k

    expected = model.state_dict()
    fmt, variant = ("original RAFT" if original else "torchvision"), ("small" if small else "large")
    header = f"{path}: {fmt} checkpoint does not fit raft_{variant}"
    check_fits(state, expected, header, name, optional=("num_batches_tracked",), unexpected=unexpected)
    for k, v in expected.items():  # counters the checkpoint may lack: keep the model's own
        state.setdefault(k, v)
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return model
