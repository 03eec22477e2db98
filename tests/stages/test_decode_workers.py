"""decode's store does not depend on how many processes decode it: the layout (arrays, dtypes,
chunks, codecs) and every value are the same for 1, 2 and 3 workers and equal to reading the clips
straight from the decoder; writing a clip leaves an all-black one out, as zarr does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core.stores import compressor
from pipeline.data.video import probe, read_clips
from stages.decode import Params, run, sample_clips, write_row

LAYOUT = {"frames": ("uint8", (1, 4, 32, 32, 3)), "label": ("int32", None), "video": ("int32", None),
          "start": ("int32", None), "split": ("int8", None)}


@pytest.fixture
def raw(tmp_path, make_video) -> Path:
    for i in range(5):
        make_video(f"raw/c{i % 2}/v{i}.mp4", num_frames=20 + 6 * i, height=36, width=48, seed=i)
    make_video("raw/c0/short.mp4", num_frames=3)  # too short: left out by the plan
    return tmp_path / "raw"


def test_store_layout_and_values_are_the_same_for_any_number_of_workers(tmp_path, raw):
    params = Params(num_frames=4, stride=2, clips_per_video=2, store_size=32)
    stores = {}
    for workers in (1, 2, 3):
        out = run(params.model_copy(update={"workers": workers}), videos=raw,
                  clips=tmp_path / f"w{workers}.zarr", report=tmp_path / f"w{workers}.json")
        stores[workers] = zarr.open_group(str(out["clips"]), mode="r")
        assert json.loads(out["report"].read_text())["videos_decoded"] == 5
    one = stores[1]
    assert sorted(one.array_keys()) == ["frames", "label", "split", "start", "video", "video_split", "videos"]
    for name, (dtype, chunks) in LAYOUT.items():
        assert str(one[name].dtype) == dtype, name
        assert one[name].chunks == (chunks or one[name].shape), name
    codecs = one["frames"].metadata.to_dict()["codecs"]
    assert codecs[-1]["configuration"] | {"typesize": 1} == (compressor().to_dict()["configuration"]
                                                           | {"typesize": 1})
    for workers in (2, 3):
        for name in [*LAYOUT, "videos", "video_split"]:
            assert np.array_equal(one[name][:], stores[workers][name][:]), (workers, name)
        assert dict(one.attrs) | {"params": None} == dict(stores[workers].attrs) | {"params": None}
    paths = one["videos"][:]
    for row in range(one["frames"].shape[0]):  # every row is the decoder's clip, untouched
        path = Path(paths[one["video"][row]])
        info = probe(path)
        clips = sample_clips(info.num_frames, info.fps, params)
        starts = [clip[0] for clip in clips]
        expected = list(read_clips(path, info, clips, 32))[starts.index(int(one["start"][row]))]
        assert np.array_equal(one["frames"][row], expected), row


def test_an_all_black_clip_is_left_out_like_zarr_does(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    frames = group.create_array("frames", shape=(2, 2, 4, 4, 3), chunks=(1, 2, 4, 4, 3), dtype="uint8",
                                compressors=compressor(), fill_value=0)
    chunk = tmp_path / "s.zarr/frames/c/0/0/0/0/0"
    write_row(frames, 0, np.zeros((2, 4, 4, 3), np.uint8))
    assert not chunk.exists()
    clip = np.arange(96, dtype=np.uint8).reshape(2, 4, 4, 3)
    write_row(frames, 0, clip)
    assert chunk.exists() and np.array_equal(frames[0], clip)
    write_row(frames, 0, np.zeros_like(clip))  # over a written chunk: zarr removes it
    assert not chunk.exists() and not frames[0].any()
