"""The PIPs v1 point tracker (Harley et al., "Particle Video Revisited", ECCV 2022), 8-frame windows.

Written for this project after the paper and its released code (github.com/aharley/pips,
``nets/pips.py``): the same layers, the same math and the same parameter names and shapes, so an
official checkpoint loads unchanged (``load_tracker``). One window of S frames:

1. ``fnet``, the BasicEncoder of RAFT with instance norm: a 7x7 stride-2 conv, then four stages of two
   residual blocks (at strides 2, 4, 8, 16); every stage's output is resized (bilinear,
   align_corners) to stride ``stride`` (8), concatenated, and mixed by a 3x3 conv (2C channels,
   instance norm, ReLU) and a 1x1 conv to C = ``feat_dim`` (PIPs' ``latent_dim``) channels;
2. every point gets one feature vector per frame, all initialised to the feature at its query
   position in frame 0 (bilinear, border-clamped);
3. ``iters`` updates. Each: the per-frame point features are correlated (dot product / sqrt(C)) with
   the feature maps of their frame at ``levels`` scales (the maps avg-pooled by 2 per level); around
   the current estimate, a (2r+1)^2 neighbourhood of each level is read (bilinear, zeros outside);
   the ``DeltaBlock``, an MLP-Mixer over the S frames of one point (``blocks`` blocks of width
   ``hidden_dim``, token mixing across frames, channel mixing within a frame, then a mean over frames
   and one linear layer), reads [point features, correlations, a sin/cos embedding of the motion
   since frame 0 and of time] and outputs a position update and a feature update for all S frames;
   features are updated residually through ``norm`` (GroupNorm(1, C)) and ``ffeat_updater``
   (Linear + GELU). Coordinates are in stride cells inside; frame 0 stays at the query (the
   official code's inference mode);
4. ``vis_predictor`` (one linear layer) reads the final features: a visibility logit per frame.

The correlation maps of every update, resized to the stride grid and summed over levels, are PIPs'
score maps: their balanced cross-entropy against the true position is the third training loss
(``score_map_loss``, beside ``track_sequence_loss`` and the balanced ``visibility_loss``; the official
train script weighs them 1, 1 and 10 for visibility).

Sizes: ``TrackerConfig.pips_v1()`` is the official model (C 128, encoder widths 64/96/128/128, mixer
width 512, depth 12, 4 levels, radius 3, stride 8; 28,677,713 parameters, as the official code
counts). The default ``TrackerConfig()`` is the same architecture with fewer channels and mixer
blocks, to train on CPU at 128 px: C 64, encoder widths 16/32/48/64, mixer width 128, depth 4
(1.12M parameters, 2.2 MB in fp16); S, levels, radius, stride, expansion and the motion embedding
are the official ones. (The official ``Pips`` also sets a ``hidden_dim`` of 256 that no layer uses;
here ``hidden_dim`` is the mixer width, hard-coded 512 there.)

Differences from the official code, none of which changes a parameter name or shape: the mixer's
last layer starts at zero (an untrained tracker predicts no motion; the official init is PyTorch's
default); the token-mixing Conv1d is computed as the equivalent matrix product (faster on CPU);
frames are replicate-padded to a multiple of ``pad_multiple`` and to at least two cells at the
coarsest level (the official code does not pad: at sides that are multiples of 64 and >= 128, e.g.
128, 256 or 384x512, the two agree to float rounding; at others, e.g. 360x640, ours sees a padded
frame); frame 0 stays at the query in training too (the official training mode lets it move); a
clip shorter than S repeats its last frame (as the official chaining demo does). An official
checkpoint (``{'model_state_dict', 'optimizer_state_dict'}``) loads with ``load_tracker``.

``track_long`` chains windows over T frames, forward and/or backward in time (the cycle check in
the pseudo-label stage tracks forward, then backward from the endpoint); a point keeps the feature
from its query frame in every window (the official ``feat_init``).

Shapes: video (B, S, 3, H, W) uint8 or float in [0, 1] (fed to the network as 2 x/255 - 1, as
PIPs does with [0, 255] input); coordinates (x, y) in input pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from models.flow import CheckpointError, check_fits, pad_to_multiple, read_weights, to_unit_range

__all__ = [
    "PointTracker",
    "ScoreMaps",
    "TrackerConfig",
    "UNTRACKED_LOGIT",
    "from_official_state_dict",
    "load_tracker",
    "save_tracker",
    "score_map_loss",
    "to_official_state_dict",
    "track_long",
    "track_sequence_loss",
    "visibility_loss",
]

TRACKER_FORMAT = "mam2-point-tracker/2"  # /2: the PIPs v1 architecture (/1 was a smaller design of ours)
OLD_FORMATS = ("mam2-point-tracker/1",)
# Logit written for frames a point was not tracked to (before its query frame in forward-only mode).
UNTRACKED_LOGIT = -20.0
EPS = 1e-6  # the official masked mean's denominator guard


@dataclass(frozen=True)
class TrackerConfig:
    """Architecture knobs, saved with the checkpoint so ``load_tracker`` rebuilds the same model.

    The defaults are the CPU-sized model (1.12M parameters, 2.2 MB in fp16; a training step of 2
    windows x 64 points at 128 px takes about 0.5 s on one CPU thread); ``pips_v1()`` the official
    one (28.7M parameters).
    """

    window: int = 8  # S, frames per window (the mixer mixes across exactly S frames)
    feat_dim: int = 64  # C, PIPs' latent_dim: encoder output and per-point feature channels (128)
    hidden_dim: int = 128  # width of the DeltaBlock's MLP-Mixer (512 in the official code)
    levels: int = 4  # correlation pyramid levels (4)
    radius: int = 3  # neighbourhood (2r+1)^2 read per level (3)
    blocks: int = 4  # MLP-Mixer depth (12)
    stride: int = 8  # feature stride (8)
    encoder_dims: tuple[int, ...] = (16, 32, 48, 64)  # widths of the four encoder stages (64, 96, 128, 128)
    expansion: int = 4  # MLP-Mixer feed-forward expansion (4)
    flow_embed: int = 64  # sin/cos channels per motion component (x, y, t) (64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_dims", tuple(int(d) for d in self.encoder_dims))  # JSON lists

    @classmethod
    def pips_v1(cls) -> TrackerConfig:
        """The published PIPs v1 model (``Pips(S=8, stride=8)`` in the official code)."""
        return cls(window=8, feat_dim=128, hidden_dim=512, levels=4, radius=3, blocks=12, stride=8,
                   encoder_dims=(64, 96, 128, 128), expansion=4, flow_embed=64)

    @property
    def latent_dim(self) -> int:
        """PIPs' name for ``feat_dim``."""
        return self.feat_dim


