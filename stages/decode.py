"""decode: turn a folder of videos or a manifest into fixed-size clips in `clips.zarr`.

Input `paths.raw`: a folder (class sub-folders give labels, files at its top are unlabelled), a
manifest (CSV `path,label[,split]`, UCF101/HMDB51 split files, SSv2 JSON, Kinetics CSV), or a set of
manifests that keeps a dataset's official splits: a folder of split files, or the files named in
`decode.manifests` (pipeline/data/manifest_sets.py).
Output `paths.clips` (layout in docs/design.md section 5) and `reports/decode.json`, which lists every
skipped file with its reason. Each video gives `clips_per_video` evenly spaced clips of
`num_frames` frames taken every `stride` frames (or at `target_fps`), short side resized to
`store_size` and centre-cropped. Videos decode in `workers` processes, this one and spawned helpers
(pipeline/core/pools.py), each writing its own chunks, so memory stays flat however many videos
there are. A killed run resumes where it stopped.
`--shard i/n` decodes every n-th video into the shared partial store; the run without `--shard`
afterwards commits it (pipeline/core/shards.py), giving the same store as one unsharded run.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from pydantic import Field

from pipeline.core import stage_cli
from pipeline.core.atomic import commit, partial_path, write_json
from pipeline.core.errors import OutputWriteError, StageError
from pipeline.core.fingerprint import fingerprint
from pipeline.core.mlflow_runs import current_run
from pipeline.core.params import Paths, StageParams
from pipeline.core.pools import WorkerPool, run_jobs
from pipeline.core.progress import progress, progress_bar
from pipeline.core.shards import ProgressMarkers, Shard, finish_plan, plan_once
from pipeline.core.stores import SPLITS, create_clips_store, write_clip_table
from pipeline.data.manifest_sets import find_manifest_set, read_manifests
from pipeline.data.manifests import MANIFEST_FORMATS, ManifestError, VideoEntry, parse_manifest, scan_folder
from pipeline.data.video import VideoInfo, VideoReadError, probe, read_clips

log = logging.getLogger(__name__)


class Params(StageParams):
    num_frames: int = Field(16, ge=1, description="frames per clip")
    stride: int = Field(2, ge=1, description="step between sampled frames (ignored with target_fps)")
    target_fps: float | None = Field(None, gt=0, description="sample at this rate instead of `stride`")
    clips_per_video: int = Field(2, ge=1, description="evenly spaced clips taken from each video")
    store_size: int = Field(128, ge=8, description="stored frames are store_size x store_size")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="labelled videos per class held out "
                                "for validation when the input gives no split")
    workers: int = Field(2, ge=0, description="decoding processes, this one included (0 or 1: "
                         "decode in this process only)")
    max_failed_fraction: float = Field(0.5, ge=0, le=1, description="fail the stage when more "
                                       "inputs than this fraction cannot be decoded")
    manifest_format: Literal[MANIFEST_FORMATS] = Field("auto", description="format of a manifest input")
    video_root: Path | None = Field(None, description="folder that manifest paths are relative to")
    manifests: list[Path] = Field([], description="manifest files read together, each video keeping "
                                  "its split; relative names are in the folder `paths.raw`")
    split_number: int = Field(1, ge=1, description="which official split a folder of UCF101 "
                              "(trainlistNN/testlistNN) or HMDB51 (_test_splitN) files gives")
    backend: Literal["auto", "decord", "ffmpeg"] = Field("auto", description="video decoder")
    duplicates: Literal["refuse", "keep_first"] = Field(
        "refuse", description="a video listed twice (the same file, in one split or across "
        "splits, which would leak it into validation): refuse, naming them, or keep its first row")


@dataclass(frozen=True)
class VideoTask:
    """One video's share of the work: which clips to decode and which store rows they fill."""

    index: int
    path: str
    info: dict
    clips: list[list[int]]
    first_row: int


