"""Tests for models/tracker.py: shapes, chaining, padding, losses, checkpoints and a short training run
(CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.flow import CheckpointError
from models.tracker import (
    UNTRACKED_LOGIT,
    PointTracker,
    TrackerConfig,
    load_tracker,
    save_tracker,
    track_long,
    track_sequence_loss,
    visibility_loss,
)

TINY = TrackerConfig(feat_dim=32, hidden_dim=64, levels=2, radius=3, blocks=2)


def translating_clips(rng, batch, frames=8, size=64, n=16, vmax=3, velocity=None):
    """Random-texture clips under a constant integer translation, and the exact tracks of n points.

    np.roll wraps the texture around; queries start in the centre, so no track crosses the seam.
    ``velocity`` (vx, vy) fixes the motion, otherwise it is drawn per clip from [-vmax, vmax]^2.
    Returns video (B, T, 3, size, size) float [0, 1] and tracks (B, T, n, 2) as (x, y).
    """
    videos, tracks = [], []
    for _ in range(batch):
        coarse = torch.from_numpy(rng.random((1, 3, size // 4, size // 4), dtype=np.float32))
        texture = 0.5 * F.interpolate(coarse, size=(size, size), mode="bilinear")[0].numpy()
        texture += 0.25 * rng.random((3, size, size), dtype=np.float32)  # fine detail to lock onto
        vx, vy = rng.integers(-vmax, vmax + 1, size=2) if velocity is None else velocity
        videos.append(np.stack([np.roll(texture, (vy * t, vx * t), axis=(1, 2)) for t in range(frames)]))
        start = rng.uniform(size / 2 - 10, size / 2 + 10, size=(n, 2))
        tracks.append(start[None] + np.array([vx, vy])[None, None] * np.arange(frames)[:, None, None])
    return torch.from_numpy(np.stack(videos)), torch.from_numpy(np.stack(tracks)).float()


def test_window_shapes_and_padding_round_trip():
    torch.manual_seed(0)
    model = PointTracker(TINY)
    video = torch.rand(2, 8, 3, 50, 61)  # not a multiple of the pad size: padded inside, un-padded after
    queries = torch.rand(2, 5, 2) * torch.tensor([60.0, 49.0])
    preds, vis = model(video, queries, iters=3)
    assert len(preds) == 3 and all(p.shape == (2, 8, 5, 2) for p in preds)
    assert vis.shape == (2, 8, 5)
    # frame 0 is the query: it comes back exactly in input coordinates, whatever the padding was
    torch.testing.assert_close(preds[-1][:, 0], queries, rtol=0, atol=1e-4)
    uint8 = model((video * 255).byte(), queries, iters=1)[0][-1]
    assert uint8.shape == (2, 8, 5, 2)


def test_track_long_shapes_and_query_frames():
    torch.manual_seed(0)
    model = PointTracker(TINY)
    video = torch.rand(1, 20, 3, 48, 52)
    queries = torch.tensor([[[0.0, 10.0, 12.0], [5.0, 20.0, 30.0], [19.0, 40.0, 40.0], [12.0, 3.0, 5.0]]])
    coords, vis = track_long(model, video, queries, iters=2)
    assert coords.shape == (1, 20, 4, 2) and vis.shape == (1, 20, 4)
    for i, (t, x, y) in enumerate(queries[0].tolist()):
        torch.testing.assert_close(coords[0, int(t), i], torch.tensor([x, y]))
    assert torch.isfinite(coords).all() and torch.isfinite(vis).all()
    forward, fvis = track_long(model, video, queries, iters=2, direction="forward")
    assert torch.all(fvis[0, :5, 1] == UNTRACKED_LOGIT)  # before its query frame: not tracked
    backward, bvis = track_long(model, video, queries, iters=2, direction="backward")
    assert torch.all(bvis[0, 13:, 3] == UNTRACKED_LOGIT)
    # "both" is forward from the query frame on and backward before it
    torch.testing.assert_close(coords[0, 5:, 1], forward[0, 5:, 1])
    torch.testing.assert_close(coords[0, :5, 1], backward[0, :5, 1])
    # backward is forward on the time-reversed clip, with query frames reversed too
    reversed_queries = torch.cat([19 - queries[..., :1], queries[..., 1:]], dim=-1)
    mirrored, mvis = track_long(model, video.flip(1), reversed_queries, iters=2, direction="forward")
    torch.testing.assert_close(backward, mirrored.flip(1))
    torch.testing.assert_close(bvis, mvis.flip(1))
    with pytest.raises(ValueError, match="direction"):
        track_long(model, video, queries, direction="sideways")


def test_losses():
    target = torch.randn(2, 8, 4, 2)
    assert track_sequence_loss([target, target], target).item() == 0.0
    bad = target + 2.0
    assert track_sequence_loss([target, bad], target) > track_sequence_loss([bad, target], target)
    valid = torch.zeros(2, 8, 4)
    assert track_sequence_loss([bad], target, valid).item() == 0.0
    visible = torch.randint(0, 2, (2, 8, 4)).float()
    assert (visibility_loss((visible * 2 - 1) * 10, visible)
            < visibility_loss(-(visible * 2 - 1) * 10, visible))


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = PointTracker(TINY)
    save_tracker(model, tmp_path / "tracker.pt")
    loaded = load_tracker(tmp_path / "tracker.pt")
    assert loaded.config == TINY
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a point-tracker"):
        load_tracker(tmp_path / "foreign.pt")
    blob = torch.load(tmp_path / "tracker.pt", weights_only=True)
    blob["state_dict"]["vis_head.weight"] = torch.zeros(3, 3)
    torch.save(blob, tmp_path / "misshaped.pt")
    with pytest.raises(CheckpointError, match="vis_head.weight"):
        load_tracker(tmp_path / "misshaped.pt")


def test_short_training_halves_the_error():
    """~100 AdamW steps on translating textures cut the L1 error by more than half, windowed and chained."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = PointTracker(TINY)
    test_video, test_tracks = translating_clips(rng, 8)

    def error() -> float:
        with torch.no_grad():
            return (model(test_video, test_tracks[:, 0], iters=3)[0][-1] - test_tracks).abs().mean().item()

    before = error()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(100):
        video, tracks = translating_clips(rng, 4)
        preds, _ = model(video, tracks[:, 0], iters=3)
        loss = track_sequence_loss(preds, tracks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    assert after < 0.5 * before, (before, after)

    # chained over 20 frames, queried at frames 0, 6 and 13, both directions (1 px/frame keeps
    # every point inside the 64 px frame for all 20 frames)
    video, tracks = translating_clips(rng, 1, frames=20, n=6, velocity=(1, -1))
    qt = torch.tensor([0, 6, 13, 0, 6, 13])
    queries = torch.cat([qt[:, None].float(), tracks[0, qt, torch.arange(6)]], dim=-1)[None]
    coords, _ = track_long(model, video, queries, iters=3)
    error = (coords - tracks).abs().mean(-1)  # (1, T, N)
    static = (queries[:, None, :, 1:] - tracks).abs().mean(-1)  # "nothing moves" baseline
    before_query = torch.arange(20)[None, :, None] < qt[None, None, :]  # tracked backward in time
    for part in (before_query, ~before_query):
        assert error[part].mean() < 0.5 * static[part].mean(), (error[part].mean(), static[part].mean())
