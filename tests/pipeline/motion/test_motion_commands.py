"""`mam2 flow` and `mam2 track` on a tiny clip with known motion: conftest's `moving_frames`, a square
moving (+3, +2) px per frame over a still textured background, written to mp4."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.flow import build_flow_model
from models.flow_io import save_flow_model
from pipeline.core.params import Paths
from pipeline.data.video import probe, read_frames
from pipeline.motion import flow_cli, track_cli
from pipeline.motion.checkpoints import load_flow
from pipeline.motion.command import UsageError
from pipeline.motion.model_choice import DEFAULT_COUNTS, SHIPPED, recorded_count, resolve_model
from pipeline.motion.track_drawing import draw_track_overlay
from pipeline.motion.video_input import open_video, resized_size, select_indices
from pipeline.orchestrate.cli import COMMANDS
from pipeline.orchestrate.cli import main as mam2_main

SIDE, FRAMES, SQUARE = 128, 8, 32  # moving_frames(FRAMES, SIDE, SIDE): square of side SIDE // 4 at (3t, 2t)


@pytest.fixture
def clip(make_video) -> Path:
    return make_video("clip.mp4", num_frames=FRAMES, height=SIDE, width=SIDE)


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A params file whose paths hold no pipeline outputs (so `current` is the shipped model)."""
    path = tmp_path / "params.yaml"
    path.write_text(f"paths:\n  artifacts: {tmp_path / 'artifacts'}\n  labels: {tmp_path / 'labels.zarr'}\n"
                    f"  train_labels: {tmp_path / 'train_labels.zarr'}\n"
                    f"  motion_gt_labels: {tmp_path / 'gt_labels.zarr'}\n"
                    f"  motion_gt_train_labels: {tmp_path / 'gt_train_labels.zarr'}\n")
    return path