def run(params: Params, *, videos: Path, clips: Path, report: Path,
        shard: Shard | None = None) -> dict[str, Path]:
    """Decode `videos` (folder or manifest) into the clips store `clips`; write `report`.

    With `shard`, decode only that shard's videos into the shared partial store and return it;
    a later run without `shard` finds them done and only commits the store (pipeline/core/shards.py).
    """
    entries = without_duplicates(list_videos(videos, params), params)
    if not entries:
        raise StageError(f"no videos found in {videos}")
    tmp, signature = partial_path(clips), work_fingerprint(params, entries)
    with WorkerPool(params.workers) as pool:
        plan, resumed = plan_once(tmp, signature, lambda store_dir: _plan_store(
            store_dir, entries, params, videos, pool, signature))
        tasks = [VideoTask(**task) for task in plan["tasks"]]
        mine = tasks if shard is None else shard.select(tasks)
        if resumed and shard is None:
            log.info("resuming the partial store %s", tmp)
        decode_all(mine, tmp, pool, signature)
    if shard is not None:
        log.info("shard %s: %d of %d videos in %s", shard, len(mine), len(tasks), tmp)
        current_run().log_metrics({"data/shard_videos": len(mine)})
        return {"partial": tmp}
    decode_failures = _decode_failures(tmp, tasks)
    failures = plan["failures"] + decode_failures
    _check_failures(failures, len(entries), params)
    if decode_failures:
        _drop_failed_videos(tmp, tasks, {f["index"] for f in decode_failures})
    finish_plan(tmp)
    commit(tmp, clips)
    summary = _summary(entries, failures, clips)
    write_json(report, summary)
    current_run().log_metrics({"data/videos": len(entries), "data/videos_decoded": summary["videos_decoded"],
                           "data/videos_skipped": len(failures), "data/clips": summary["clips"]})
    log.info("decoded %d clips from %d videos; %d skipped (see %s)", summary["clips"],
             summary["videos_decoded"], len(failures), report)
    return {"clips": clips, "report": report}


def run_from_paths(params: Params, paths: Paths, shard: Shard | None = None) -> dict[str, Path]:
    return run(params, videos=paths.raw, clips=paths.clips, report=paths.reports / "decode.json",
               shard=shard)


def list_videos(source: Path, params: Params) -> list[VideoEntry]:
    """The videos to decode: the manifests in `decode.manifests`, or `source`: a folder of split
    files (an official split), a folder of videos, or one manifest."""
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    fmt, root, number = params.manifest_format, params.video_root, params.split_number
    try:
        if params.manifests:
            files = [_manifest_path(source, name) for name in params.manifests]
            return read_manifests(files, fmt=fmt, video_root=root, split_number=number)
        if not source.is_dir():
            return parse_manifest(source, fmt=fmt, video_root=root, split_number=number)
        found = find_manifest_set(source, fmt, number)
        if found is None:
            return scan_folder(source)
        log.info("%s: %s split %d from %s", source, found[0], number, ", ".join(f.name for f in found[1]))
        return read_manifests(found[1], fmt=found[0], video_root=root or source, split_number=number)
    except ManifestError as err:
        raise StageError(str(err)) from err


def _manifest_path(source: Path, name: Path) -> Path:
    """A `decode.manifests` entry: absolute, or relative to the folder `paths.raw`."""
    path = name if name.is_absolute() else source / name
    if not name.is_absolute() and not source.is_dir():
        raise StageError(f"decode.manifests: {name} is relative, so paths.raw must be the folder "
                         f"holding it, not the file {source}")
    if not path.is_file():
        raise StageError(f"decode.manifests: {path}: manifest does not exist")
    return path


def without_duplicates(entries: list[VideoEntry], params: Params) -> list[VideoEntry]:
    """`entries` with each file once; duplicates are refused unless `duplicates: keep_first`."""
    first: dict[Path, VideoEntry] = {}
    repeats: list[tuple[VideoEntry, VideoEntry]] = []
    for entry in entries:
        key = entry.path.resolve()
        if key in first:
            repeats.append((first[key], entry))
        else:
            first[key] = entry
    if not repeats:
        return entries
    leaks = sum(a.split != b.split for a, b in repeats)
    shown = "; ".join(f"{b.path} ({a.split or 'no split'}/{a.label} and {b.split or 'no split'}/{b.label})"
                      for a, b in repeats[:3])
    what = (f"{len(repeats)} video(s) listed more than once ({leaks} across splits, which would leak "
            f"them into validation): {shown}{' ...' if len(repeats) > 3 else ''}")
    if params.duplicates == "refuse":
        raise StageError(f"{what}; remove them or set decode.duplicates=keep_first")
    log.warning("%s; keeping each one's first row", what)
    return list(first.values())


