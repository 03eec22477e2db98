"""A small PIPs-style point tracker: 8-frame windows, correlation pyramid, iterative temporal updates.

Written for this project after PIPs (Harley et al., "Particle Video Revisited", 2022), scaled down to
train on CPU at 128 px. One window of S frames:

1. a CNN encodes every frame at stride 4 into C-dim, unit-norm features;
2. each point's feature is sampled at its query position (frame 0 of the window); its cosine
   similarity with every feature of every frame gives one correlation map per point and frame, and
   avg-pooling those maps gives the pyramid (as in RAFT, but maps are per point, not all pairs, so
   memory grows with N H W, not (H W)^2);
3. for ``iters`` updates: around the current estimate in each frame, a (2r+1)^2 neighbourhood is read
   from each pyramid level; a temporal network (1-D convolutions over the S frames, so each frame
   sees its neighbours) reads [correlations, their soft-argmax, motion so far, a per-frame hidden
   state] and outputs a position correction and a hidden-state correction;
4. a visibility head reads the final hidden state.

``track_long`` chains windows over T frames, forward and/or backward in time (the cycle check in
the pseudo-label stage tracks forward, then backward from the endpoint).

Shapes: video (B, S, 3, H, W) uint8 or float in [0, 1]; coordinates (x, y) in input pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from models.flow import CheckpointError, check_fits, pad_to_multiple, read_weights, to_unit_range

__all__ = [
    "PointTracker",
    "TrackerConfig",
    "load_tracker",
    "save_tracker",
    "track_long",
    "track_sequence_loss",
    "visibility_loss",
]

TRACKER_FORMAT = "mam2-point-tracker/1"
# Logit written for frames a point was not tracked to (before its query frame in forward-only mode).
UNTRACKED_LOGIT = -20.0


@dataclass(frozen=True)
class TrackerConfig:
    """Architecture knobs, saved with the checkpoint so ``load_tracker`` rebuilds the same model."""

    window: int = 8  # S, frames per window
    feat_dim: int = 64  # C, encoder output channels
    hidden_dim: int = 96  # per-frame hidden state of the temporal network
    levels: int = 3  # pyramid levels (feature stride 4, 8, 16)
    radius: int = 3  # neighbourhood (2r+1)^2 sampled per level
    blocks: int = 3  # temporal blocks per update
    stride: int = 4  # encoder down-sampling


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    # Instance norm: correlation should not depend on a clip's global brightness or contrast.
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.InstanceNorm2d(cout),
                         nn.ReLU(inplace=True))


class TemporalBlock(nn.Module):
    """Pre-norm residual block: mix over time (1-D conv), then over channels (MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.time = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:  # x: (P, S, D), P = batch x points
        x = x + rearrange(self.time(rearrange(self.norm1(x), "p s d -> p d s")), "p d s -> p s d")
        return x + self.mlp(self.norm2(x))


class PointTracker(nn.Module):
    """Track query points through one window of ``config.window`` frames (see the module docstring)."""

    def __init__(self, config: TrackerConfig | None = None):
        super().__init__()
        self.config = cfg = config or TrackerConfig()
        if cfg.stride not in (2, 4, 8):
            raise ValueError(f"stride must be 2, 4 or 8, got {cfg.stride}")
        c = cfg.feat_dim
        layers, ch = [_conv(3, c // 2, 7, 2)], c // 2
        for _ in range({2: 0, 4: 1, 8: 2}[cfg.stride]):
            layers += [_conv(ch, c, 3, 2)]
            ch = c
        self.encoder = nn.Sequential(*layers, _conv(ch, c, 3), nn.Conv2d(c, c, 1))
        corr_dim = cfg.levels * (2 * cfg.radius + 1) ** 2
        h = cfg.hidden_dim
        self.feat_to_hidden = nn.Linear(c, h)
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.window, h))
        # inputs per frame: correlations (+ their soft-argmax per level), displacement from frame 0,
        # step from the previous frame
        self.input_proj = nn.Linear(corr_dim + 2 * cfg.levels + 4, h)
        # Correlations are cosine similarities; a sharp softmax (1/T = 10) makes the soft-argmax useful
        # from the start.
        self.temperature = nn.Parameter(torch.full((cfg.levels,), 2.3))  # log inverse temperature per level
        self.blocks = nn.Sequential(*[TemporalBlock(h) for _ in range(cfg.blocks)])
        self.out_norm = nn.LayerNorm(h)
        self.delta_head = nn.Linear(h, 2 + h)
        self.vis_head = nn.Linear(h, 1)
        # Start from "no correction": the first updates then keep the (reasonable) initial guess.
        nn.init.zeros_(self.delta_head.weight)
        nn.init.zeros_(self.delta_head.bias)
        offsets = torch.arange(-cfg.radius, cfg.radius + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        self.register_buffer("offsets", torch.stack([dx, dy], -1).reshape(-1, 2), persistent=False)  # (K, 2)

    @property
    def pad_multiple(self) -> int:
        """Input sides are padded to this, so every correlation-pyramid level has whole cells."""
        return self.config.stride * 2 ** (self.config.levels - 1)

    def encode(self, frames: Tensor) -> Tensor:
        """(F, 3, H, W) in [-1, 1], sides multiples of ``pad_multiple`` -> unit-norm features
        (F, C, H/s, W/s)."""
        # Unit norm: correlations become cosine similarities in [-1, 1], so the soft-argmax below is
        # sharp from the first step, before the features are trained.
        return F.normalize(self.encoder(frames), dim=1)

    def _sample(self, fmap: Tensor, xy: Tensor) -> Tensor:
        """Bilinear samples: fmap (F, C, h, w), xy (F, M, 2) in fmap cells -> (F, M, C); zeros outside."""
        h, w = fmap.shape[-2:]
        grid = torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], -1)
        out = F.grid_sample(fmap, grid[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return rearrange(out, "f c m 1 -> f m c")

    def query_features(self, fmap: Tensor, xy: Tensor) -> Tensor:
        """Features of points: fmap (F, C, h, w), xy (F, N, 2) in padded pixels -> unit-norm (F, N, C)."""
        return F.normalize(self._sample(fmap, self._to_cells(xy, 0)), dim=-1)

    def correlation_pyramid(self, fmaps: Tensor, qfeat: Tensor) -> list[Tensor]:
        """Per-point correlation maps: fmaps (B*S, C, h, w), qfeat (B, N, C) -> levels of
        (B*S*N, 1, h_l, w_l)."""
        b = qfeat.shape[0]
        fmaps = rearrange(fmaps, "(b s) c h w -> b s c h w", b=b)
        corr = torch.einsum("bnc,bschw->bsnhw", qfeat, fmaps)
        # Pooling the maps equals correlating with pooled features (the dot product is linear).
        pyramid = [rearrange(corr, "b s n h w -> (b s n) 1 h w")]
        for _ in range(self.config.levels - 1):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2))
        return pyramid

    def _lookup(self, pyramid: list[Tensor], coords: Tensor) -> Tensor:
        """Read correlations around ``coords`` (B, S, N, 2) -> (B, S, N, L*K + 2L).

        Per level: the K = (2r+1)^2 neighbourhood values, then their soft-argmax offset (2 values).
        """
        b, s, n, _ = coords.shape
        xy = rearrange(coords, "b s n t -> (b s n) 1 t")
        corrs, peaks = [], []
        for level, corr_map in enumerate(pyramid):
            pts = self._to_cells(xy, level) + self.offsets  # (B*S*N, K, 2) in cells of this level
            corr = rearrange(self._sample(corr_map, pts), "(b s n) k 1 -> b s n k", b=b, s=s)
            corrs.append(corr)
            # Soft-argmax of the neighbourhood (in level cells): where the best match is, read off
            # directly; a shortcut that lets the small model learn in few steps.
            weights = torch.softmax(corr * self.temperature[level].exp(), dim=-1)
            peaks.append(weights @ self.offsets)  # (B, S, N, 2)
        return torch.cat(corrs + peaks, dim=-1)

    def _to_cells(self, xy: Tensor, level: int) -> Tensor:
        """Pixel -> cell coordinates of a pyramid level (for grid_sample with align_corners=True).

        Level-0 cell i is centred on pixel stride * i (strided convs with "same" padding); avg-pooling
        then moves the centres of level l (cell size s_l = stride * 2^l) to s_l * i + (s_l - stride) / 2.
        """
        size = self.config.stride * 2**level
        return (xy - (size - self.config.stride) / 2) / size

    def track_window(
        self, fmaps: Tensor, qfeat: Tensor, init: Tensor, iters: int
    ) -> tuple[list[Tensor], Tensor]:
        """The update loop on encoded frames, in padded pixel coordinates.

        fmaps (B*S, C, h, w) from ``encode``; qfeat (B, N, C) from ``query_features``; init
        (B, S, N, 2), frame 0 = the anchor (query, or carried estimate), kept fixed. Returns
        per-iteration coords (B, S, N, 2) and visibility logits (B, S, N).
        """
        b, s, n, _ = init.shape
        if s > self.config.window:
            raise ValueError(f"window has {s} frames, the model was built for at most {self.config.window}")
        pyramid = self.correlation_pyramid(fmaps, qfeat)
        hidden = repeat(self.feat_to_hidden(qfeat), "b n h -> (b n) s h", s=s) + self.time_embed[:, :s]
        coords, preds = init, []
        for _ in range(iters):
            coords = coords.detach()  # as in RAFT/PIPs: each update is supervised, not the chain through them
            corr = self._lookup(pyramid, coords)  # (B, S, N, L*K + 2L)
            # Motion inputs in units of the feature stride keep them near unit scale.
            disp = (coords - coords[:, :1]) / self.config.stride
            step = torch.cat([torch.zeros_like(disp[:, :1]), disp[:, 1:] - disp[:, :-1]], dim=1)
            x = self.input_proj(rearrange(torch.cat([corr, disp, step], -1), "b s n d -> (b n) s d"))
            x = self.blocks(x + hidden)
            delta = self.delta_head(self.out_norm(x))  # (B*N, S, 2 + H)
            hidden = hidden + delta[..., 2:]
            move = rearrange(delta[..., :2], "(b n) s t -> b s n t", b=b) * self.config.stride
            move = torch.cat([torch.zeros_like(move[:, :1]), move[:, 1:]], dim=1)  # frame 0 is the anchor
            coords = coords + move
            preds.append(coords)
        vis = rearrange(self.vis_head(self.out_norm(hidden)), "(b n) s 1 -> b s n", b=b)
        return preds, vis

    def forward(self, video: Tensor, queries: Tensor, iters: int = 6) -> tuple[list[Tensor], Tensor]:
        """Track ``queries`` (B, N, 2) (x, y pixels in frame 0) through ``video`` (B, S, 3, H, W).

        Returns a list of ``iters`` coordinate estimates (B, S, N, 2) and visibility logits (B, S, N).
        """
        b, s = video.shape[:2]
        frames, pads = pad_to_multiple(to_unit_range(video) * 2 - 1, self.pad_multiple)
        shift = queries.new_tensor([pads[0], pads[2]])  # (left, top): padded = input + shift
        fmaps = self.encode(rearrange(frames, "b s c h w -> (b s) c h w"))
        q = queries.float() + shift
        qfeat = self.query_features(fmaps[::s], q)  # frame 0 of each clip
        preds, vis = self.track_window(fmaps, qfeat, repeat(q, "b n t -> b s n t", s=s), iters)
        return [p - shift for p in preds], vis


