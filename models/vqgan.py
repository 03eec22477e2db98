"""VQGAN tokenizer for MAM2's appearance targets, wired from taming-transformers' own modules.

Submodule names follow `taming.models.vqgan.VQModel` (which needs an old pytorch-lightning), so official
state_dict keys load unchanged. Frames are (B, C, H, W) floats in [-1, 1]; codes (B, H/f, W/f) long.
Checkpoints are read with `torch.load(weights_only=True)` only. Official `.ckpt` files also pickle
pytorch-lightning callback classes and objects, which weights_only refuses: globals under the lightning
packages become inert stand-ins (never imported, never run) while everything else still goes through
torch's restricted unpickler; any other non-tensor global (or a lightning dict subclass, which that
unpickler cannot fill) is a `CheckpointError` asking for the state_dict to be re-saved.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import taming.modules.diffusionmodules.model as taming_blocks
import torch
import yaml
from einops import rearrange
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Lightning objects in official checkpoints are bookkeeping we never need; only these are stubbed.
_INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_FORMAT = "mam2.vqgan"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, is not a VQGAN checkpoint, or does not match its config."""


@dataclass(frozen=True)
class VQGANConfig:
    """Codebook size plus taming's `ddconfig`; field names follow the official YAML files."""
    embed_dim: int
    n_embed: int
    z_channels: int
    resolution: int  # only places attention blocks (attn_resolutions) and sizes a log message
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    # Not a taming key: taming hard-codes GroupNorm(32). With a narrow trunk (ch 32) that is a per-channel
    # instance norm, which strips every feature map of its mean colour; the tiny preset sat on the
    # mean-frame plateau for hundreds of steps with it. Official configs keep 32.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        # double_z: a VQGAN quantises one z, not a Gaussian's mean and variance; ch: GroupNorm(32).
        if self.double_z or self.ch % self.norm_groups or min(self.n_embed, self.embed_dim) < 1 \
                or not self.ch_mult:
            raise ValueError(f"invalid VQGANConfig (need double_z False, ch a multiple of norm_groups, "
                             f"n_embed, embed_dim >= 1): {self}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict[str, Any]:
        """Keyword arguments for taming's Encoder/Decoder."""
        return {k: v for k, v in asdict(self).items() if k not in ("embed_dim", "n_embed", "norm_groups")}

    @classmethod
    def imagenet_f16_1024(cls) -> VQGANConfig:
        """The official taming ImageNet f16, 1024-code VQGAN."""
        return cls(embed_dim=256, n_embed=1024, z_channels=256, resolution=256, ch=128,
                   ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,))

    @classmethod
    def imagenet_f16_16384(cls) -> VQGANConfig:
        """The official taming ImageNet f16, 16384-code VQGAN."""
        return cls(**{**asdict(cls.imagenet_f16_1024()), "n_embed": 16384})

    @classmethod
    def tiny_f16(cls) -> VQGANConfig:
        """A CPU-trainable f16 VQGAN for 64-128 px frames (3.2 M parameters, official: 72 M).

        f16 keeps one code per frame under each 16x16 tubelet patch, as in MAM2; a narrow trunk (ch 32,
        one res block per level, attention only in the middle block) trains on CPU. 512 codes keep the
        appearance head's softmax small (the demo's params.yaml uses 256: its 300 steps kept 91% of
        256 in use on held-out frames, 32% of 512);
        64-dim codes make the lookup cheap and die less often than 256-dim ones. One normalisation group
        (see `norm_groups`): measured on the demo clips, 32 groups never left the mean-frame plateau in
        150 steps, 8 and 1 did, 1 fastest.
        """
        return cls(embed_dim=64, n_embed=512, z_channels=64, resolution=128, ch=32,
                   ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), norm_groups=1)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> VQGANConfig:
        """Read an official taming config (`model.params.{embed_dim, n_embed, ddconfig}`)."""
        doc = yaml.safe_load(Path(path).read_text())

        def get(dotted: str) -> Any:
            node, keys = doc, dotted.split(".")
            for i, key in enumerate(keys):
                if not isinstance(node, dict) or key not in node:
                    raise ValueError(f"{path}: missing key {'.'.join(keys[:i + 1])}")
                node = node[key]
            return node

        top = ("embed_dim", "n_embed")  # model.params.lossconfig is ignored: we never train a GAN loss
        values = {f.name: get(f"model.params.{'' if f.name in top else 'ddconfig.'}{f.name}")
                  for f in fields(cls) if f.default is MISSING}
        ddconfig, known = get("model.params.ddconfig"), set(cls.__dataclass_fields__)
        values.update({k: v for k, v in ddconfig.items() if k in known and k not in top})
        if extra := sorted(set(ddconfig) - known):
            log.warning("%s: ignoring unknown ddconfig keys %s", path, extra)
        return cls(**values)


