"""Classification datasets over clips.zarr: labelled rows only, seeded augmentation, exact eval views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classify.data import (
    ClipSpec,
    ClipViews,
    EvalViews,
    TrainClips,
    ViewPlan,
    crop_origin,
    labelled_rows,
    random_erase,
    random_resized_box,
    store_info,
    window_start,
)
from pipeline.core.errors import StageError
from pipeline.core.stores import create_clips_store
from pipeline.core.tensors import clip_to_tensor
from pipeline.data.synthetic import CLASS_STYLE, SceneStyle, render_class_clip


def write_class_store(path: Path, classes: list[str], *, videos_per_class: int, clips_per_video: int = 1,
                      val_every: int = 4, unlabelled: int = 0, num_frames: int = 8, size: int = 32,
                      seed: int = 0, style: SceneStyle = CLASS_STYLE) -> Path:
    """A clips store of motion-class clips rendered by `pipeline.data.synthetic`: every `val_every`-th video
    of a class is in the val split; `unlabelled` extra videos get label -1 (train split); `style` sets
    the scene statistics (sizes, speeds, textures)."""
    rng = np.random.default_rng(seed)
    labels, videos, splits, clips = [], [], [], []
    video = 0
    for label, name in enumerate(classes):
        for i in range(videos_per_class):
            for _ in range(clips_per_video):
                clips.append(render_class_clip(name, size=(size, size), num_frames=num_frames, rng=rng,
                                               style=style))
                labels.append(label)
                videos.append(video)
                splits.append(1 if i % val_every == val_every - 1 else 0)
            video += 1
    for _ in range(unlabelled):
        clips.append(render_class_clip(classes[0], size=(size, size), num_frames=num_frames, rng=rng,
                                       style=style))
        labels.append(-1)
        videos.append(video)
        splits.append(0)
        video += 1
    group = create_clips_store(path, num_clips=len(clips), num_frames=num_frames, size=size,
                               labels=np.array(labels), videos=np.array(videos), starts=np.zeros(len(clips)),
                               splits=np.array(splits), video_paths=[f"v{i}.mp4" for i in range(video)],
                               attrs={"class_names": list(classes), "fps": 25.0})
    group["frames"][:] = np.stack(clips)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("classify") / "clips.zarr"
    return write_class_store(path, ["translate_left", "translate_right"], videos_per_class=4,
                             clips_per_video=2, unlabelled=2, num_frames=8, size=32)


def test_only_labelled_clips_of_the_split(store):
    train_rows, val_rows = labelled_rows(store, "train"), labelled_rows(store, "val")
    assert len(train_rows) == 12 and len(val_rows) == 4  # 2 classes x (3 train + 1 val videos) x 2 clips
    assert not set(train_rows) & set(val_rows)
    assert 16 not in train_rows and 17 not in train_rows  # the unlabelled videos
    with pytest.raises(StageError, match="no labelled clips in split 'test'"):
        labelled_rows(store, "test")


def test_training_samples_follow_their_seed(store):
    data = TrainClips(store, "train", ClipSpec(4, 2, 24), scale=(0.3, 1.0))
    a, b, c = data[(3, 11)], data[(3, 11)], data[(3, 12)]
    assert a["clip"].shape == (3, 4, 24, 24) and a["clip"].dtype == torch.float32
    assert torch.equal(a["clip"], b["clip"]) and not torch.equal(a["clip"], c["clip"])
    assert a["label"] == int(data.labels[3]) and a["seed"] == 11
    assert 0.0 <= float(a["clip"].min()) and float(a["clip"].max()) <= 1.0


def test_rand_augment_is_seeded_and_shared_by_all_frames(store):
    plain = TrainClips(store, "train", ClipSpec(4, 1, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    augmented = TrainClips(store, "train", ClipSpec(4, 1, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           rand_augment=(2, 15))
    torch.manual_seed(0)
    first = augmented[(0, 5)]["clip"]
    torch.manual_seed(1)  # the global RNG must not matter
    assert torch.equal(first, augmented[(0, 5)]["clip"])
    changed = [not torch.equal(augmented[(0, s)]["clip"], plain[(0, s)]["clip"]) for s in range(6)]
    assert any(changed)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def erased_box(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool: where `after` differs from `before` in any channel."""
    return (after != before).any(dim=0)