# --------------------------------------------------------------------------------------- chaining


def _track_forward(
    model: PointTracker, video: Tensor, queries: Tensor, iters: int, chunk: int, point_chunk: int
) -> tuple[Tensor, Tensor]:
    """Forward-in-time chaining; frames before a point's query frame keep the query and UNTRACKED_LOGIT."""
    cfg, step = model.config, model.config.window - 1
    b, t = video.shape[:2]
    n = queries.shape[1]
    frames, pads = pad_to_multiple(to_unit_range(video) * 2 - 1, model.pad_multiple)
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


def track_sequence_loss(
    preds: list[Tensor], target: Tensor, valid: Tensor | None = None, gamma: float = 0.8
) -> Tensor:
    """PIPs' sequence loss: sum_i gamma^(n-1-i) * masked-mean |coords_i - target| (L1 per coordinate).

    preds: list of (B, S, N, 2); target (B, S, N, 2); valid (B, S, N) or None (all points count).
    """
    weight = torch.ones_like(target[..., 0]) if valid is None else valid.to(target.dtype)
    denom = (weight.sum() * 2).clamp(min=1.0)
    n = len(preds)
    losses = [((p - target).abs() * weight[..., None]).sum() / denom for p in preds]
    return sum(gamma ** (n - 1 - i) * loss for i, loss in enumerate(losses))


