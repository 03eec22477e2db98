"""decode: frames equal an ffmpeg reference, sampling follows the params, bad files are skipped
and reported, a killed run leaves no output and resumes to the same store, and shards decoded
concurrently then committed give the same store as one unsharded run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core.errors import StageError
from pipeline.core.shards import ProgressMarkers, Shard
from stages.decode import Params, run, sample_clips
from tests.conftest import ffmpeg_reference

REPO = Path(__file__).resolve().parents[2]


def decode(tmp_path: Path, source: Path, **overrides) -> tuple[zarr.Group, dict]:
    params = Params(**{"workers": 0, "num_frames": 8, "stride": 2, "store_size": 64, **overrides})
    out = run(params, videos=source, clips=tmp_path / "clips.zarr", report=tmp_path / "report.json")
    return zarr.open_group(str(out["clips"]), mode="r"), json.loads(out["report"].read_text())


def test_unscaled_frames_equal_ffmpeg_decode(tmp_path, make_video):
    video = make_video("raw/a/v.mp4", num_frames=30, height=64, width=64)
    store, _ = decode(tmp_path, tmp_path / "raw", clips_per_video=2)
    reference = ffmpeg_reference(video)
    for row in range(store["frames"].shape[0]):
        start = int(store["start"][row])
        expected = reference[start:start + 8 * 2:2]
        assert np.abs(store["frames"][row].astype(int) - expected).max() <= 1
        assert np.array_equal(store["frames"][row], expected)


@pytest.mark.parametrize("backend", ["decord", "ffmpeg"])
def test_scaled_frames_match_ffmpeg_within_one_level(tmp_path, make_video, backend):
    video = make_video("raw/v.mp4", num_frames=30, height=72, width=120)
    store, _ = decode(tmp_path, tmp_path / "raw", store_size=48, clips_per_video=1, backend=backend)
    # short side 72 -> 48 gives width 80; the centre crop keeps columns 16..63
    reference = ffmpeg_reference(video, vf="scale=80:48:flags=bilinear,crop=48:48:16:0")
    frames = store["frames"][0].astype(int)
    assert frames.shape == (8, 48, 48, 3)
    assert np.abs(frames - reference[0:16:2]).max() <= 1


def test_clip_count_and_frame_indices_follow_params(tmp_path, make_video):
    video = make_video("raw/v.mp4", num_frames=50)
    store, report = decode(tmp_path, tmp_path / "raw", num_frames=8, stride=3, clips_per_video=3)
    # span = 7 * 3 + 1 = 22 frames; starts evenly spaced over [0, 50 - 22]
    assert list(store["start"][:]) == [0, 14, 28]
    assert store["frames"].shape == (3, 8, 64, 64, 3)
    reference = ffmpeg_reference(video)
    for row, start in enumerate([0, 14, 28]):
        assert np.array_equal(store["frames"][row], reference[start:start + 22:3])
    assert report["clips"] == 3 and store["label"][:].tolist() == [-1, -1, -1]


def test_sampling_at_target_fps_and_short_videos():
    params = Params(num_frames=4, target_fps=10, clips_per_video=2)
    assert sample_clips(100, 50.0, params) == [[0, 5, 10, 15], [84, 89, 94, 99]]
    assert sample_clips(15, 50.0, params) == []          # needs 16 frames
    assert sample_clips(16, 50.0, params) == [[0, 5, 10, 15]]  # one distinct start only


def test_labels_splits_and_metadata(tmp_path, make_video):
    for cls in ("jump", "run"):
        for i in range(5):
            make_video(f"raw/{cls}/{cls}{i}.mp4", num_frames=20, seed=i)
    store, _ = decode(tmp_path, tmp_path / "raw", clips_per_video=1, val_fraction=0.2)
    assert store.attrs["class_names"] == ["jump", "run"]
    assert sorted(store["label"][:].tolist()) == [0] * 5 + [1] * 5
    splits = store["split"][:]
    labels = store["label"][:]
    assert [(labels[splits == 1] == c).sum() for c in (0, 1)] == [1, 1]  # stratified hold-out
    assert store["frames"].chunks == (1, 8, 64, 64, 3)
    paths = store["videos"][:]
    assert all(paths[v].endswith(".mp4") for v in store["video"][:])


def test_bad_files_are_skipped_with_reasons(tmp_path, make_video):
    good = [make_video(f"raw/c/good{i}.mp4", num_frames=24, seed=i) for i in range(3)]
    full = make_video("raw/c/trunc.mp4", num_frames=24).read_bytes()
    (tmp_path / "raw/c/trunc.mp4").write_bytes(full[: len(full) // 2])
    (tmp_path / "raw/c/empty.mp4").write_bytes(b"")
    (tmp_path / "raw/c/text.mp4").write_text("this is not a video\n")
    make_video("raw/c/short.mp4", num_frames=5)
    store, report = decode(tmp_path, tmp_path / "raw", clips_per_video=1, max_failed_fraction=0.6)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"trunc.mp4", "empty.mp4", "text.mp4", "short.mp4"}
    assert "0 bytes" in reasons["empty.mp4"]
    assert "too short" in reasons["short.mp4"] and "5 frames" in reasons["short.mp4"]
    assert "unreadable" in reasons["text.mp4"] and "unreadable" in reasons["trunc.mp4"]
    assert report["videos_decoded"] == 3 and store["frames"].shape[0] == 3
    decoded = {Path(store["videos"][v]).name for v in store["video"][:]}
    assert decoded == {p.name for p in good}


def test_file_failing_mid_decode_is_dropped_and_store_compacted(tmp_path, make_video):
    make_video("raw/a0.mp4", num_frames=60, seed=1)
    # faststart puts the index first, so a truncated copy probes fine and fails mid-stream
    full = make_video("raw/a1.mp4", num_frames=60, seed=2, extra_args=("-movflags", "+faststart"))
    (tmp_path / "raw/a1.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    make_video("raw/a2.mp4", num_frames=60, seed=3)
    store, report = decode(tmp_path, tmp_path / "raw", clips_per_video=2)
    assert [Path(s["path"]).name for s in report["skipped"]] == ["a1.mp4"]
    assert store["frames"].shape[0] == 4
    assert store["video"][:].tolist() == [0, 0, 2, 2]
    reference = ffmpeg_reference(tmp_path / "raw/a2.mp4")
    start = int(store["start"][3])
    assert np.array_equal(store["frames"][3], reference[start:start + 16:2])


def test_too_many_failures_fail_the_stage(tmp_path, make_video):
    make_video("raw/good.mp4")
    (tmp_path / "raw/bad.mp4").write_text("nope")
    with pytest.raises(StageError, match="1 of 2 videos could not be decoded"):
        decode(tmp_path, tmp_path / "raw", max_failed_fraction=0.25)
    assert not (tmp_path / "clips.zarr").exists()


def test_workers_give_the_same_store(tmp_path, make_video):
    for i in range(4):
        make_video(f"raw/x/v{i}.mp4", num_frames=30, seed=i)
    one, _ = decode(tmp_path / "one", tmp_path / "raw")
    two, _ = decode(tmp_path / "two", tmp_path / "raw", workers=2)
    assert np.array_equal(one["frames"][:], two["frames"][:])


def _decode_cli(root: Path, clips: str) -> list[str]:
    return [sys.executable, "-m", "stages.decode", "--set", f"paths.raw={root / 'raw'}",
            "--set", f"paths.clips={root / clips}", "--set", f"paths.reports={root / 'reports'}",
            "--set", "decode.workers=0", "--set", "decode.num_frames=8",
            "--set", "decode.store_size=96", "--set", "decode.clips_per_video=4"]


def test_killed_decode_leaves_nothing_and_resumes_to_same_store(tmp_path, make_video):
    for i in range(12):
        make_video(f"raw/c{i % 2}/v{i}.mp4", num_frames=60, height=192, width=256, seed=i)
    env = {**os.environ, "MAM2_MLFLOW": "0", "PYTHONPATH": str(REPO)}
    subprocess.run(_decode_cli(tmp_path, "ref.zarr"), env=env, check=True, cwd=tmp_path,
                   capture_output=True)
    process = subprocess.Popen(_decode_cli(tmp_path, "clips.zarr"), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / ".clips.zarr.partial" / "_progress" / "done"
    deadline = time.time() + 60
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "clips.zarr").exists()
    finished = len(list(done.iterdir()))
    assert 0 < finished < 12, "the kill should land mid-run"
    subprocess.run(_decode_cli(tmp_path, "clips.zarr"), env=env, check=True, cwd=tmp_path,
                   capture_output=True)
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    out = zarr.open_group(str(tmp_path / "clips.zarr"), mode="r")
    for name in ("frames", "label", "video", "start", "split", "videos"):
        assert np.array_equal(ref[name][:], out[name][:]), name
    assert dict(ref.attrs) == dict(out.attrs)
    assert not (tmp_path / ".clips.zarr.partial").exists()


def test_two_concurrent_shards_then_finalize_equal_one_unsharded_run(tmp_path, make_video):
    for i in range(5):
        make_video(f"raw/c{i % 2}/v{i}.mp4", num_frames=40, seed=i)
    make_video("raw/c0/short.mp4", num_frames=6)  # skipped by the plan, reported by the final run
    env = {**os.environ, "MAM2_MLFLOW": "0", "PYTHONPATH": str(REPO)}

    def cli(clips: str, reports: str, *extra: str) -> list[str]:
        return [*_decode_cli(tmp_path, clips), "--set", f"paths.reports={tmp_path / reports}", *extra]

    subprocess.run(cli("ref.zarr", "ref_reports"), env=env, check=True, cwd=tmp_path,
                   capture_output=True)
    shards = [subprocess.Popen(cli("clips.zarr", "reports", "--shard", f"{i}/2"), env=env,
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for i in range(2)]
    for shard in shards:
        assert shard.wait() == 0, shard.stderr.read().decode()
    partial = tmp_path / ".clips.zarr.partial"
    assert not (tmp_path / "clips.zarr").exists() and partial.exists()
    assert len(list((partial / "_progress" / "done").iterdir())) == 5
    final = subprocess.run(cli("clips.zarr", "reports"), env=env, cwd=tmp_path, capture_output=True,
                           text=True)
    assert final.returncode == 0, final.stderr
    assert "resuming: 5 of 5 videos already decoded" in final.stderr, "finalising decodes nothing"
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    out = zarr.open_group(str(tmp_path / "clips.zarr"), mode="r")
    for name in ("frames", "label", "video", "start", "split", "videos"):
        assert np.array_equal(ref[name][:], out[name][:]), name
    assert dict(ref.attrs) == dict(out.attrs) and out["frames"].shape[0] == 5 * 4
    ref_report, report = (json.loads((tmp_path / d / "decode.json").read_text())
                          for d in ("ref_reports", "reports"))
    assert report == ref_report and [Path(s["path"]).name for s in report["skipped"]] == ["short.mp4"]
    assert not partial.exists() and not (tmp_path / ".clips.zarr.partial.lock").exists()


def test_shards_decode_only_their_videos_and_failures_are_dropped_at_the_end(tmp_path, make_video):
    for i in range(4):
        make_video(f"raw/v{i}.mp4", num_frames=20, seed=i)
    params = Params(workers=0, num_frames=4, stride=2, store_size=32, clips_per_video=1)
    paths = {"videos": tmp_path / "raw", "report": tmp_path / "report.json"}
    ref = zarr.open_group(str(run(params, clips=tmp_path / "ref.zarr", **paths)["clips"]), mode="r")
    out = run(params, clips=tmp_path / "clips.zarr", shard=Shard(0, 2), **paths)
    partial = tmp_path / ".clips.zarr.partial"
    assert out == {"partial": partial}
    assert sorted(p.name for p in (partial / "_progress" / "done").iterdir()) == ["0", "2"]
    frames = zarr.open_group(str(partial), mode="r")["frames"]
    assert frames[0].any() and not frames[1].any() and frames[2].any() and not frames[3].any()
    assert not (tmp_path / "clips.zarr").exists()
    # what shard 1 leaves when video 3 breaks under it: a failure marker with the reason
    ProgressMarkers(partial).mark_failed(3, "decode failed: truncated stream")
    run(params, clips=tmp_path / "clips.zarr", shard=Shard(1, 2), **paths)
    final = run(params, clips=tmp_path / "clips.zarr", **paths)
    store = zarr.open_group(str(final["clips"]), mode="r")
    assert store["video"][:].tolist() == [0, 1, 2]
    assert np.array_equal(store["frames"][:], ref["frames"][:3])
    report = json.loads(final["report"].read_text())
    assert report["skipped"] == [{"path": str(tmp_path / "raw/v3.mp4"),
                                  "reason": "decode failed: truncated stream"}]


def test_resize_decord_refuses_falls_back_to_ffmpeg(tmp_path, make_video):
    # decord 0.6 cannot resize 64x64 to 48x48 ("size must exactly match"); ffmpeg takes over
    video = make_video("raw/v.mp4", num_frames=20, height=64, width=64)
    store, report = decode(tmp_path, tmp_path / "raw", store_size=48, clips_per_video=1)
    assert report["skipped"] == []
    reference = ffmpeg_reference(video, vf="scale=48:48:flags=bilinear,crop=48:48:0:0")
    assert np.abs(store["frames"][0].astype(int) - reference[0:16:2]).max() <= 1