def test_random_erasing_off_leaves_clips_unchanged(store):
    clip = torch.rand(3, 4, 32, 32)
    assert random_erase(clip, 0.0, np.random.default_rng(0)) is clip
    plain = TrainClips(store, "train", ClipSpec(4, 1, 24))
    off = TrainClips(store, "train", ClipSpec(4, 1, 24), random_erasing=0.0, norm=IMAGENET)
    for seed in range(4):
        assert torch.equal(plain[(1, seed)]["clip"], off[(1, seed)]["clip"])
    with pytest.raises(ValueError, match="probability"):
        TrainClips(store, "train", ClipSpec(4, 1, 24), random_erasing=1.5)


def test_random_erasing_one_box_the_same_in_every_frame():
    """VideoMAE's video erasing: one box per clip at the same place in every frame, inside the frame and
    smaller than it, covering 2%-33% of it; fresh noise in each frame; the input is not changed."""
    clip = torch.full((3, 4, 40, 48), 0.5)
    areas = []
    for seed in range(50):
        out = random_erase(clip, 1.0, np.random.default_rng(seed))
        assert torch.equal(clip, torch.full_like(clip, 0.5))
        box = erased_box(clip, out)
        assert all(torch.equal(box[0], box[t]) for t in range(1, 4))
        rows, cols = box[0].any(dim=1).nonzero().flatten(), box[0].any(dim=0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 0 < h < 40 and 0 < w < 48
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # contiguous ...
        assert int(box[0].sum()) == h * w  # ... and a full rectangle
        assert not torch.equal(out[:, 0][:, box[0]], out[:, 1][:, box[0]])  # per-frame noise
        areas.append(h * w / (40 * 48))
    assert 0.015 <= min(areas) and max(areas) <= 0.36 and max(areas) > 0.15
    seeded = [random_erase(clip, 1.0, np.random.default_rng(7)) for _ in range(2)]
    assert torch.equal(*seeded)
    hits = sum(not torch.equal(random_erase(clip, 0.25, np.random.default_rng(s)), clip) for s in range(400))
    assert 70 <= hits <= 130  # probability 0.25


def test_random_erasing_noise_is_standard_normal_after_input_normalisation(store):
    """VideoMAE erases normalised clips with N(0, 1) pixels: our clips are normalised by the model, so
    the noise is mean + std x N(0, 1) in [0, 1] units, N(0, 1) once the model normalises."""
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in IMAGENET)
    clip = torch.rand(3, 8, 64, 64)
    values = []
    for seed in range(20):
        out = random_erase(clip, 1.0, np.random.default_rng(seed), mean=IMAGENET[0], std=IMAGENET[1])
        box = erased_box(clip, out)
        normalised = (out - mean) / std
        values.append(normalised.permute(1, 2, 3, 0)[box].flatten())
    values = torch.cat(values)
    assert values.numel() > 50_000
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 1) < 0.02
    # through the dataset: erased clips leave [0, 1], the same box in each of their frames
    data = TrainClips(store, "train", ClipSpec(4, 1, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                      random_erasing=1.0, norm=IMAGENET)
    plain = TrainClips(store, "train", ClipSpec(4, 1, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    erased, clean = data[(2, 3)]["clip"], plain[(2, 3)]["clip"]
    assert torch.equal(erased, data[(2, 3)]["clip"])  # seeded
    assert float(erased.min()) < 0 or float(erased.max()) > 1
    box = erased_box(clean, erased)
    assert box.any() and all(torch.equal(box[0], box[t]) for t in range(1, 4))


def test_eval_views_are_exact_crops_of_the_stored_frames(store):
    import zarr

    spec = ClipSpec(3, 2, 24)  # spans 5 of the 8 stored frames: windows start at 0 and 3
    views = EvalViews(store, "val", spec, num_clips=2, num_crops=3)
    assert len(views) == 4 * 2 * 3
    group = zarr.open_group(str(store), mode="r")
    row = int(labelled_rows(store, "val")[1])
    stored = clip_to_tensor(group["frames"][row])  # (C, 8, 32, 32)
    for window, first in enumerate([0, 3]):
        for crop, left in enumerate([0, 4, 8]):
            item = views[6 + 3 * window + crop]
            expected = stored[:, first:first + 5:2, 4:28, left:left + 24]
            assert torch.equal(item["clip"], expected)
            assert item["video"] == int(group["video"][row]) and item["label"] == int(group["label"][row])
            assert (item["window"], item["crop"]) == (window, crop)
    centre = EvalViews(store, "val", spec, num_clips=1, num_crops=1)[1]["clip"]
    assert torch.equal(centre, stored[:, 1:6:2, 4:28, 4:28])  # one window: the centred one
    resized = EvalViews(store, "val", spec, num_clips=1, num_crops=1, short_side=24)[1]["clip"]
    expected = torch.nn.functional.interpolate(stored[:, 1:6:2], size=(24, 24), mode="bilinear",
                                               antialias=True)
    torch.testing.assert_close(resized, expected)  # the whole frame, at the training crops' scale


def test_clip_views_of_frames_in_memory_equal_the_eval_views_of_the_store(store):
    """`mam2 predict` cuts a decoded file's clips with ClipViews: the same views EvalViews cuts from the
    store's rows, in the same order; the store's video table names each video."""
    import zarr

    spec = ClipSpec(3, 2, 24)
    views = EvalViews(store, "val", spec, num_clips=2, num_crops=3, short_side=28)
    group = zarr.open_group(str(store), mode="r")
    rows = labelled_rows(store, "val")
    plan = ViewPlan(spec, num_clips=2, num_crops=3, short_side=28)
    memory = ClipViews([group["frames"][int(r)] for r in rows], group["video"][:][rows].tolist(), plan)
    assert len(memory) == len(views) == len(rows) * plan.per_clip
    for index in range(len(views)):
        ours, theirs = memory[index], views[index]
        assert torch.equal(ours["clip"], theirs["clip"]), index
        assert (ours["video"], ours["window"], ours["crop"], ours["label"]) == (
            theirs["video"], theirs["window"], theirs["crop"], -1)
    assert views.video_names == [str(name) for name in group["videos"][:]]
    assert views.video_names[views[0]["video"]].endswith(".mp4")
    with pytest.raises(ValueError, match="too small"):
        ClipViews([np.zeros((4, 32, 32, 3), np.uint8)], [0], plan)  # 4 frames, a view spans 5


def test_crop_geometry():
    assert [window_start(16, 8, w, 3) for w in range(3)] == [0, 4, 8] and window_start(16, 8, 0, 1) == 4
    assert window_start(8, 8, 1, 2) == 0  # no slack: every window is the whole clip
    assert crop_origin((128, 128), 112, 0, 1) == (8, 8)
    assert [crop_origin((128, 160), 112, c, 3) for c in range(3)] == [(8, 0), (8, 24), (8, 48)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = random_resized_box((40, 60), (0.2, 0.9), (0.5, 2.0), rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.15 * 2400 <= h * w <= 0.95 * 2400


def test_clip_spec_must_fit_the_store(store):
    assert store_info(store).class_names == ["translate_left", "translate_right"]
    with pytest.raises(StageError, match="need 15 stored frames"):
        store_info(store, ClipSpec(8, 2, 24))
    with pytest.raises(StageError, match="at least 48px"):
        TrainClips(store, "train", ClipSpec(4, 1, 48))
