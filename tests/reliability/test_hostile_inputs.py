"""Odd and hostile inputs get one clear line before any work: a file named like an option, a video
listed twice (or in two splits), rotation metadata, sizes the encoder refuses, files that are not
checkpoints, duplicate YAML keys. (A params_file outside the project: tests/pipeline/orchestrate.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import zarr

from pipeline.data.video import probe, read_clips
from tests.reliability.helpers import decode_sets, error_lines, run_stage


def test_a_file_named_like_an_option_is_read_as_a_file(video_project):
    (video_project / "-report.mp4").write_bytes((video_project / "raw/c0/v0.mp4").read_bytes())
    (video_project / "list.csv").write_text("path,label\n-report.mp4,a\nraw/c1/v1.mp4,b\n")
    # a relative manifest in the working directory: the row reaches the decoders as `-report.mp4`
    result = run_stage(video_project, "decode", *decode_sets(video_project), "paths.raw=list.csv",
                       "decode.backend=ffmpeg")
    assert result.returncode == 0, result.stderr
    assert not list(video_project.glob("ffprobe-*.log")) and not list(video_project.glob("ffmpeg-*.log"))
    assert zarr.open_group(str(video_project / "clips.zarr"), mode="r")["frames"].shape[0] == 4


def test_a_video_listed_twice_is_refused_naming_it_or_kept_once(video_project):
    (video_project / "list.csv").write_text("path,label,split\nraw/c0/v0.mp4,a,train\n"
                                            "raw/c1/v1.mp4,b,train\nraw/c0/v0.mp4,a,val\n")
    sets = (*decode_sets(video_project), f"paths.raw={video_project / 'list.csv'}",
            f"decode.video_root={video_project}")
    refused = run_stage(video_project, "decode", *sets)
    lines = error_lines(refused.stderr)
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "v0.mp4" in lines[0] and "1 across splits" in lines[0] and "decode.duplicates" in lines[0]
    kept = run_stage(video_project, "decode", *sets, "decode.duplicates=keep_first")
    assert kept.returncode == 0, kept.stderr
    store = zarr.open_group(str(video_project / "clips.zarr"), mode="r")
    assert list(store["videos"][:]).count(str(video_project / "raw/c0/v0.mp4")) == 1


def test_both_backends_honour_rotation_metadata(video_project):
    source, rotated = video_project / "raw/c0/v0.mp4", video_project / "rotated.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c", "copy", "-metadata:s:v:0",
                    "rotate=90", str(rotated)], check=True)
    infos = {backend: probe(rotated, backend) for backend in ("decord", "ffmpeg")}
    assert {(i.width, i.height) for i in infos.values()} == {(96, 128)}, infos
    clips = [next(read_clips(rotated, info, [[0, 5, 9]], 64)) for info in infos.values()]
    assert np.array_equal(clips[0], clips[1])


def test_a_size_the_encoder_refuses_fails_validation_and_leaves_nothing(tmp_path):
    result = run_stage(tmp_path, "demo_data", "demo_data.size=33", f"paths.raw={tmp_path / 'raw'}",
                       f"paths.motion_gt={tmp_path / 'gt'}")
    assert result.returncode == 2 and "demo_data.size" in result.stderr and "multiple of 2" in result.stderr
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), list(tmp_path.iterdir())


def test_a_text_file_as_a_checkpoint_gets_one_line_before_any_training(tmp_path):
    (tmp_path / "gt" / "gt.zarr").mkdir(parents=True)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    result = run_stage(tmp_path, "motion_pretrain", f"paths.motion_gt={tmp_path / 'gt'}",
                       f"paths.runs={tmp_path / 'runs'}", f"paths.artifacts={tmp_path / 'artifacts'}",
                       "motion_pretrain.flow_checkpoint=null",
                       f"motion_pretrain.tracker_checkpoint={tmp_path / 'notes.pt'}")
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "notes.pt" in lines[0] and "weights_only" not in result.stderr
    assert not (tmp_path / "runs" / "motion_pretrain" / "flow").exists(), "the flow model never trained"


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("decode:\n  workers: 1\n  workers: 2\n")
    result = run_stage(tmp_path, "decode", extra=("--params", str(tmp_path / "params.yaml")))
    assert result.returncode == 2 and "duplicate key 'workers'" in result.stderr
    assert len(error_lines(result.stderr)) == 1


def test_duplicate_keys_in_the_project_params_file_would_be_caught():
    from pipeline.core.params import read_params_file

    assert read_params_file(Path(__file__).resolve().parents[2] / "params.yaml")