# ------------------------------------------------------------------------------------------ encoder


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm and a (strided 1x1) shortcut, as RAFT's and PIPs'."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1, self.norm2 = nn.InstanceNorm2d(cout), nn.InstanceNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # stride 1 keeps the identity shortcut (PIPs' blocks never change width at stride 1)
        self.downsample = (None if stride == 1 else
                           nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), nn.InstanceNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        return self.relu((x if self.downsample is None else self.downsample(x)) + y)


class BasicEncoder(nn.Module):
    """PIPs' ``fnet``: multi-scale residual features, all resized to stride ``stride`` and fused."""

    def __init__(self, output_dim: int, dims: tuple[int, ...], stride: int):
        super().__init__()
        if len(dims) != 4:
            raise ValueError(f"encoder_dims must name 4 stage widths, got {dims}")
        self.stride = stride
        self.conv1 = nn.Conv2d(3, dims[0], 7, stride=2, padding=3)
        self.norm1 = nn.InstanceNorm2d(dims[0])
        self.relu1 = nn.ReLU(inplace=True)
        widths = (dims[0], *dims)
        for i in range(4):  # stage i: widths[i] -> widths[i + 1], stride 1 for the first, 2 after
            stage = nn.Sequential(ResidualBlock(widths[i], widths[i + 1], 1 if i == 0 else 2),
                                  ResidualBlock(widths[i + 1], widths[i + 1]))
            self.add_module(f"layer{i + 1}", stage)
        self.conv2 = nn.Conv2d(sum(dims), output_dim * 2, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(output_dim * 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(output_dim * 2, output_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        x = self.relu1(self.norm1(self.conv1(x)))
        outs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outs.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
        x = self.relu2(self.norm2(self.conv2(torch.cat(outs, 1))))
        return self.conv3(x)


# -------------------------------------------------------------------------------------- MLP-Mixer


class PreNormResidual(nn.Module):
    """x + fn(LayerNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn, self.norm = fn, nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x)) + x


def _feed_forward(dim: int, expansion: int, dense) -> nn.Sequential:
    # The Dropout slots (p = 0) keep the official module indices (0 and 3) in the state dict.
    return nn.Sequential(dense(dim, dim * expansion), nn.GELU(), nn.Dropout(0.0),
                         dense(dim * expansion, dim), nn.Dropout(0.0))


class MeanOverFrames(nn.Module):
    def forward(self, x: Tensor) -> Tensor:  # (P, S, D) -> (P, D)
        return x.mean(1)


class FrameMixing(nn.Conv1d):
    """The official token-mixing layer, a kernel-1 Conv1d with the S frames as channels, computed as a
    matrix product over the frame axis (same parameters and math; several times faster on CPU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (P, S_in, D) -> (P, S_out, D)
        return F.linear(x.transpose(1, 2), self.weight[..., 0], self.bias).transpose(1, 2)


def mlp_mixer(frames: int, input_dim: int, dim: int, output_dim: int, depth: int,
              expansion: int) -> nn.Sequential:
    """MLP-Mixer over (P, S, D) sequences: token mixing across the S frames, channel mixing within one."""
    blocks = [nn.Sequential(PreNormResidual(dim, _feed_forward(frames, expansion, FrameMixing)),
                            PreNormResidual(dim, _feed_forward(dim, expansion, nn.Linear)))
              for _ in range(depth)]
    return nn.Sequential(nn.Linear(input_dim, dim), *blocks, nn.LayerNorm(dim), MeanOverFrames(),
                         nn.Linear(dim, output_dim))


def motion_embedding(xyt: Tensor, channels: int) -> Tensor:
    """PIPs' sin/cos embedding of (x, y, t): (P, S, 3) -> (P, S, 3 * channels + 3).

    Per component: sin and cos (interleaved) of value * k * 1000 / channels for k = 0, 2, 4, ...;
    the raw values are appended.
    """
    freq = torch.arange(0, channels, 2, device=xyt.device, dtype=torch.float32) * (1000.0 / channels)
    parts = []
    for i in range(3):
        angle = xyt[..., i : i + 1] * freq
        parts.append(torch.stack([torch.sin(angle), torch.cos(angle)], -1).flatten(-2))
    return torch.cat([*parts, xyt], -1)


class DeltaBlock(nn.Module):
    """Per point: [features, correlations, motion embedding] over S frames -> (S, C + 2) updates."""

    def __init__(self, cfg: TrackerConfig):
        super().__init__()
        self.feat_dim, self.window, self.flow_embed = cfg.feat_dim, cfg.window, cfg.flow_embed
        input_dim = cfg.levels * (2 * cfg.radius + 1) ** 2 + cfg.feat_dim + 3 * cfg.flow_embed + 3
        self.to_delta = mlp_mixer(cfg.window, input_dim, cfg.hidden_dim, cfg.window * (cfg.feat_dim + 2),
                                  cfg.blocks, cfg.expansion)

    def forward(self, feats: Tensor, corrs: Tensor, flow: Tensor) -> Tensor:
        """feats (P, S, C), corrs (P, S, L*K), flow (P, S, 3) as (dx, dy, t) -> (P, S, C + 2)."""
        x = torch.cat([feats, corrs, motion_embedding(flow, self.flow_embed)], -1)
        return self.to_delta(x).reshape(x.shape[0], self.window, self.feat_dim + 2)


# ------------------------------------------------------------------------------------------ tracker


class ScoreMaps(NamedTuple):
    """Correlation score maps of every update, for ``score_map_loss``.

    maps (B, S, I, N, h, w): per frame, update and point, the correlation levels resized to the
    stride grid and summed; a padded-frame pixel p is cell p / stride, and an input pixel plus
    ``offset`` (x, y) is a padded-frame pixel.
    """

    maps: Tensor
    offset: Tensor
    stride: int


class PointTracker(nn.Module):
    """PIPs v1: track query points through one window of ``config.window`` frames (module docstring)."""

    def __init__(self, config: TrackerConfig | None = None):
        super().__init__()
        self.config = cfg = config or TrackerConfig()
        if cfg.stride < 1 or cfg.levels < 1 or cfg.radius < 0 or cfg.window < 2:
            raise ValueError(f"bad tracker config {cfg}")
        self.fnet = BasicEncoder(cfg.feat_dim, cfg.encoder_dims, cfg.stride)
        self.delta_block = DeltaBlock(cfg)
        self.norm = nn.GroupNorm(1, cfg.feat_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(cfg.feat_dim, cfg.feat_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(cfg.feat_dim, 1))
        # Start from "no update" (the official init is PyTorch's default): an untrained tracker keeps
        # every point where it was queried.
        nn.init.zeros_(self.delta_block.to_delta[-1].weight)
        nn.init.zeros_(self.delta_block.to_delta[-1].bias)
        r = torch.arange(-cfg.radius, cfg.radius + 1, dtype=torch.float32)
        # Neighbourhood order as the official CorrBlock: k = i (2r+1) + j reads offset (x, y) = (i-r, j-r).
        dx, dy = torch.meshgrid(r, r, indexing="ij")
        self.register_buffer("offsets", torch.stack([dx, dy], -1).reshape(-1, 2), persistent=False)  # (K, 2)

    @property
    def pad_multiple(self) -> int:
        """Input sides are padded to this, so every correlation-pyramid level has whole cells."""
        return max(16, self.config.stride * 2 ** (self.config.levels - 1))

    def pad(self, video: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """(..., 3, H, W) uint8 or [0, 1] -> the network's input in [-1, 1], replicate-padded to
        ``pad_multiple`` and at least two cells at the coarsest level; and the pads (l, r, t, b)."""
        return pad_to_multiple(to_unit_range(video) * 2 - 1, self.pad_multiple, 2 * self.pad_multiple)

    def encode(self, frames: Tensor) -> Tensor:
        """(F, 3, H, W) in [-1, 1], sides multiples of ``pad_multiple`` -> features (F, C, H/s, W/s)."""
        return self.fnet(frames)

    def query_features(self, fmap: Tensor, xy: Tensor) -> Tensor:
        """Features of points: fmap (F, C, h, w), xy (F, N, 2) in padded pixels -> (F, N, C).

        Bilinear at xy / stride, clamped at the border (the official ``bilinear_sample2d``).
        """
        return rearrange(_sample(fmap, xy / self.config.stride, "border"), "f c n 1 -> f n c")

    def feature_pyramid(self, fmaps: Tensor) -> list[Tensor]:
        """(B, S, C, h, w) -> ``levels`` maps, each avg-pooled by 2 from the one before."""
        pyramid = [fmaps]
        for _ in range(self.config.levels - 1):
            b = fmaps.shape[0]
            fmaps = rearrange(F.avg_pool2d(fmaps.flatten(0, 1), 2, stride=2), "(b s) c h w -> b s c h w", b=b)
            pyramid.append(fmaps)
        return pyramid

    def _lookup(self, corrs: list[Tensor], coords: Tensor) -> Tensor:
        """Read the (2r+1)^2 neighbourhood of ``coords`` (B, S, N, 2) in stride cells from every level
        of ``corrs`` ((B, S, N, h_l, w_l) each) -> (B, S, N, L*K)."""
        b, s, n, _ = coords.shape
        centre = rearrange(coords, "b s n t -> (b s n) 1 t")
        out = []
        for level, corr in enumerate(corrs):
            pts = centre / 2**level + self.offsets  # (B*S*N, K, 2)
            values = _sample(corr.reshape(b * s * n, 1, *corr.shape[-2:]), pts, "zeros")
            out.append(values.reshape(b, s, n, len(self.offsets)))
        return torch.cat(out, -1)

    def track_window(
        self, fmaps: Tensor, qfeat: Tensor, init: Tensor, iters: int, score_maps: bool = False
    ) -> tuple[list[Tensor], Tensor] | tuple[list[Tensor], Tensor, Tensor]:
        """The update loop on encoded frames, in padded pixel coordinates.

        fmaps (B*S, C, h, w) from ``encode``; qfeat (B, N, C) from ``query_features``; init
        (B, S, N, 2), frame 0 = the anchor (query, or carried estimate), kept fixed. Returns
        per-iteration coords (B, S, N, 2) and visibility logits (B, S, N); with ``score_maps`` also
        the score maps (B, S, I, N, h, w).
        """
        cfg = self.config
        b, s, n, _ = init.shape
        if s != cfg.window:
            raise ValueError(f"window has {s} frames, the model was built for {cfg.window}")
        c, h, w = fmaps.shape[-3:]
        pyramid = self.feature_pyramid(fmaps.reshape(b, s, c, h, w))
        coords = init / cfg.stride  # stride cells
        anchor = coords[:, :1]
        feats = repeat(qfeat, "b n c -> b s n c", s=s)
        times = repeat(torch.linspace(0, s, s, device=init.device), "s -> p s 1", p=b * n)
        preds, scores = [], []
        for _ in range(iters):
            coords = coords.detach()  # as in RAFT/PIPs: each update is supervised, not the chain through them
            corrs = [torch.einsum("bsnc,bschw->bsnhw", feats, level) / math.sqrt(c) for level in pyramid]
            if score_maps:  # every level resized to h x w and summed (level 0 already is h x w)
                maps = corrs[0]
                for cr in corrs[1:]:
                    up = F.interpolate(cr.flatten(0, 1), (h, w), mode="bilinear", align_corners=True)
                    maps = maps + up.reshape(b, s, n, h, w)
                scores.append(maps)
            lookup = rearrange(self._lookup(corrs, coords), "b s n k -> (b n) s k")
            flow = torch.cat([rearrange(coords - coords[:, :1], "b s n t -> (b n) s t"), times], -1)
            flat_feats = rearrange(feats, "b s n c -> (b n) s c")
            delta = self.delta_block(flat_feats, lookup, flow)  # (B*N, S, C + 2)
            update = self.ffeat_updater(self.norm(delta[..., 2:].reshape(-1, c)))
            flat_feats = update.reshape(b * n, s, c) + flat_feats
            feats = rearrange(flat_feats, "(b n) s c -> b s n c", b=b)
            coords = coords + rearrange(delta[..., :2], "(b n) s t -> b s n t", b=b)
            coords = torch.cat([anchor, coords[:, 1:]], 1)  # frame 0 is the anchor
            preds.append(coords * cfg.stride)
        vis = self.vis_predictor(feats)[..., 0]  # (B, S, N)
        if score_maps:
            return preds, vis, torch.stack(scores, 2)
        return preds, vis

    def forward(
        self, video: Tensor, queries: Tensor, iters: int = 6, return_score_maps: bool = False
    ) -> tuple[list[Tensor], Tensor] | tuple[list[Tensor], Tensor, ScoreMaps]:
        """Track ``queries`` (B, N, 2) (x, y pixels in frame 0) through ``video`` (B, S, 3, H, W).

        Returns a list of ``iters`` coordinate estimates (B, S, N, 2) and visibility logits (B, S, N);
        with ``return_score_maps`` also the ``ScoreMaps`` (for ``score_map_loss``). A clip shorter
        than the window repeats its last frame (outputs cover its own frames only).
        """
        b, s = video.shape[:2]
        window = self.config.window
        if s > window:
            raise ValueError(f"clip has {s} frames, the model was built for windows of {window}")
        if s < window:
            video = torch.cat([video, video[:, -1:].expand(-1, window - s, -1, -1, -1)], 1)
        frames, pads = self.pad(video)
        shift = queries.new_tensor([pads[0], pads[2]]).float()  # (left, top): padded = input + shift
        fmaps = self.encode(rearrange(frames, "b s c h w -> (b s) c h w"))
        q = queries.float() + shift
        qfeat = self.query_features(fmaps[::window], q)  # frame 0 of each clip
        init = repeat(q, "b n t -> b s n t", s=window)
        out = self.track_window(fmaps, qfeat, init, iters, return_score_maps)
        preds, vis = [p[:, :s] - shift for p in out[0]], out[1][:, :s]
        if return_score_maps:
            return preds, vis, ScoreMaps(out[2][:, :s], shift, self.config.stride)
        return preds, vis


def _sample(img: Tensor, xy: Tensor, padding_mode: str) -> Tensor:
    """Bilinear samples of img (F, C, h, w) at xy (F, M, 2) in its cells (align_corners) -> (F, C, M, 1)."""
    h, w = img.shape[-2:]
    grid = torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], -1)
    return F.grid_sample(img, grid[:, :, None], mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


# --------------------------------------------------------------------------------------- chaining


def _track_forward(
    model: PointTracker, video: Tensor, queries: Tensor, iters: int, chunk: int, point_chunk: int
) -> tuple[Tensor, Tensor]:
    """Forward-in-time chaining; frames before a point's query frame keep the query and UNTRACKED_LOGIT."""
    cfg, step = model.config, model.config.window - 1
    b, t = video.shape[:2]
    n = queries.shape[1]
    frames, pads = model.pad(video)
    shift = queries.new_tensor([pads[0], pads[2]]).float()
    qt = queries[..., 0].round().long()  # (B, N)
    coords = repeat(queries[..., 1:].float() + shift, "b n t -> b f n t", f=t).clone()  # padded pixels
    vis = torch.full((b, t, n), UNTRACKED_LOGIT, device=video.device)
    at_query = F.one_hot(qt, t).permute(0, 2, 1).bool()  # (B, T, N)
    vis[at_query] = -UNTRACKED_LOGIT  # visible where it was clicked
    for bi in range(b):  # clips differ in which points are active when; one at a time keeps that simple
        # Encode every frame once (in chunks to bound memory); windows then only index the features.
        fmaps = torch.cat([model.encode(frames[bi, i : i + chunk])
                           for i in range(0, t, chunk)])  # (T, C, h, w)
        qfeat = torch.zeros(n, cfg.feat_dim, device=video.device)
        for frame in qt[bi].unique().tolist():  # each point's feature from its own query frame
            sel = (qt[bi] == frame).nonzero()[:, 0]
            qfeat[sel] = model.query_features(fmaps[frame : frame + 1], coords[bi, frame, sel][None])[0]
        # Windows overlap by one frame (step S-1): a window's anchor is the previous one's last estimate.
        # A point's windows start at its query frame, so points are grouped by query frame modulo S-1.
        for phase in range(step):
            for start in range(phase, t - 1, step):
                active = ((qt[bi] <= start) & (qt[bi] % step == phase)).nonzero()[:, 0]
                if active.numel() == 0:
                    continue
                idx = torch.arange(start, start + cfg.window,
                                   device=video.device).clamp(max=t - 1)  # repeat tail
                end = min(start + cfg.window, t)
                for sel in active.split(point_chunk):  # correlation maps cost N*H*W per frame: bound N
                    init = repeat(coords[bi, start, sel], "n t -> 1 s n t", s=cfg.window)
                    preds, win_vis = model.track_window(fmaps[idx], qfeat[sel][None], init, iters)
                    coords[bi, start + 1 : end, sel] = preds[-1][0, 1 : end - start]
                    vis[bi, start + 1 : end, sel] = win_vis[0, 1 : end - start]
    return coords - shift, vis


@torch.no_grad()
def track_long(
    model: PointTracker,
    video: Tensor,
    queries: Tensor,
    iters: int = 6,
    direction: str = "both",
    chunk: int = 32,
    point_chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Track points through a video of any length T by chaining S-frame windows.

    video (B, T, 3, H, W) uint8 or float [0, 1]; queries (B, N, 3) as (t, x, y), any query frame.
    ``direction``: "forward" (frames from the query on), "backward" (frames up to the query, by
    running forward on the time-reversed clip) or "both". Frames not tracked keep the query position
    with visibility logit ``UNTRACKED_LOGIT``. Returns coords (B, T, N, 2) and visibility logits
    (B, T, N). ``chunk`` bounds the frames encoded at once, ``point_chunk`` the points tracked at
    once (memory). Runs without gradients.
    """
    if direction not in ("forward", "backward", "both"):
        raise ValueError(f"direction must be forward, backward or both, got {direction!r}")
    t = video.shape[1]
    if queries.shape[-1] != 3 or queries[..., 0].round().min() < 0 or queries[..., 0].round().max() > t - 1:
        raise ValueError(f"queries must be (B, N, 3) as (t, x, y) with 0 <= t <= {t - 1}")
    out = []
    if direction in ("forward", "both"):
        out.append(_track_forward(model, video, queries, iters, chunk, point_chunk))
    if direction in ("backward", "both"):
        rq = torch.cat([(t - 1) - queries[..., :1], queries[..., 1:]], -1)
        coords, vis = _track_forward(model, video.flip(1), rq, iters, chunk, point_chunk)
        out.append((coords.flip(1), vis.flip(1)))
    if len(out) == 1:
        return out[0]
    (fc, fv), (bc, bv) = out
    before = (torch.arange(t, device=video.device)[None, :, None]
              < queries[..., 0].round()[:, None, :])  # (B, T, N)
    return torch.where(before[..., None], bc, fc), torch.where(before, bv, fv)


# -------------------------------------------------------------------------------------------- losses


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / (mask.sum() + EPS)


def _balanced_bce(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """PIPs' balanced cross-entropy: mean loss over positives (target > 0.95) + mean over negatives
    (target < 0.05), each within ``valid``."""
    pos, neg = (target > 0.95).to(logits.dtype), (target < 0.05).to(logits.dtype)
    loss = F.softplus(-(pos * 2 - 1) * logits)  # -log sigmoid(+-logit)
    return _masked_mean(loss, pos * valid) + _masked_mean(loss, neg * valid)


def track_sequence_loss(
    preds: list[Tensor], target: Tensor, valid: Tensor | None = None, gamma: float = 0.8
) -> Tensor:
    """PIPs' sequence loss: (1/n) sum_i gamma^(n-1-i) * masked-mean over points and frames of the L1
    error averaged over x and y.

    preds: list of (B, S, N, 2); target (B, S, N, 2); valid (B, S, N) or None (all points count).
    """
    weight = torch.ones_like(target[..., 0]) if valid is None else valid.to(target.dtype)
    n = len(preds)
    total = sum(gamma ** (n - 1 - i) * _masked_mean((p - target).abs().mean(-1), weight)
                for i, p in enumerate(preds))
    return total / n


def visibility_loss(logits: Tensor, visible: Tensor, valid: Tensor | None = None) -> Tensor:
    """PIPs' balanced binary cross-entropy between visibility logits (B, S, N) and 0/1 visibility:
    the mean over visible points plus the mean over occluded ones, within ``valid``."""
    weight = torch.ones_like(logits) if valid is None else valid.to(logits.dtype)
    return _balanced_bce(logits, visible.to(logits.dtype), weight)


def score_map_loss(scores: ScoreMaps, target: Tensor, visible: Tensor, valid: Tensor | None = None) -> Tensor:
    """PIPs' score-map loss: balanced cross-entropy of every update's score map against a one-hot map
    at the target's nearest stride cell, over visible, valid points whose cell is inside the map.

    scores from ``PointTracker.forward(..., return_score_maps=True)``; target (B, S, N, 2) input
    pixels; visible, valid (B, S, N).
    """
    maps = rearrange(scores.maps, "b s i n h w -> b s n i h w")
    h, w = maps.shape[-2:]
    cell = ((target + scores.offset) / scores.stride).round().long()
    x, y = cell.unbind(-1)
    keep = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1) & (visible > 0)
    if valid is not None:
        keep &= valid > 0
    picked = maps[keep]  # (M, I, h, w)
    onehot = torch.zeros_like(picked)
    onehot[torch.arange(picked.shape[0], device=picked.device), :, y[keep], x[keep]] = 1.0
    return _balanced_bce(picked.flatten(), onehot.flatten(), torch.ones_like(onehot.flatten()))


# ------------------------------------------------------------------------------------- checkpoints


def from_official_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official PIPs v1 state-dict keys -> ours: the names are the same, less a ``module.`` prefix
    (DataParallel)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_official_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Ours -> the official layout (``prefix="module."`` for a DataParallel-wrapped save)."""
    return {prefix + k: v for k, v in state.items()}


def save_tracker(model: PointTracker, path: str | Path) -> None:
    """Write {"format", "config", "state_dict"}: plain types and tensors only, loadable with
    weights_only=True."""
    torch.save({"format": TRACKER_FORMAT, "config": asdict(model.config),
                "state_dict": model.state_dict()}, path)


def _first_misfit(state: dict[str, Tensor], expected: dict[str, Tensor]) -> str | None:
    """One line naming the first missing, unexpected or mis-shaped key, or None if ``state`` fits."""
    for k in expected:
        if k not in state:
            return f"missing key {k!r}"
    for k in state:
        if k not in expected:
            return f"unexpected key {k!r}"
    for k, v in expected.items():
        if state[k].shape != v.shape:
            return f"key {k!r} has shape {tuple(state[k].shape)}, PIPs v1 has {tuple(v.shape)}"
    return None


def _load_official(path: str | Path, state: object) -> PointTracker:
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a state dict of tensors")
    state = from_official_state_dict(state)
    model = PointTracker(TrackerConfig.pips_v1())
    problem = _first_misfit(state, model.state_dict())
    if problem is not None:
        raise CheckpointError(f"{path}: not an official PIPs v1 checkpoint: {problem}")
    model.load_state_dict(state)
    return model


def load_tracker(path: str | Path) -> PointTracker:
    """Rebuild a tracker from ``save_tracker``'s file, or from an official PIPs v1 checkpoint
    ({"model_state_dict", "optimizer_state_dict"} as its train script saves, keys possibly prefixed
    ``module.``; a bare official state dict works too). ``CheckpointError`` if it is neither or does
    not fit."""
    obj = read_weights(path)
    if isinstance(obj, dict) and "model_state_dict" in obj:
        return _load_official(path, obj["model_state_dict"])
    if isinstance(obj, dict) and "format" not in obj and any(
            str(k).removeprefix("module.").startswith("delta_block.to_delta.") for k in obj):
        return _load_official(path, obj)
    if isinstance(obj, dict) and obj.get("format") in OLD_FORMATS:
        raise CheckpointError(f"{path}: a point tracker in the old format {obj['format']!r} (our earlier, "
                              f"non-PIPs architecture); it cannot be loaded into PIPs v1 "
                              f"({TRACKER_FORMAT!r}): retrain it with motion_pretrain")
    if not isinstance(obj, dict) or obj.get("format") != TRACKER_FORMAT:
        raise CheckpointError(f"{path}: not a point-tracker checkpoint (no 'format': {TRACKER_FORMAT!r}, "
                              "and not an official PIPs checkpoint)")
    try:
        model = PointTracker(TrackerConfig(**obj["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad tracker config {obj['config']} ({exc})") from exc
    check_fits(obj["state_dict"], model.state_dict(), f"{path}: checkpoint does not fit the tracker")
    model.load_state_dict(obj["state_dict"])
    return model