def sample_clips(num_frames_in_video: int, fps: float, params: Params) -> list[list[int]]:
    """Frame indices of each clip: `clips_per_video` evenly spaced windows; [] if too short."""
    stride = frame_stride(fps, params)
    span = clip_span(fps, params)
    if num_frames_in_video < span:
        return []
    starts = np.unique(np.linspace(0, num_frames_in_video - span, params.clips_per_video).round())
    return [list(range(int(s), int(s) + span, stride)) for s in starts]


def probe_all(entries: list[VideoEntry], params: Params, pool: WorkerPool | None
              ) -> tuple[list[VideoInfo | None], list[dict]]:
    """Probe every video; unreadable ones become failures with their reason."""
    jobs = [(str(e.path), params.backend) for e in entries]
    results: list[VideoInfo | str | None] = [None] * len(jobs)
    for index, result in progress(run_jobs(pool, _probe_one, jobs), desc="probe", unit="video",
                                  total=len(jobs)):
        results[index] = result
    failures = [{"index": index, "path": str(entries[index].path), "stage": "probe", "reason": result}
                for index, result in enumerate(results) if isinstance(result, str)]
    return [None if isinstance(r, str) else r for r in results], failures


def plan_tasks(entries: list[VideoEntry], infos: list[VideoInfo | None], params: Params,
               failures: list[dict]) -> list[VideoTask]:
    """Assign store rows to every clip of every readable video; too-short videos fail here."""
    tasks, row = [], 0
    for index, (entry, info) in enumerate(zip(entries, infos, strict=True)):
        if info is None:
            continue
        clip_frames = sample_clips(info.num_frames, info.fps, params)
        if not clip_frames:
            failures.append({"index": index, "path": str(entry.path), "stage": "probe",
                             "reason": f"too short: {info.num_frames} frames, a clip needs "
                                       f"{clip_span(info.fps, params)}"})
            continue
        tasks.append(VideoTask(index, str(entry.path), asdict(info), clip_frames, row))
        row += len(clip_frames)
    return tasks


def frame_stride(fps: float, params: Params) -> int:
    """Step between sampled frames: `stride`, or the step that best approximates `target_fps`."""
    return max(1, round(fps / params.target_fps)) if params.target_fps else params.stride


def clip_span(fps: float, params: Params) -> int:
    """How many source frames one clip covers."""
    return (params.num_frames - 1) * frame_stride(fps, params) + 1


def decode_all(tasks: list[VideoTask], store_dir: Path, pool: WorkerPool | None, signature: str) -> None:
    """Decode every task not yet settled into the store; mark each video done or failed."""
    markers = ProgressMarkers(store_dir)
    todo = markers.pending(tasks, key=lambda t: t.index)
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d videos already decoded", len(tasks) - len(todo), len(tasks))
    total = sum(len(t.clips) * len(t.clips[0]) for t in todo)
    jobs = [(t, str(store_dir), signature) for t in todo]
    try:
        with progress_bar("decode", unit="frame", total=total) as update:
            for position, result in run_jobs(pool, _decode_one, jobs):
                if isinstance(result, str):
                    markers.mark_failed(todo[position].index, result)
                else:
                    update(result)
    finally:  # this process decoded some videos too: do not keep their store open
        _frames_cache.pop((str(store_dir), signature), None)


def _decode_failures(store_dir: Path, tasks: list[VideoTask]) -> list[dict]:
    """The videos that failed mid-decode (in this run or an earlier shard), in task order."""
    reasons = ProgressMarkers(store_dir).failures()
    return [{"index": t.index, "path": t.path, "stage": "decode", "reason": reasons[str(t.index)]}
            for t in tasks if str(t.index) in reasons]


