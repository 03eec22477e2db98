"""Pre-training loader: crops and flips keep every target exact, windows and splits follow the params,
samples depend only on their seed, and bad stores or sizes fail clearly.

The fixture's codes are a deterministic function of each f x f cell's pixels (a position-weighted sum,
so a mirrored cell gets another code), so the codes of any cropped or flipped clip can be recomputed
from its frames and compared with what the loader took from the store.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.core.errors import StageError
from pipeline.core.stores import compressor, create_clips_store
from pipeline.data.pretrain_data import PretrainDataset, Sampling, check_sampling, train_rows

CODEBOOK = 64


def cell_codes(frames: np.ndarray, f: int, codebook: int = CODEBOOK) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H/f, W/f) int16: a weighted sum of each cell's pixels, mod codebook."""
    *lead, h, w, c = frames.shape
    cells = frames.reshape(*lead, h // f, f, w // f, f, c).swapaxes(-3, -4)  # (..., h, w, f, f, c)
    weights = np.arange(1, f * f * c + 1, dtype=np.int64).reshape(f, f, c)
    return ((cells.astype(np.int64) * weights).sum(axis=(-1, -2, -3)) % codebook).astype(np.int16)


def mean_colour_codes(frames: np.ndarray, f: int, codebook: int = CODEBOOK) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H/f, W/f) int16: each cell's mean colour on 4 levels per channel,
    a code a tiny model can learn to predict (cell hashes are deliberately unpredictable)."""
    *lead, h, w, c = frames.shape
    mean = frames.reshape(*lead, h // f, f, w // f, f, c).mean(axis=(-2, -4))
    levels = (mean // 64).astype(np.int64)
    return ((levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]) % codebook).astype(np.int16)


def write_stores(root: Path, *, clips: int = 6, frames: int = 6, size: int = 32, f: int = 8,
                 splits: list[int] | None = None, labels: list[int] | None = None, seed: int = 0,
                 smooth: bool = False) -> tuple[Path, Path]:
    """A clips store and its targets store (exact RGB differences).

    Default: random frames with cell-hash codes. `smooth`: a moving colour gradient plus a little noise
    with mean-colour codes, which a tiny model can learn from.
    """
    rng = np.random.default_rng(seed)
    if smooth:  # per clip and channel, a sinusoidal grating drifting at its own velocity
        t, y, x = np.mgrid[0:frames, 0:size, 0:size].astype(np.float64)
        video = np.empty((clips, frames, size, size, 3), np.uint8)
        for n in range(clips):
            for c in range(3):
                (ky, kx), (vy, vx) = rng.uniform(-1, 1, 2) / 8, rng.uniform(-2, 2, 2)
                phase = ky * (y - vy * t) + kx * (x - vx * t) + rng.uniform(0, 2 * np.pi)
                video[n, ..., c] = np.round(127 + 120 * np.sin(phase))
    else:
        video = rng.integers(0, 256, (clips, frames, size, size, 3), dtype=np.uint8)
    splits = [0] * clips if splits is None else splits
    labels = [n % 2 for n in range(clips)] if labels is None else labels
    clips_path, targets_path = root / "clips.zarr", root / "targets.zarr"
    store = create_clips_store(clips_path, num_clips=clips, num_frames=frames, size=size,
                               labels=np.array(labels), videos=np.arange(clips), starts=np.zeros(clips),
                               splits=np.array(splits), video_paths=[f"v{n}.mp4" for n in range(clips)],
                               attrs={"class_names": ["a", "b"]})
    store["frames"][:] = video
    group = zarr.open_group(str(targets_path), mode="w")
    codes = mean_colour_codes if smooth else cell_codes
    arrays = {"codes": codes(video, f), "codes_flipped": codes(video[:, :, :, ::-1], f),
              "rgb_diff": video[:, 1:].astype(np.int16) - video[:, :-1].astype(np.int16)}
    for name, values in arrays.items():
        group.create_array(name, shape=values.shape, chunks=(1, *values.shape[1:]), dtype=values.dtype,
                           compressors=compressor())[:] = values
    group.attrs.update({"codebook_size": CODEBOOK, "downsample": f, "frame_size": size,
                        "tokenizer": "none", "clips": str(clips_path)})
    return clips_path, targets_path


def sampling(**overrides) -> Sampling:
    return Sampling(**{"num_frames": 4, "input_size": 16, "patch_size": 8, "tubelet_size": 2, **overrides})


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    return write_stores(tmp_path)


def find_crop(stored: np.ndarray, sample: np.ndarray) -> tuple[int, int, int, bool]:
    """Where `sample` (T, s, s, 3) sits in the stored clip (T', S, S, 3): (t0, y0, x0, flipped)."""
    t, s = sample.shape[:2]
    for flipped in (False, True):
        view = sample[:, :, ::-1] if flipped else sample
        for t0 in range(stored.shape[0] - t + 1):
            for y0 in range(stored.shape[1] - s + 1):
                for x0 in range(stored.shape[2] - s + 1):
                    if np.array_equal(stored[t0:t0 + t, y0:y0 + s, x0:x0 + s], view):
                        return t0, y0, x0, flipped
    raise AssertionError("the sample is not a crop of its stored clip")


def test_crops_and_flips_keep_codes_and_differences_exact(stores):
    clips_path, targets_path = stores
    dataset = PretrainDataset(clips_path, targets_path, sampling(rgb_diff=True))
    stored = zarr.open_group(str(clips_path), mode="r")["frames"][:]
    seen = set()
    for seed in range(24):
        item = dataset[(seed % len(dataset), seed)]
        frames = item["frames"].numpy()
        assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
        t0, y0, x0, flipped = find_crop(stored[item["row"]], frames)
        assert flipped == item["flipped"] and y0 % 8 == 0 and x0 % 8 == 0
        seen.add((t0, y0, x0, flipped))
        np.testing.assert_array_equal(item["codes"].numpy(), cell_codes(frames, 8))
        np.testing.assert_array_equal(item["rgb_diff"].numpy(), np.diff(frames.astype(np.int16), axis=0))
    # the augmentation really varies: windows, both axes of the 3x3 aligned corners, and flips
    assert {s[0] for s in seen} == {0, 1, 2} and {s[3] for s in seen} == {False, True}
    assert {s[1] for s in seen} == {0, 8, 16} and {s[2] for s in seen} == {0, 8, 16}


def test_samples_depend_only_on_their_seed_and_masks_follow_the_params(stores):
    dataset = PretrainDataset(*stores, sampling(mask_ratio=0.75, rgb_diff=True))
    a, b, c = dataset[(1, 5)], dataset[(1, 5)], dataset[(1, 6)]
    for key in ("frames", "codes", "rgb_diff", "mask"):
        assert torch.equal(a[key], b[key]), key
    assert not all(torch.equal(a[k], c[k]) for k in ("frames", "mask"))
    # grid 2 x 2 x 2 tokens; tube masking hides round(0.75 * 4) = 3 patches on every time slot
    assert a["mask"].shape == (8,) and a["mask"].dtype == torch.bool
    assert a["mask"].view(2, 4).sum(1).tolist() == [3, 3] and torch.equal(a["mask"][:4], a["mask"][4:])
    random = PretrainDataset(*stores, sampling(mask_kind="random", mask_ratio=0.5))
    masks = torch.stack([random[(0, s)]["mask"] for s in range(8)])
    assert (masks.sum(1) == 4).all() and not all(torch.equal(m[:4], m[4:]) for m in masks)


def test_a_batch_read_at_once_equals_its_samples_read_one_by_one(stores):
    dataset = PretrainDataset(*stores, sampling(rgb_diff=True))
    keys = [(index % len(dataset), seed) for index, seed in enumerate(range(40, 52))]
    batch = dataset.__getitems__(keys)
    assert {item["flipped"] for item in batch} == {False, True}
    for key, item in zip(keys, batch, strict=True):
        alone = dataset[key]
        assert item.keys() == alone.keys()
        for name, value in alone.items():
            assert torch.equal(item[name], value) if torch.is_tensor(value) else item[name] == value, name


def test_unflipped_full_size_crop_is_the_stored_clip(tmp_path):
    clips_path, targets_path = write_stores(tmp_path, size=16, frames=4)
    dataset = PretrainDataset(clips_path, targets_path, sampling(flip=False, rgb_diff=True))
    item = dataset[(2, 0)]
    store, targets = zarr.open_group(str(clips_path)), zarr.open_group(str(targets_path))
    np.testing.assert_array_equal(item["frames"].numpy(), store["frames"][item["row"]])
    np.testing.assert_array_equal(item["codes"].numpy(), targets["codes"][item["row"]])
    np.testing.assert_array_equal(item["rgb_diff"].numpy(), targets["rgb_diff"][item["row"]])


def test_only_train_and_unlabelled_clips_are_used(tmp_path):
    clips_path, targets_path = write_stores(tmp_path, splits=[0, 1, 2, 0, 1, 1], labels=[0, 1, 0, 1, -1, 0])
    dataset = PretrainDataset(clips_path, targets_path, sampling())
    assert dataset.rows.tolist() == [0, 3, 4] and len(dataset) == 3
    assert {dataset[(i, i)]["row"] for i in range(3)} == {0, 3, 4}
    store = zarr.open_group(str(clips_path), mode="r+")
    del store["split"]
    assert train_rows(store).tolist() == list(range(6))


def test_objectives_without_targets_read_none(tmp_path, stores):
    clips_path, _ = stores
    pixels_only = sampling(codes=False)
    item = PretrainDataset(clips_path, tmp_path / "absent.zarr", pixels_only)[(0, 0)]
    assert set(item) == {"frames", "mask", "row", "flipped"}
    with pytest.raises(FileNotFoundError, match="absent.zarr"):
        PretrainDataset(clips_path, tmp_path / "absent.zarr", sampling())
    with pytest.raises(FileNotFoundError, match="absent.zarr"):
        PretrainDataset(clips_path, tmp_path / "absent.zarr", sampling(codes=False, rgb_diff=True))


def test_bad_stores_and_sizes_fail_clearly(tmp_path, stores):
    clips_path, targets_path = stores
    with pytest.raises(StageError, match="num_frames=8 exceeds the stored 6"):
        PretrainDataset(clips_path, targets_path, sampling(num_frames=8))
    with pytest.raises(StageError, match="input_size=12 must be a multiple"):
        check_sampling(sampling(input_size=12, patch_size=4), (6, 6, 32, 32, 3), 8)
    with pytest.raises(StageError, match="patch_size=4 must be a multiple"):
        check_sampling(sampling(patch_size=4), (6, 6, 32, 32, 3), 8)
    other_clips, _ = write_stores(tmp_path / "other", clips=3)
    with pytest.raises(StageError, match=r"targets.zarr/codes: shape \(6, 6, 4, 4\) does not match"):
        PretrainDataset(other_clips, targets_path, sampling())
    group = zarr.open_group(str(targets_path), mode="r+")
    del group["rgb_diff"]
    assert "rgb_diff" not in PretrainDataset(clips_path, targets_path, sampling())[(0, 0)]
    with pytest.raises(StageError, match="no rgb_diff array"):
        PretrainDataset(clips_path, targets_path, sampling(rgb_diff=True))
    del group["codes_flipped"]
    with pytest.raises(StageError, match="missing codes_flipped"):
        PretrainDataset(clips_path, targets_path, sampling())


def test_pickled_dataset_reopens_its_stores(stores):
    """Worker processes get a pickled copy: it must carry no open handles and sample identically."""
    dataset = PretrainDataset(*stores, sampling(rgb_diff=True))
    before = dataset[(2, 9)]  # opens the stores in this process
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._arrays is None
    after = copy[(2, 9)]
    for key in ("frames", "codes", "rgb_diff", "mask"):
        assert torch.equal(before[key], after[key]), key


@pytest.mark.slow
def test_loader_workers_give_the_same_batches(stores):
    """The stage's loader (one-block collation) gives, with 0, 1 and 2 spawned workers, the batches
    default_collate gives in-process: same seeds, same bits."""
    from pipeline.core.training import Dist, SeededBatchSampler, TrainParams
    from pipeline.data.shared_batch import collate_shared

    dataset = PretrainDataset(*stores, sampling(rgb_diff=True))
    params = TrainParams(steps=3, batch_size=4)

    def batches(workers: int, collate=None) -> list[dict]:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=SeededBatchSampler(len(dataset), params, Dist()), num_workers=workers,
            collate_fn=collate, multiprocessing_context="spawn" if workers else None)
        return list(loader)

    reference = batches(0)
    for workers in (0, 1, 2):
        got = batches(workers, collate_shared)
        assert len(got) == len(reference) == 3
        for one, other in zip(reference, got, strict=True):
            assert list(one) == list(other)
            for key in one:
                assert one[key].dtype == other[key].dtype, (workers, key)
                assert torch.equal(one[key], other[key]), (workers, key)