class VQGANOutput(NamedTuple):
    """What `VQGAN.forward` returns for training."""
    recon: Tensor  # (B, C, H, W) reconstruction
    codebook_loss: Tensor  # codebook + beta * commitment (taming's legacy weighting)
    codes: Tensor  # (B, h, w) long
    latent: Tensor  # (B, D, h, w) pre-quantisation encoder output; feeds dead-code re-initialisation


class VQGAN(nn.Module):
    """taming's VQModel minus lightning and its losses: encode frames to codes, decode codes to frames."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        with _group_norm(config.norm_groups), contextlib.redirect_stdout(io.StringIO()):
            self.encoder = Encoder(**config.ddconfig())
            self.decoder = Decoder(**config.ddconfig())  # (it prints its z shape: hence the redirect)
        # legacy=True matches how the official checkpoints were trained; sane_index_shape gives (B, h, w).
        self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25,
                                         legacy=True, sane_index_shape=True)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        """Number of codes (the appearance head's number of classes)."""
        return self.config.n_embed

    def encode_to_latent(self, frames: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> continuous latent (B, D, H/f, W/f), before quantisation."""
        f, c = self.config.downsample_factor, self.config.in_channels
        if frames.ndim != 4 or frames.shape[1] != c or frames.shape[2] % f or frames.shape[3] % f \
                or not frames.is_floating_point():
            raise ValueError(f"expected float frames (B, {c}, H, W) in [-1, 1], H and W multiples of "
                             f"{f}; got {frames.dtype} {tuple(frames.shape)}")
        return self.quant_conv(self.encoder(frames))

    def quantize_latent(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest-code lookup: returns (straight-through quantised latent, codebook loss, codes)."""
        z_q, loss, (_, _, codes) = self.quantize(latent)
        return z_q, loss, codes

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes -> (B, D, h, w) codebook rows."""
        return rearrange(self.quantize.embedding(codes), "b h w d -> b d h w")

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantised latent (B, D, h, w) -> frames (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()  # codes are integers: no gradient can flow through them anyway
    def encode(self, frames: Tensor) -> Tensor:
        """(B, C, H, W) floats in [-1, 1] -> (B, H/f, W/f) long codes."""
        return self.quantize_latent(self.encode_to_latent(frames))[2]

    def decode(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes -> (B, C, h*f, w*f) frames, roughly in [-1, 1]."""
        return self.decode_latent(self.codes_to_latent(codes))

    def encode_video(self, clips: Tensor, frames_per_batch: int | None = None) -> Tensor:
        """(B, C, T, H, W) clips -> (B, T, H/f, W/f) codes; `frames_per_batch` bounds memory."""
        # Fold T into the batch: GroupNorm is per sample, so frames cannot influence each other.
        b = clips.shape[0]
        frames = rearrange(clips, "b c t h w -> (b t) c h w")
        step = frames_per_batch or frames.shape[0]
        codes = torch.cat([self.encode(frames[i:i + step]) for i in range(0, frames.shape[0], step)])
        return rearrange(codes, "(b t) h w -> b t h w", b=b)

    def forward(self, frames: Tensor) -> VQGANOutput:
        """Training pass: reconstruction, codebook+commitment loss, codes and the raw latent."""
        latent = self.encode_to_latent(frames)
        z_q, loss, codes = self.quantize_latent(latent)
        return VQGANOutput(self.decode_latent(z_q), loss, codes, latent)

    def code_usage(self, codes: Tensor) -> Tensor:
        """Per-code counts, (n_embed,) long; sum these over recent batches for `reinit_dead_codes`."""
        return torch.bincount(codes.flatten(), minlength=self.codebook_size)

    @torch.no_grad()
    def init_codebook_kmeans(self, vectors: Tensor, iterations: int = 20,
                             generator: torch.Generator | None = None) -> None:
        """Set the codebook to k-means centroids of `vectors` (n, D) (Lloyd's algorithm, seeded rows).

        After an autoencoder warm-up the codes start where the encoder's outputs are: initialised at
        random, nearly all of them lose every nearest-neighbour contest, the commitment loss drags
        the encoder onto the few that win and the decoder sees a constant (measured on the demo
        clips: flat grey reconstructions, 24% of codes used; with this, 88% and the warm-up's PSNR).
        """
        k = self.codebook_size
        if vectors.ndim != 2 or vectors.shape[0] < k:
            raise ValueError(f"k-means needs at least {k} vectors (n, {self.config.embed_dim}), "
                             f"got {tuple(vectors.shape)}")
        vectors = vectors.float()
        centroids = vectors[torch.randperm(vectors.shape[0], generator=generator)[:k]].clone()
        for _ in range(iterations):
            nearest = torch.cdist(vectors, centroids).argmin(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, nearest, vectors)
            counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty: keep
        weight = self.quantize.embedding.weight
        weight.copy_(centroids.to(weight.dtype))

    @torch.no_grad()
    def reinit_dead_codes(self, usage: Tensor, latent: Tensor, min_usage: int = 1,
                          generator: torch.Generator | None = None) -> int:
        """Move codes used fewer than `min_usage` times onto random encoder outputs; returns how many.

        `usage`: `code_usage` summed over recent batches; `latent`: a recent `forward(...).latent`.
        A dead code never wins the argmin, so no loss moves it; seeded where the encoder's outputs are,
        it competes again (a little noise keeps codes seeded from one vector from tying). Under DDP,
        all-reduce `usage` first and broadcast the codebook from rank 0 after.
        """
        dead = torch.nonzero(usage.to(latent.device) < min_usage).flatten()
        z = rearrange(latent.detach(), "b d h w -> (b h w) d")
        pick = torch.randint(z.shape[0], (dead.numel(),), generator=generator).to(z.device)
        noise = torch.randn(dead.numel(), z.shape[1], generator=generator).to(z.device)
        weight = self.quantize.embedding.weight
        weight[dead] = (z[pick] + 1e-3 * z.std() * noise).to(weight.dtype)
        return int(dead.numel())


@contextlib.contextmanager
def _group_norm(groups: int):
    """Build taming's blocks with GroupNorm(`groups`): they call the module's `Normalize` when built."""
    original = taming_blocks.Normalize
    taming_blocks.Normalize = lambda channels: nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
    try:
        yield
    finally:
        taming_blocks.Normalize = original


class _Inert:
    """Stand-in for a pytorch-lightning class or object (e.g. a callback): keeps nothing, runs nothing."""
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; lightning bookkeeping objects become inert stand-ins."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises KeyError/EOFError/RuntimeError/... for non-checkpoints
        first = err
    try:  # which non-tensor globals made weights_only refuse it (zip-format checkpoints only)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        unsafe = []
    if not unsafe:  # not a lightning problem: a text file, a truncated download, ...
        msg = (str(first).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({type(first).__name__}: {msg})") from first
    if foreign := sorted(g for g in unsafe if not g.startswith(_INERT_PREFIXES)):
        raise CheckpointError(f"{path}: refusing to unpickle non-tensor objects {foreign[:5]}; "
                              "load it in a trusted environment and re-save only its state_dict")
    stubs = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable with weights_only=True: {err}") from err


def _load_checked(model: VQGAN, state_dict: Any, path: Path) -> VQGAN:
    """load_state_dict, but mismatches raise a CheckpointError that names a few keys and shapes."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state_dict).__name__}, not a dict")
    ours = model.state_dict()
    problems = [f"missing {k}" for k in ours if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in ours]
    problems += [f"{k}: checkpoint {tuple(getattr(v, 'shape', ()))} vs config {tuple(ours[k].shape)}"
                 for k, v in state_dict.items()
                 if k in ours and getattr(v, "shape", None) != ours[k].shape]
    if problems:
        raise CheckpointError(f"{path}: does not match {model.config}: {len(problems)} problems, e.g. "
                              + "; ".join(problems[:6]))
    model.load_state_dict(state_dict)
    return model.eval()


def load_taming_checkpoint(ckpt_path: str | os.PathLike,
                           config: VQGANConfig | str | os.PathLike) -> VQGAN:
    """Load an official taming `.ckpt` given its config (a VQGANConfig or the path of its `.yaml`).
    Discriminator and LPIPS weights (`loss.*`) are dropped; every other key must match the config."""
    path = Path(ckpt_path)
    if not isinstance(config, VQGANConfig):
        config = VQGANConfig.from_yaml(config)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        top = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: no 'state_dict' in checkpoint (top level: {top})")
    sd = ckpt["state_dict"]
    sd = {k: v for k, v in sd.items() if not str(k).startswith("loss.")} if isinstance(sd, dict) else sd
    return _load_checked(VQGAN(config), sd, path)


def save_vqgan(model: VQGAN, path: str | os.PathLike) -> Path:
    """Save config + weights in our own format, atomically (temporary sibling, then rename)."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    torch.save({"format": _FORMAT, "config": asdict(model.config), "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_vqgan(path: str | os.PathLike) -> VQGAN:
    """Load a model written by `save_vqgan` (weights_only=True)."""
    ckpt = _torch_load(path := Path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a {_FORMAT} checkpoint (see load_taming_checkpoint)")
    try:
        config = VQGANConfig(**ckpt["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad config: {err}") from err
    return _load_checked(VQGAN(config), ckpt.get("state_dict"), path)
