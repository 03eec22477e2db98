"""Mixup / CutMix for video batches (B, C, T, H, W) with soft, label-smoothed targets, seeded per batch.

Why not `timm.data.Mixup` itself: its CutMix pastes ``x[:, :, y0:y1, x0:x1]``, which on a 5-D video
batch cuts time and height instead of height and width, and it draws from the global NumPy RNG, which
the shared training loop neither seeds per batch nor restores on resume. Here the box spans all frames
(a tube: the pasted region keeps its motion), and the draws come from a generator seeded with the
batch's sample seeds, so a resumed or re-sharded run mixes exactly the same way. The soft targets are
timm's (`timm.data.mixup.mixup_target`), as is the batch pairing (each sample with the flipped batch).

`VideoMixup` is a DataLoader ``collate_fn``: it stacks the samples of `pipeline.classify.data.TrainClips`
and returns {"clip", "target" (B, classes) soft, "label" (B,) hard}.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import mixup_target
from torch.utils.data import default_collate


@dataclass(frozen=True)
class VideoMixup:
    """Batch-wise mixup (``mixup_alpha``) or cutmix (``cutmix_alpha``), applied with probability ``prob``;
    with both enabled, cutmix is picked with probability ``switch_prob``. Alphas of 0 disable a kind;
    label smoothing applies with or without mixing."""

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        rng = np.random.default_rng([int(s["seed"]) for s in samples])
        clip, target = self.mix(batch["clip"], batch["label"], rng)
        return {"clip": clip, "target": target, "label": batch["label"]}

    def mix(self, clip: torch.Tensor, label: torch.Tensor, rng: np.random.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed clips and soft targets; ``clip`` (B, C, T, H, W) is not modified in place."""
        lam = 1.0
        kind = self._draw_kind(rng)
        if kind == "mixup":
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            clip = clip * lam + clip.flip(0) * (1.0 - lam)
        elif kind == "cutmix":
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            (y0, y1, x0, x1), lam = cutmix_box(clip.shape[-2:], lam, rng)
            clip = clip.clone()
            clip[..., y0:y1, x0:x1] = clip.flip(0)[..., y0:y1, x0:x1]
        return clip, mixup_target(label, self.num_classes, lam, self.label_smoothing)

    def _draw_kind(self, rng: np.random.Generator) -> str | None:
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if not (use_mixup or use_cutmix) or rng.random() >= self.prob:
            return None
        if use_mixup and use_cutmix:
            return "cutmix" if rng.random() < self.switch_prob else "mixup"
        return "mixup" if use_mixup else "cutmix"


def cutmix_box(size: tuple[int, int], lam: float, rng: np.random.Generator
               ) -> tuple[tuple[int, int, int, int], float]:
    """A box of about (1 - lam) of the frame's area centred uniformly at random, clipped to the frame;
    returns ((y0, y1, x0, x1), lam corrected to the area actually kept)."""
    height, width = int(size[0]), int(size[1])
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + (cut_h + 1) // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + (cut_w + 1) // 2], 0, width)
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return (int(y0), int(y1), int(x0), int(x1)), float(kept)
