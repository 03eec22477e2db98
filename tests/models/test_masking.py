"""Tube and random masking: exact counts, the tube structure, determinism."""

import pytest
import torch
from einops import rearrange

from models.masking import make_mask, num_masked, random_mask, tube_mask

GRID = (8, 14, 14)  # VideoMAE's 16 x 224^2 clip with 2x16x16 tubelets


def test_tube_mask_counts_and_structure():
    mask = tube_mask(4, GRID, 0.9, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 8 * 14 * 14) and mask.dtype == torch.bool
    assert round(0.9 * 196) == 176
    assert mask.sum(1).tolist() == [176 * 8] * 4
    per_slot = rearrange(mask, "b (t hw) -> b t hw", t=8)
    assert torch.equal(per_slot, per_slot[:, :1].expand_as(per_slot))  # same spatial mask in every slot
    assert not torch.equal(per_slot[0, 0], per_slot[1, 0])  # but a different one per clip


def test_random_mask_count_exact_and_not_a_tube():
    mask = random_mask(3, (4, 7, 7), 0.75, generator=torch.Generator().manual_seed(1))
    assert mask.sum(1).tolist() == [round(0.75 * 196)] * 3
    per_slot = rearrange(mask, "b (t hw) -> b t hw", t=4)
    assert not torch.equal(per_slot[:, 0], per_slot[:, 1])


@pytest.mark.parametrize("kind", ["tube", "random"])
def test_masks_are_deterministic_under_a_generator(kind):
    def draw(seed):
        return make_mask(kind, 2, GRID, 0.9, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_bad_ratio_and_kind_are_rejected():
    assert num_masked(10, 0.0) == 0
    with pytest.raises(ValueError, match="ratio"):
        tube_mask(1, GRID, 1.0)
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("block", 1, GRID)