def _probe_one(job: tuple[str, str]) -> VideoInfo | str:
    path, backend = job
    try:
        return probe(Path(path), backend)
    except VideoReadError as err:
        return str(err)


# One open `frames` array per worker process and store plan (reopening it per video is slow).
_frames_cache: dict[tuple[str, str], zarr.Array] = {}


def _decode_one(job: tuple[VideoTask, str, str]) -> int | str:
    """Worker: decode one video's clips into its rows; mark it done. Returns frames or a reason."""
    task, store_dir, signature = job
    key = (store_dir, signature)
    if key not in _frames_cache:
        _frames_cache[key] = zarr.open_array(f"{store_dir}/frames", mode="r+")
    frames = _frames_cache[key]
    info = VideoInfo(**task.info)
    size = frames.shape[2]
    # decord refuses some resize targets ("size must exactly match") and some damaged streams;
    # ffmpeg scales with the same bilinear filter, so it takes over with identical pixels.
    backends = [info.backend] + (["ffmpeg"] if info.backend == "decord" else [])
    errors = []
    for backend in backends:
        try:
            reader = read_clips(Path(task.path), replace(info, backend=backend), task.clips, size)
            for offset, clip in enumerate(reader):
                write_row(frames, task.first_row + offset, clip)
            break
        except OutputWriteError:
            raise  # the disk, not the video: fail the stage, never count the video as bad
        except Exception as err:  # a file that probed fine can still be truncated mid-stream
            lines = str(err).strip().splitlines() or [type(err).__name__]
            errors.append(f"{backend}: {lines[-1][:200]}")
    else:
        return "decode failed (" + "; ".join(errors) + ")"
    ProgressMarkers(Path(store_dir)).mark_done(task.index)
    return sum(len(c) for c in task.clips)


def write_row(frames: zarr.Array, row: int, clip) -> None:
    """Write one clip's row; a failure here (disk full, read-only) is a system error.

    zarr compares every chunk it writes with the fill value, to leave all-fill chunks out: a new
    array and a full comparison, costing twice the compression. `clip.any()` (the fill value is 0)
    answers the same question in a fraction of that, so only an all-black clip takes zarr's check.
    """
    try:
        target = frames.with_config({"write_empty_chunks": True}) if clip.any() else frames
        target[row] = clip
    except OSError as err:
        where = err.filename or f"{frames.store_path} (row {row})"
        raise OutputWriteError(err.errno, err.strerror or str(err), where) from err


def _plan_store(store_dir: Path, entries: list[VideoEntry], params: Params, source: Path,
                pool: WorkerPool | None, signature: str) -> dict:
    """Probe every video, assign store rows, create the store; the plan every shard follows."""
    infos, failures = probe_all(entries, params, pool)
    tasks = plan_tasks(entries, infos, params, failures)
    _check_failures(failures, len(entries), params)
    _create_store(store_dir, entries, tasks, params, source)
    return {"signature": signature, "tasks": [asdict(t) for t in tasks],
            "failures": failures}