@pytest.mark.parametrize("budget_clips", [100, 1])  # every clip fits; one clip only (evictions each batch)
def test_the_clip_cache_serves_the_same_bits_and_reads_each_clip_once(stores, budget_clips):
    plain = PretrainDataset(*stores, sampling(rgb_diff=True))
    clip_mb = np.prod(plain.frames_shape[1:]) / 2**20
    cached = PretrainDataset(*stores, sampling(rgb_diff=True), cache_mb=budget_clips * clip_mb)
    keys = [(index % len(plain), seed) for index, seed in enumerate(range(3 * len(plain)))]  # 3 epochs
    for start in range(0, len(keys), 4):
        batch = keys[start:start + 4]
        for one, other in zip(plain.__getitems__(batch), cached.__getitems__(batch), strict=True):
            for name, value in one.items():
                assert torch.equal(value, other[name]) if torch.is_tensor(value) else value == other[name]
    assert cached[keys[0]]["frames"].equal(plain[keys[0]]["frames"])
    assert cached.cache.used <= cached.cache.budget
    if budget_clips >= len(plain):  # after the first epoch every clip is in memory
        assert cached.cache.misses == len(plain) and cached.cache.hits > 0
    else:
        assert len(cached.cache.clips) <= 1


def test_a_pickled_dataset_starts_with_an_empty_clip_cache(stores):
    dataset = PretrainDataset(*stores, sampling(), cache_mb=64)
    dataset.__getitems__([(0, 0), (1, 1)])
    assert dataset.cache.clips
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned loader worker gets
    assert not copy.cache.clips and copy.cache.used == 0 and copy.cache.budget == dataset.cache.budget
    assert copy[(0, 0)]["frames"].equal(dataset[(0, 0)]["frames"])
