"""The one place where on-disk arrays become model tensors and back.

On disk, clips are (..., T, H, W, C) uint8; models take (..., C, T, H, W) float in [0, 1].
Images are (..., H, W, C) uint8 on disk and (..., C, H, W) float in models.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange


def clip_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., T, H, W, C) uint8 -> (..., C, T, H, W) float32 in [0, 1]."""
    frames = torch.as_tensor(frames)
    return rearrange(frames, "... t h w c -> ... c t h w").float().div_(255.0)


def tensor_to_clip(video: torch.Tensor) -> np.ndarray:
    """(..., C, T, H, W) float in [0, 1] -> (..., T, H, W, C) uint8 (rounded, clipped)."""
    video = rearrange(video.detach().float().cpu(), "... c t h w -> ... t h w c")
    return video.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def image_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 in [0, 1]."""
    images = torch.as_tensor(images)
    return rearrange(images, "... h w c -> ... c h w").float().div_(255.0)


def tensor_to_image(images: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) float in [0, 1] -> (..., H, W, C) uint8."""
    images = rearrange(images.detach().float().cpu(), "... c h w -> ... h w c")
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