def visibility_loss(logits: Tensor, visible: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy between visibility logits (B, S, N) and 0/1 visibility, masked by ``valid``."""
    weight = torch.ones_like(logits) if valid is None else valid.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, visible.to(logits.dtype), reduction="none")
    return (bce * weight).sum() / weight.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------- checkpoints


def save_tracker(model: PointTracker, path: str | Path) -> None:
    """Write {"config", "state_dict"}: plain types and tensors only, loadable with weights_only=True."""
    torch.save({"format": TRACKER_FORMAT, "config": asdict(model.config),
                "state_dict": model.state_dict()}, path)


def load_tracker(path: str | Path) -> PointTracker:
    """Rebuild a tracker from ``save_tracker``'s file; ``CheckpointError`` if it is not one or does not
    fit."""
    obj = read_weights(path)
    if not isinstance(obj, dict) or obj.get("format") != TRACKER_FORMAT:
        raise CheckpointError(f"{path}: not a point-tracker checkpoint (no 'format': {TRACKER_FORMAT!r})")
    try:
        model = PointTracker(TrackerConfig(**obj["config"]))
    except TypeError as exc:
        raise CheckpointError(f"{path}: bad tracker config {obj['config']} ({exc})") from exc
    check_fits(obj["state_dict"], model.state_dict(), f"{path}: checkpoint does not fit the tracker")
    model.load_state_dict(obj["state_dict"])
    return model
