"""Video mixup/cutmix: the right axes, area-corrected soft targets, seeded by the batch's samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.classify.mixup import VideoMixup, cutmix_box


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 4, 16, 20, generator=gen), torch.arange(n) % 3


def test_cutmix_pastes_a_spatial_tube_over_all_frames():
    clip, label = batch()
    mixer = VideoMixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    for seed in range(5):
        mixed, target = mixer.mix(clip, label, np.random.default_rng(seed))
        pasted = (mixed != clip).any(dim=(0, 1, 2))  # (H, W): pixels taken from the partner clip
        ys, xs = torch.nonzero(pasted, as_tuple=True)
        if len(ys) == 0:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert pasted[y0:y1, x0:x1].all()  # one rectangle in (H, W) ...
        box = (slice(None), slice(None), slice(None), slice(y0, y1), slice(x0, x1))
        assert torch.equal(mixed[box], clip.flip(0)[box])  # ... from the flipped batch, in every frame
        kept = 1 - (y1 - y0) * (x1 - x0) / (16 * 20)
        expected = kept * torch.eye(3)[label] + (1 - kept) * torch.eye(3)[label.flip(0)]
        torch.testing.assert_close(target, expected.float())


def test_mixup_is_a_convex_combination_with_matching_targets():
    clip, label = batch()
    mixer = VideoMixup(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    mixed, target = mixer.mix(clip, label, np.random.default_rng(3))
    # recover lambda from one element and check every element and the target agree with it
    diff = clip - clip.flip(0)
    lam = float(((mixed - clip.flip(0)) * diff).sum() / (diff * diff).sum())
    torch.testing.assert_close(mixed, lam * clip + (1 - lam) * clip.flip(0))
    smooth = torch.full((4, 3), 0.1 / 3) + 0.9 * torch.eye(3)[label]
    torch.testing.assert_close(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5, rtol=1e-5)
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_collate_is_deterministic_in_the_sample_seeds_only():
    clip, label = batch()
    samples = [{"clip": clip[i], "label": int(label[i]), "seed": 100 + i} for i in range(4)]
    mixer = VideoMixup(num_classes=3)
    torch.manual_seed(0)
    np.random.seed(0)
    first = mixer(samples)
    torch.manual_seed(1)
    np.random.seed(1)
    again = mixer(samples)
    assert torch.equal(first["clip"], again["clip"]) and torch.equal(first["target"], again["target"])
    other = mixer([{**s, "seed": s["seed"] + 1} for s in samples])
    assert not torch.equal(first["target"], other["target"])
    assert torch.equal(first["label"], label) and first["clip"].shape == (4, 3, 4, 16, 20)


def test_no_mixing_still_smooths_labels():
    clip, label = batch()
    mixed, target = VideoMixup(3, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.3).mix(
        clip, label, np.random.default_rng(0))
    assert torch.equal(mixed, clip)
    torch.testing.assert_close(target, torch.full((4, 3), 0.1) + 0.7 * torch.eye(3)[label])


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.99])
def test_cutmix_box_area_matches_corrected_lambda(lam):
    (y0, y1, x0, x1), kept = cutmix_box((16, 20), lam, np.random.default_rng(1))
    assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 20
    assert kept == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 320)