def _create_store(store_dir: Path, entries: list[VideoEntry], tasks: list[VideoTask],
                  params: Params, source: Path) -> None:
    class_names = sorted({e.label for e in entries if e.label is not None})
    label_of = {name: i for i, name in enumerate(class_names)}
    val = _validation_videos(entries, params.val_fraction)
    store_split = store_splits(entries)
    labels, videos, starts, splits = [], [], [], []
    for task in tasks:
        entry = entries[task.index]
        split = _split_code(entry, task.index in val, store_split)
        for clip in task.clips:
            labels.append(label_of.get(entry.label, -1))
            videos.append(task.index)
            starts.append(clip[0])
            splits.append(split)
    fps = sorted(t.info["fps"] for t in tasks)
    group = create_clips_store(
        store_dir, num_clips=len(labels), num_frames=params.num_frames, size=params.store_size,
        labels=np.array(labels), videos=np.array(videos), starts=np.array(starts),
        splits=np.array(splits), video_paths=[str(e.path) for e in entries],
        attrs={"class_names": class_names, "fps": fps[len(fps) // 2] if fps else 0.0,
               "frame_stride": params.stride, "target_fps": params.target_fps,
               "source": str(source), "params": params.model_dump(mode="json"),
               "official_splits": _official_splits(entries, store_split)})
    names = group.create_array("video_split", shape=(len(entries),), dtype=str,
                               chunks=(max(1, len(entries)),))
    if entries:  # each video's split as its manifest names it ("" for none: a folder, a held-out video)
        names[:] = np.asarray([e.source_split or "" for e in entries])


def _drop_failed_videos(store_dir: Path, tasks: list[VideoTask], failed: set[int]) -> None:
    """Compact the store after videos failed mid-decode: shift later clips down over their rows."""
    group = zarr.open_group(str(store_dir), mode="r+")
    frames = group["frames"]
    keep = [row for t in tasks if t.index not in failed
            for row in range(t.first_row, t.first_row + len(t.clips))]
    for new, old in enumerate(keep):
        if new != old:
            frames[new] = frames[old]
    frames.resize((len(keep), *frames.shape[1:]))
    columns = {name: group[name][:][keep] for name in ("label", "video", "start", "split")}
    write_clip_table(group, labels=columns["label"], videos=columns["video"],
                     starts=columns["start"], splits=columns["split"])


def _validation_videos(entries: list[VideoEntry], fraction: float) -> set[int]:
    """Per class, the ceil(n * fraction) videos with the smallest path hash (stable, stratified)."""
    by_label: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        if entry.label is not None and entry.split is None:
            by_label.setdefault(entry.label, []).append(index)
    chosen: set[int] = set()
    for indices in by_label.values():
        ranked = sorted(indices, key=lambda i: hashlib.sha1(entries[i].path.name.encode()).hexdigest())
        chosen.update(ranked[:int(np.ceil(len(indices) * fraction))])
    return chosen


def store_splits(entries: list[VideoEntry]) -> dict[str, str]:
    """The store split of each manifest split: a test split is evaluated as `val` when the
    manifests have no validation split (UCF101, HMDB51), and stays `test` beside one (Kinetics, SSv2)."""
    has_val = any(e.split == "val" for e in entries)
    return {"train": "train", "val": "val", "test": "test" if has_val else "val"}


def _official_splits(entries: list[VideoEntry], store_split: dict[str, str]) -> dict[str, str]:
    """Each split name the manifests use -> the store split its videos went to (attrs)."""
    named = {e.source_split: store_split.get(e.split, "train") for e in entries if e.source_split}
    return dict(sorted(named.items()))


def _split_code(entry: VideoEntry, held_out: bool, store_split: dict[str, str]) -> int:
    if entry.split is not None:
        return SPLITS.index(store_split.get(entry.split, "train"))
    return SPLITS.index("val") if held_out else SPLITS.index("train")


def _check_failures(failures: list[dict], total: int, params: Params) -> None:
    if failures and len(failures) / total > params.max_failed_fraction:
        examples = "\n".join(f"  {f['path']}: {f['reason']}" for f in failures[:10])
        raise StageError(f"{len(failures)} of {total} videos could not be decoded (more than "
                         f"max_failed_fraction={params.max_failed_fraction}):\n{examples}")


def _summary(entries: list[VideoEntry], failures: list[dict], clips: Path) -> dict:
    group = zarr.open_group(str(clips), mode="r")
    return {"videos": len(entries), "videos_decoded": len(entries) - len(failures),
            "clips": int(group["frames"].shape[0]), "clip_shape": list(group["frames"].shape[1:]),
            "class_names": group.attrs["class_names"],
            "skipped": [{"path": f["path"], "reason": f["reason"]} for f in failures]}


def work_fingerprint(params: Params, entries: list[VideoEntry]) -> str:
    """Identifies the work: same params and same input files (path, size, mtime) -> same store."""
    files = [(str(e.path), e.label, e.split, e.source_split, *(_stat(e.path))) for e in entries]
    return fingerprint(params, files)


def _stat(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


if __name__ == "__main__":
    raise SystemExit(stage_cli.main(sys.modules[__name__]))
