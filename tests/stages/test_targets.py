"""targets: codes of frame t are the codes of frame t (and of its mirror image), RGB differences are
exact, the store's layout and attrs, the stored arrays equal those of the previous (serial, one codec)
write path, clear errors, and a killed or sharded run gives the same store."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.vqgan import VQGAN, VQGANConfig, load_vqgan, save_vqgan
from pipeline.core.errors import StageError
from pipeline.core.shards import Shard
from pipeline.core.stores import compressor, train_rows
from pipeline.data.pretrain_data import open_targets
from stages.targets import Params, contiguous_batches, encode_clips, run
from tests.models.test_vqgan import _reference_model
from tests.stages.test_tokenizer import make_clips_store

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[2]


def codebook_on_data(model: VQGAN, clips: Path) -> VQGAN:
    """Seed every code on an encoder output of these clips, so codes vary like a trained model's
    (a random codebook maps nearly every frame to one code)."""
    frames = zarr.open_group(str(clips), mode="r")["frames"][:]
    x = torch.from_numpy(frames.reshape(-1, *frames.shape[2:])).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        latent = model.encode_to_latent(x)
    model.reinit_dead_codes(torch.zeros(model.codebook_size), latent,
                            generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """Demo-like clips (7 clips of 4 frames of 32 px) and an f4 tokenizer seeded on them."""
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=7, num_frames=4, size=32)
    tokenizer = save_vqgan(codebook_on_data(_reference_model(), clips), tmp_path / "vqgan.pt")
    return clips, tokenizer


def make_targets(tmp_path: Path, clips: Path, tokenizer: Path, name: str = "targets.zarr",
                 **overrides) -> zarr.Group:
    out = run(Params(**{"clips_per_batch": 3, "frames_per_batch": 5, **overrides}), clips=clips,
              tokenizer=tokenizer, targets=tmp_path / name)
    return zarr.open_group(str(out["targets"]), mode="r")


def encode_frame(model: VQGAN, frame: np.ndarray) -> np.ndarray:
    """The codes of one (H, W, 3) uint8 frame, encoded alone."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    return model.encode(x)[0].numpy()


def test_codes_of_frame_t_are_the_codes_of_frame_t_and_of_its_mirror(tmp_path, inputs):
    clips, tokenizer = inputs
    targets = make_targets(tmp_path, clips, tokenizer)
    frames = zarr.open_group(str(clips), mode="r")["frames"][:]
    codes, flipped = targets["codes"][:], targets["codes_flipped"][:]
    assert codes.shape == flipped.shape == (7, 4, 8, 8) and codes.dtype == np.int16
    model = codebook_on_data(_reference_model(), clips)
    for row in range(7):
        for t in range(4):
            assert np.array_equal(codes[row, t], encode_frame(model, frames[row, t])), (row, t)
            mirror = np.ascontiguousarray(frames[row, t, :, ::-1])
            assert np.array_equal(flipped[row, t], encode_frame(model, mirror)), (row, t)
    # the check has teeth: codes differ between frames, and a mirror's codes are not mirrored codes
    assert len(np.unique(codes)) > 8 and not np.array_equal(codes[:, 0], codes[:, 1])
    assert not np.array_equal(flipped, codes[..., ::-1])