def frame_count(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of a video file, counted by ffprobe."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_frames,width,height", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout.strip()
    width, height, frames = map(int, out.split(","))
    return frames, width, height


# ------------------------------------------------------------------------------------------- flow


def test_flow_video_has_one_frame_per_pair_beside_the_frames(clip, tmp_path, params_file, one_thread, capsys):
    model = tmp_path / "untrained.pt"
    save_flow_model(build_flow_model("raft_small"), "raft_small", model)
    out = tmp_path / "out" / "flow.mp4"
    code = flow_cli.main([str(clip), "--out", str(out), "--model", str(model), "--updates", "2",
                          "--size", "64", "--params", str(params_file)])
    assert code == 0
    frames, width, height = frame_count(out)
    assert frames == FRAMES - 1  # one per consecutive pair
    assert width == 64 * 3  # frame | flow | a 64 x 64 colour key
    assert height > 64 and height % 2 == 0  # under a caption bar
    summary = capsys.readouterr().out
    assert f"{model} (given)" in summary and "2 RAFT updates (given)" in summary


def test_flow_of_the_moving_square_points_its_way(clip, one_thread):
    model = resolve_model("shipped", "flow.pt", Paths()).path
    frames = open_video(clip, size=0, end=3).read()
    flows = flow_cli.compute_flows(load_flow(model), frames, 8, torch.device("cpu"))
    assert flows.shape == (2, SIDE, SIDE, 2)
    inside = flows[0, 8:SQUARE - 8, 8:SQUARE - 8].reshape(-1, 2).mean(0)  # the square at (0, 0) in frame 0
    assert inside[0] > 1.5 and inside[1] > 0.8, inside  # it moves (+3, +2)
    assert np.abs(flows[0, -32:, -32:]).mean() < 1.0  # the background stands still


# ------------------------------------------------------------------------------------------ track


def test_tracked_point_follows_the_square_both_ways(clip, tmp_path, params_file, one_thread, capsys):
    out, tracks = tmp_path / "tracks.mp4", tmp_path / "tracks.json"
    centre = SQUARE / 2
    # the square's centre at frame 0, and at frame 4 (tracked backward to frame 0 too)
    points = f"{centre},{centre} {centre + 12:g},{centre + 8:g},4"
    code = track_cli.main([str(clip), "--points", points, "--out", str(out), "--tracks", str(tracks),
                           "--model", "shipped", "--params", str(params_file)])
    assert code == 0
    assert frame_count(out)[:2] == (FRAMES, SIDE)
    data = json.loads(tracks.read_text())
    assert data["frames"] == list(range(FRAMES)) and len(data["points"]) == 2
    truth = centre + np.arange(FRAMES)[:, None] * np.array([3, 2])  # (T, 2)
    for point in data["points"]:  # the square travels 25 px; the small CPU-trained tracker drifts a little
        xy = np.stack([point["x"], point["y"]], 1)
        assert np.linalg.norm(xy - truth, axis=1).max() < 6, xy
        moved = xy[-1] - xy[0]
        assert moved @ np.array([3, 2]) / np.linalg.norm(moved) / np.hypot(3, 2) > 0.95  # its direction
    assert data["points"][0]["query"] == {"x": centre, "y": centre, "frame": 0}
    assert data["points"][1]["query"] == {"x": centre + 12, "y": centre + 8, "frame": 4}
    summary = capsys.readouterr().out
    assert "(shipped)" in summary and "6 iterations (the pipeline's default)" in summary


def test_tracks_csv_is_in_the_videos_pixels(clip, tmp_path, params_file, one_thread):
    tracks = tmp_path / "tracks.csv"
    code = track_cli.main([str(clip), "--points", "20,20", "--size", "64", "--stride", "2", "--model",
                           "shipped", "--iters", "2", "--tracks", str(tracks), "--out",
                           str(tmp_path / "t.mp4"), "--params", str(params_file)])
    assert code == 0
    rows = tracks.read_text().splitlines()
    assert rows[0] == "point,frame,x,y,visible"
    assert rows[1] == "0,0,20.000,20.000,1"  # the query, mapped back from the 64 px frames
    assert [int(r.split(",")[1]) for r in rows[1:]] == [0, 2, 4, 6]


def test_points_parse_and_are_checked_against_the_frame(clip):
    points = track_cli.parse_points(["10, 20  30.5,40,3", "1,2;3,4"])
    assert points[:, :2].tolist() == [[10, 20], [30.5, 40], [1, 2], [3, 4]]
    assert points[1, 2] == 3 and np.isnan(points[0, 2])
    for bad in ("10", "a,b", "1,2,3,4", "1,2,3.5", ""):
        with pytest.raises(UsageError, match="--points"):
            track_cli.parse_points([bad])
    selection = open_video(clip, size=64, start=2, stride=2)
    queries = track_cli.queries_for(selection, np.array([[SIDE - 1, 0, 5.0]]))
    assert queries[0].tolist() == pytest.approx([1, 63.25, -0.25])  # frame 5 snaps to 4: index 1 of 2, 4, 6
    with pytest.raises(UsageError, match=r"outside the 128x128 frame"):
        track_cli.queries_for(selection, np.array([[SIDE, 3, np.nan]]))
    with pytest.raises(UsageError, match="outside the selected frames 2-6"):
        track_cli.queries_for(selection, np.array([[3, 3, 0.0]]))


# ------------------------------------------------------------------------------------------ errors


def test_errors_are_one_line(clip, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert flow_cli.main([str(bad), "--out", str(tmp_path / "o.mp4")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"mam2 flow: error: {bad}: unreadable")
    for argv, message in (([str(clip), "--points", "1;2"], "'1' is not x,y or x,y,t"),
                          ([str(clip), "--points", "500,2"], "outside the 128x128 frame"),
                          ([str(clip), "--points", "5,2", "--start", "7"], "selects 1 of the video's 8"),
                          ([str(clip), "--points", "5,2", "--device", "abacus"], "not a torch device")):
        with pytest.raises(SystemExit) as exit_info:
            track_cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert track_cli.main([str(clip), "--points", "1,1", "--model", str(tmp_path / "none.pt")]) == 1
    assert "no model file" in capsys.readouterr().err


def test_commands_are_registered_with_help(capsys):
    assert {"flow", "track"} <= set(COMMANDS)
    for name in ("flow", "track"):
        with pytest.raises(SystemExit) as exit_info:
            mam2_main([name, "--help"])
        assert exit_info.value.code == 0
        assert "--model current|shipped|PATH" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ pieces


def test_current_model_prefers_refined_then_pretrained_then_shipped(tmp_path):
    paths = Paths(artifacts=tmp_path)
    assert resolve_model("current", "flow.pt", paths).path == SHIPPED / "flow.pt"
    for folder in ("motion_pretrain", "refine/motion_gt", "refine/clips"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "flow.pt").touch()
        chosen = resolve_model("current", "flow.pt", paths)
        assert chosen.path == tmp_path / folder / "flow.pt" and chosen.origin.startswith("current")
    assert chosen.refine_target == "clips"
    assert resolve_model(str(tmp_path / "refine/motion_gt"), "flow.pt", paths).origin == "given"


def test_counts_come_from_the_label_stores(tmp_path):
    paths = Paths(labels=tmp_path / "labels.zarr", train_labels=tmp_path / "none.zarr",
                  motion_gt_labels=tmp_path / "none.zarr", motion_gt_train_labels=tmp_path / "none.zarr")
    assert recorded_count("flow_updates", paths) == (8, "the pipeline's default")
    zarr.open_group(str(tmp_path / "labels.zarr"), mode="w").attrs.update({"flow_updates": 5})
    assert recorded_count("flow_updates", paths)[0] == 5
    from stages import refine

    for key, value in DEFAULT_COUNTS.items():  # the fallback is the stages' default
        assert refine.Params.model_fields[key].default == value


def test_video_selection_sizes_and_pixel_mapping(clip):
    assert resized_size(640, 272, 256) == (256, 108)
    assert resized_size(176, 144, 256) == (176, 144)  # never enlarged
    assert resized_size(175, 143, 0) == (176, 144)  # even, for H.264
    with pytest.raises(ValueError, match="selects 0"):
        select_indices(10, 12, None, 1, 2)
    selection = open_video(clip, size=64)
    xy = np.array([[0.0, 0.0], [127.0, 64.5]])
    assert np.allclose(selection.to_original(selection.to_resized(xy)), xy)
    ffmpeg_info = dataclasses.replace(probe(clip), backend="ffmpeg")
    by_decord, by_ffmpeg = selection.read(), read_frames(clip, ffmpeg_info, list(range(FRAMES)), 64, 64)
    assert by_decord.shape == by_ffmpeg.shape == (FRAMES, 64, 64, 3)
    assert np.abs(by_decord.astype(int) - by_ffmpeg).mean() < 2


def test_occluded_points_are_rings_and_visible_ones_dots():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    tracks = np.array([[[4.0, 8.0], [24.0, 24.0]], [[14.0, 8.0], [24.0, 24.0]]])  # (T, N, 2)
    visible = np.array([[True, False], [True, False]])
    markers = draw_track_overlay(frames, tracks, visible, trail=0, radius=3)
    assert markers[1, 8, 14].any() and not markers[1, 8, 9].any()  # a dot, no trail
    assert not markers[1, 24, 24].any() and markers[1, 24, 27].any()  # a ring: hollow centre, coloured edge
    trails = draw_track_overlay(frames, tracks, visible, trail=1, radius=3)
    assert trails[1, 8, 9].any() and not trails[0, 8, 9].any()  # the move from (4, 8) to (14, 8)
