"""Losses that refine a motion model: on pseudo-labels, or the self-supervised photometric baseline.

Each takes the model and a batch of the label datasets (`pipeline.motion.augment`) and returns the
dict the shared training loop expects ("loss" plus logged scalars):

- `flow_label_loss`, `track_label_loss`: the L1 sequence losses (RAFT's, gamma 0.85; PIPs', gamma
  0.8) on the valid labels only (Sun et al. 2024, stage 2);
- `photometric_flow_loss`, `photometric_track_loss`: the baseline the paper found to make a good
  supervised model worse: brightness constancy under the estimated motion (+ edge-aware smoothness
  for flow); the labels' positions are not used (only which track queries are valid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.flow import estimate_flow, flow_sequence_loss, lands_inside, to_unit_range, warp
from models.tracker import PointTracker, track_sequence_loss


def photometric_error(img0: Tensor, img1: Tensor, flow: Tensor) -> Tensor:
    """Per pair mean |img0 - warp(img1, flow)| over pixels whose flow lands inside img1: (B,).

    Images (B, 3, H, W) uint8 or float in [0, 1]; flow (B, 2, H, W) from img0 to img1. Pixels
    that leave the frame have no counterpart to compare with, so they are left out.
    """
    img0, img1 = to_unit_range(img0), to_unit_range(img1)
    inside = lands_inside(flow)
    diff = (img0 - warp(img1, flow)).abs().mean(1)  # (B, H, W)
    return (diff * inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1)


def flow_label_loss(model: torch.nn.Module, batch: dict, *, updates: int, gamma: float) -> dict:
    """L1 sequence loss on the valid flow labels; logs the last update's EPE against them."""
    preds = estimate_flow(model, batch["img0"], batch["img1"], updates, return_all=True)
    valid = batch["valid"]
    epe = ((torch.linalg.vector_norm(preds[-1] - batch["flow"], dim=1) * valid).sum()
           / valid.sum().clamp(min=1))
    return {"loss": flow_sequence_loss(preds, batch["flow"], valid, gamma), "label_epe": epe.detach(),
            "valid_fraction": valid.float().mean()}


def labelled_points_only(batch: dict, used: Tensor) -> dict:
    """The batch cut to the points a loss can use: each sample's points with `used` (B, P) true move
    to the front in their order, and the points beyond the batch's largest count of them are dropped
    (those left behind them are padding: the loss weighs them zero).

    The tracker moves each point on its own and the losses average over the used points only, so the
    loss and its gradients are those of the whole batch. Densified windows label 10-22% of their
    point slots (the demo's), so this saves most of the tracker's training cost."""
    keep = int(used.sum(-1).max())
    if keep == used.shape[-1]:
        return batch
    order = torch.sort((~used).to(torch.uint8), dim=-1, stable=True).indices[:, :max(keep, 1)]  # (B, P')
    out = dict(batch)
    for key in ("tracks", "valid"):
        value = batch[key]
        index = order[:, None].expand(-1, value.shape[1], -1)
        if value.dim() == 4:
            index = index[..., None].expand(-1, -1, -1, value.shape[-1])
        out[key] = value.gather(2, index)
    return out


def track_label_loss(model: PointTracker, batch: dict, *, iters: int, gamma: float) -> dict:
    """L1 sequence loss on the valid track labels (queries: frame 0); visibility is not trained."""
    batch = labelled_points_only(batch, batch["valid"].any(dim=1))
    tracks, valid = batch["tracks"], batch["valid"]
    preds, _ = model(batch["video"], tracks[:, 0], iters)
    dist = torch.linalg.vector_norm(preds[-1] - tracks, dim=-1)
    return {"loss": track_sequence_loss(preds, tracks, valid, gamma),
            "label_dist": ((dist * valid).sum() / valid.sum().clamp(min=1)).detach()}


def photometric_flow_loss(model: torch.nn.Module, batch: dict, *, updates: int, gamma: float,
                          smoothness: float) -> dict:
    """Self-supervised baseline: per update, |I0 - warp(I1, f)| (pixels landing inside) plus
    edge-aware first-order smoothness, weighted gamma^(n-1-i) like the sequence loss."""
    img0, img1 = batch["img0"], batch["img1"]
    preds = estimate_flow(model, img0, img1, updates, return_all=True)
    total, n = img0.new_zeros(()), len(preds)
    for i, flow in enumerate(preds):
        photo = photometric_error(img0, img1, flow).mean()
        smooth = edge_aware_smoothness(flow, img0)
        total = total + gamma ** (n - 1 - i) * (photo + smoothness * smooth)
    return {"loss": total, "photometric": photo.detach(), "smoothness": smooth.detach()}


def edge_aware_smoothness(flow: torch.Tensor, image: torch.Tensor, edge: float = 10.0) -> torch.Tensor:
    """Mean |d flow| over x and y, down-weighted where the image has edges (motion boundaries)."""
    total = flow.new_zeros(())
    for dim in (-1, -2):
        d_flow = flow.diff(dim=dim).abs().mean(1)
        weight = torch.exp(-edge * image.diff(dim=dim).abs().mean(1))
        total = total + (d_flow * weight).mean()
    return total / 2


def photometric_track_loss(model: PointTracker, batch: dict, *, iters: int, gamma: float) -> dict:
    """Self-supervised baseline for tracks: each point keeps its query colour in every frame
    (|I_t(p_t) - I_0(q)|), over points whose query is valid; the label positions are not used."""
    batch = labelled_points_only(batch, batch["valid"][:, 0])
    video, queries, valid = batch["video"], batch["tracks"][:, 0], batch["valid"][:, 0]
    preds, _ = model(video, queries, iters)
    reference = sample_colors(video[:, :1], queries[:, None])  # (B, 1, P, 3)
    weight = valid[:, None].to(video.dtype).expand(-1, video.shape[1], -1)  # (B, S, P)
    total, n = video.new_zeros(()), len(preds)
    for i, coords in enumerate(preds):
        diff = (sample_colors(video, coords) - reference).abs().mean(-1)
        photo = (diff * weight).sum() / weight.sum().clamp(min=1)
        total = total + gamma ** (n - 1 - i) * photo
    return {"loss": total, "photometric": photo.detach()}


def sample_colors(video: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear colours (B, S, P, 3) of video (B, S, 3, H, W) at pixel coordinates (B, S, P, 2)."""
    b, s, _, h, w = video.shape
    grid = torch.stack([2 * coords[..., 0] / (w - 1) - 1, 2 * coords[..., 1] / (h - 1) - 1], -1)
    out = F.grid_sample(video.flatten(0, 1), grid.flatten(0, 1)[:, :, None], align_corners=True,
                        padding_mode="border")
    return out[..., 0].reshape(b, s, 3, -1).transpose(2, 3)