def test_rgb_diff_is_exact_and_the_store_is_described(tmp_path, inputs):
    clips, tokenizer = inputs
    targets = make_targets(tmp_path, clips, tokenizer)
    frames = zarr.open_group(str(clips), mode="r")["frames"][:]
    diff = targets["rgb_diff"][:]
    assert diff.dtype == np.int16 and diff.shape == (7, 3, 32, 32, 3)
    assert np.array_equal(diff, frames[:, 1:].astype(np.int16) - frames[:, :-1].astype(np.int16))
    assert diff.min() < -50 and diff.max() > 50  # both signs survive: no uint8 wrap-around
    for name in ("codes", "codes_flipped", "rgb_diff"):
        assert targets[name].chunks[0] == 1 and targets[name].chunks[1:] == targets[name].shape[1:]
        assert "blosc" in str(targets[name].compressors).lower()
    attrs = dict(targets.attrs)
    assert attrs["codebook_size"] == 64 and attrs["downsample"] == 4 and attrs["frame_size"] == 32
    assert attrs["tokenizer_sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert attrs["tokenizer"] == str(tokenizer) and attrs["clips"] == str(clips)
    assert not (tmp_path / ".targets.zarr.partial").exists()


def previous_store(path: Path, clips: Path, tokenizer: Path, clips_per_batch: int = 3) -> zarr.Group:
    """The targets as the stage wrote them before its worker processes and its rgb_diff codec: serial,
    in this process, every array Blosc-zstd level 3 with byte shuffle."""
    frames = zarr.open_group(str(clips), mode="r")["frames"]
    n, t, h, w = frames.shape[:4]
    model = load_vqgan(tokenizer).eval()
    group = zarr.open_group(str(path), mode="w")
    for name in ("codes", "codes_flipped"):
        group.create_array(name, shape=(n, t, h // 4, w // 4), chunks=(1, t, h // 4, w // 4), dtype="int16",
                           compressors=compressor(), fill_value=-1)
    group.create_array("rgb_diff", shape=(n, t - 1, h, w, 3), chunks=(1, t - 1, h, w, 3), dtype="int16",
                       compressors=compressor(), fill_value=0)
    group.attrs.update({"downsample": 4, "codebook_size": model.codebook_size})
    for start in range(0, n, clips_per_batch):
        rows = slice(start, min(start + clips_per_batch, n))
        batch = frames[rows]
        group["codes"][rows], group["codes_flipped"][rows] = encode_clips(
            model, batch, device=torch.device("cpu"), frames_per_batch=5)
        group["rgb_diff"][rows] = np.diff(batch.astype(np.int16), axis=1)
    return group


def test_stored_arrays_equal_the_previous_write_path_and_both_layouts_read(tmp_path, inputs):
    clips, tokenizer = inputs
    targets = make_targets(tmp_path, clips, tokenizer, writers=2)  # 3 batches, 2 writers, 4 ring slots
    before = previous_store(tmp_path / "before.zarr", clips, tokenizer)
    frames_shape = zarr.open_group(str(clips), mode="r")["frames"].shape
    for store in (tmp_path / "targets.zarr", tmp_path / "before.zarr"):  # the loader opens both
        open_targets(store, frames_shape)
    for name in ("codes", "codes_flipped", "rgb_diff"):
        assert targets[name].dtype == before[name].dtype and targets[name].chunks == before[name].chunks
        assert np.array_equal(targets[name][:], before[name][:]), name
    # only the codec changed, and only for rgb_diff: Zarr records it per array
    assert "bitshuffle" in str(targets["rgb_diff"].compressors).lower()
    assert str(targets["codes"].compressors) == str(before["codes"].compressors)


def test_bad_inputs_are_clear_errors(tmp_path, inputs):
    clips, tokenizer = inputs
    with pytest.raises(FileNotFoundError, match="run `mam2 tokenizer` first"):
        make_targets(tmp_path, clips, tmp_path / "none.pt")
    (junk := tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(StageError, match="tokenizer: .*junk.pt"):
        make_targets(tmp_path, clips, junk)
    odd = make_clips_store(tmp_path / "odd.zarr", num_clips=1, num_frames=2, size=30)
    with pytest.raises(StageError, match="30x30 px are not a multiple of the tokenizer's down-sampling 4"):
        make_targets(tmp_path, odd, tokenizer)
    with pytest.raises(FileNotFoundError, match="clips store not found"):
        make_targets(tmp_path, tmp_path / "nothing.zarr", tokenizer)
    assert not (tmp_path / "targets.zarr").exists()


def test_two_shards_then_the_final_run_equal_one_run(tmp_path, inputs):
    clips, tokenizer = inputs
    whole = make_targets(tmp_path, clips, tokenizer, "whole.zarr")
    parts = {"clips": clips, "tokenizer": tokenizer, "targets": tmp_path / "targets.zarr"}
    params = Params(clips_per_batch=3, frames_per_batch=5)
    assert run(params, shard=Shard(1, 2), **parts) == {"partial": tmp_path / ".targets.zarr.partial"}
    done = tmp_path / ".targets.zarr.partial" / "_progress" / "done"
    assert sorted(p.name for p in done.iterdir()) == ["3"]  # batches start at rows 0, 3, 6
    run(params, shard=Shard(0, 2), **parts)
    assert sorted(p.name for p in done.iterdir()) == ["0", "3", "6"]
    final = zarr.open_group(str(run(params, **parts)["targets"]), mode="r")
    for name in ("codes", "codes_flipped", "rgb_diff"):
        assert np.array_equal(final[name][:], whole[name][:]), name
    assert dict(final.attrs) == dict(whole.attrs)


def test_pretraining_rows_only_write_what_pretraining_reads(tmp_path, inputs):
    """rows=pretraining writes the train-split (and unlabelled) clips exactly as rows=all does and leaves
    the held-out ones unwritten; batches never span a skipped clip."""
    clips, tokenizer = inputs  # clips 3 and 7 (0-based: 3) are the val split of make_clips_store
    whole = make_targets(tmp_path, clips, tokenizer, "whole.zarr")
    part = make_targets(tmp_path, clips, tokenizer, "part.zarr", rows="pretraining")
    store = zarr.open_group(str(clips), mode="r")
    written = train_rows(store)
    held_out = np.setdiff1d(np.arange(7), written)
    assert written.tolist() == [0, 1, 2, 4, 5, 6] and held_out.tolist() == [3]
    for name, fill in (("codes", -1), ("codes_flipped", -1), ("rgb_diff", 0)):
        assert np.array_equal(part[name][written], whole[name][written]), name
        assert (part[name][held_out] == fill).all(), name
    assert part.attrs["rows"] == "pretraining" and part.attrs["written_clips"] == 6
    assert whole.attrs["rows"] == "all" and whole.attrs["written_clips"] == 7
    assert contiguous_batches(np.array([0, 1, 2, 4, 5, 6, 9]), 2) == [
        range(0, 2), range(2, 3), range(4, 6), range(6, 7), range(9, 10)]
    assert contiguous_batches(np.array([], int), 4) == []


def _targets_cli(root: Path) -> list[str]:
    return [sys.executable, "-m", "stages.targets", "--set", f"paths.clips={root / 'clips.zarr'}",
            "--set", f"paths.artifacts={root / 'artifacts'}",
            "--set", f"paths.targets={root / 'targets.zarr'}", "--set", "targets.clips_per_batch=1",
            "--set", "targets.device=cpu"]


def test_killed_targets_resumes_to_the_same_store(tmp_path):
    # 64 px frames through the f16 demo architecture, one clip per batch: a kill lands mid-run
    clips = make_clips_store(tmp_path / "clips.zarr", num_clips=12, num_frames=4, size=64)
    torch.manual_seed(0)
    model = codebook_on_data(VQGAN(VQGANConfig.tiny_f16()), clips)
    (tmp_path / "artifacts" / "tokenizer").mkdir(parents=True)
    tokenizer = save_vqgan(model, tmp_path / "artifacts" / "tokenizer" / "vqgan.pt")
    # the reference runs in this process (one thread, like the CLI runs under OMP_NUM_THREADS=1)
    ref = run(Params(clips_per_batch=1, device="cpu"), clips=clips, tokenizer=tokenizer,
              targets=tmp_path / "ref" / "targets.zarr")["targets"]
    env = {**os.environ, "MAM2_MLFLOW": "0", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_targets_cli(tmp_path), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / ".targets.zarr.partial" / "_progress" / "done"
    deadline = time.time() + 60
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "targets.zarr").exists()
    finished = len(list(done.iterdir()))
    assert 0 < finished < 12, "the kill should land mid-run"
    resumed = subprocess.run(_targets_cli(tmp_path), env=env, cwd=tmp_path, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of 12 batches already written" in resumed.stderr
    ref = zarr.open_group(str(ref), mode="r")
    out = zarr.open_group(str(tmp_path / "targets.zarr"), mode="r")
    for name in ("codes", "codes_flipped", "rgb_diff"):
        assert np.array_equal(ref[name][:], out[name][:]), name
    assert dict(ref.attrs) == dict(out.attrs) and (out["codes"][:] >= 0).all()
    assert len(np.unique(out["codes"][:])) > 20
    assert not (tmp_path / ".targets.zarr.partial").exists()
