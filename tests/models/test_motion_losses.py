"""The track losses see only the points that can count, with the loss and gradients of the whole batch."""

import pytest
import torch

from models.motion_losses import labelled_points_only, photometric_track_loss, track_label_loss
from models.tracker import PointTracker
from tests.models.test_tracker import TINY  # the tracker tests' tiny config


def padded_batch(seed: int = 0, points: int = 24) -> dict:
    """Two samples of 8 frames whose labels fill 5 and 9 of the point slots, scattered among padding."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.rand(2, 8, 3, 32, 32, generator=gen)
    tracks = torch.rand(2, 8, points, 2, generator=gen) * 31
    valid = torch.zeros(2, 8, points, dtype=torch.bool)
    for sample, count in ((0, 5), (1, 9)):
        slots = torch.randperm(points, generator=gen)[:count]
        valid[sample][:, slots] = torch.rand(8, count, generator=gen) > 0.2
        valid[sample][0, slots] = True  # every labelled point's query is valid
    return {"video": video, "tracks": tracks, "valid": valid}


def test_labelled_points_move_to_the_front_in_order_and_padding_is_dropped():
    batch = padded_batch()
    used = batch["valid"].any(dim=1)
    cut = labelled_points_only(batch, used)
    assert cut["tracks"].shape == (2, 8, 9, 2) and cut["valid"].shape == (2, 8, 9)
    for sample in range(2):
        slots = used[sample].nonzero()[:, 0]
        kept = len(slots)
        assert torch.equal(cut["tracks"][sample, :, :kept], batch["tracks"][sample][:, slots])
        assert torch.equal(cut["valid"][sample, :, :kept], batch["valid"][sample][:, slots])
        assert not cut["valid"][sample, :, kept:].any()
    assert cut["video"] is batch["video"]
    assert labelled_points_only(cut, torch.ones(2, 9, dtype=torch.bool)) is cut  # nothing to cut


@pytest.mark.parametrize("loss_fn", [track_label_loss, photometric_track_loss])
def test_the_cut_batch_has_the_whole_batchs_loss_and_gradients(loss_fn, monkeypatch):
    torch.manual_seed(0)
    model = PointTracker(TINY)
    for param in model.parameters():  # the mixer's last layer starts at zero: move it so tracks move
        param.data.add_(0.01 * torch.randn_like(param))
    batch = padded_batch()

    def run() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = loss_fn(model, batch, iters=2, gamma=0.8)["loss"]
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_cut, grads_cut = run()
    monkeypatch.setattr("models.motion_losses.labelled_points_only", lambda b, used: b)
    loss_all, grads_all = run()
    assert loss_cut == pytest.approx(loss_all, rel=1e-5) and loss_all > 0
    assert len(grads_cut) == len(grads_all)
    for cut, whole in zip(grads_cut, grads_all):
        torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-7)
