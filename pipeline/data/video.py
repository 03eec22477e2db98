"""Video file I/O: probe, decode sampled frames (decord, with an ffmpeg fallback), write mp4.

decord reads most files fast and seeks to the frames we need. What decord cannot read (AV1, some
WebM) goes through the ffmpeg binary via ffmpeg-python, streaming frames through a pipe so memory
holds one clip at a time. Both paths scale with libswscale's bilinear filter, which is what decord
uses internally, so the two backends give the same pixels; both honour rotation metadata (ffmpeg
rotates the frames itself, and the probe swaps width and height for a quarter turn to match).
File names reach ffmpeg and ffprobe as `file:` URLs, so a name that starts with `-` or holds a
`:` is never read as an option or a protocol.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("decord", "ffmpeg")


class VideoReadError(Exception):
    """A video cannot be read; the message is the reason reported to the user."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding needs to know about a file: length, rate, size, and which backend reads it."""

    num_frames: int
    fps: float
    width: int
    height: int
    backend: str


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to `short_side`, keeping the aspect ratio."""
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (..., H, W, C) frames to size x size."""
    height, width = frames.shape[-3:-1]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top:top + size, left:left + size, :]


def ffmpeg_url(path: Path | str) -> str:
    """`path` as ffmpeg's file protocol URL: never an option (`-report`) or another protocol."""
    return f"file:{path}"


def rotation_degrees(stream: dict) -> int:
    """The display rotation of an ffprobe stream (side data, or the older `rotate` tag), 0 if none."""
    for item in stream.get("side_data_list") or ():
        if "rotation" in item:
            return int(round(float(item["rotation"]))) % 360
    return int(float((stream.get("tags") or {}).get("rotate", 0))) % 360


def probe(path: Path, backend: str = "auto") -> VideoInfo:
    """Read a file's frame count, fps and size; raise VideoReadError saying why it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError("file not found")
    if path.stat().st_size == 0:
        raise VideoReadError("empty file (0 bytes)")
    errors = []
    for name in (BACKENDS if backend == "auto" else (backend,)):
        try:
            info = _PROBES[name](path)
        except Exception as err:  # each library raises its own types; keep the reason
            reason = _first_line(err).replace(f"{path}: ", "").replace(str(path), "the file")
            errors.append(f"{name}: {reason}")
            continue
        if info.num_frames <= 0:
            errors.append(f"{name}: no video frames")
            continue
        return info
    raise VideoReadError("unreadable video (" + "; ".join(errors) + ")")


def _probe_decord(path: Path) -> VideoInfo:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    height, width = reader.next().shape[:2]
    return VideoInfo(len(reader), float(reader.get_avg_fps()), width, height, "decord")


def _probe_ffmpeg(path: Path) -> VideoInfo:
    import ffmpeg

    meta = ffmpeg.probe(ffmpeg_url(path), count_packets=None, select_streams="v:0")
    streams = meta.get("streams") or []
    if not streams:
        raise VideoReadError("no video stream")
    stream = streams[0]
    num, _, den = stream.get("avg_frame_rate", "0/1").partition("/")
    fps = float(num) / float(den or 1) if float(den or 1) else 0.0
    width, height = int(stream["width"]), int(stream["height"])
    if rotation_degrees(stream) in (90, 270):  # ffmpeg hands out the frames turned upright
        width, height = height, width
    return VideoInfo(int(stream.get("nb_read_packets", 0)), fps, width, height, "ffmpeg")


_PROBES = {"decord": _probe_decord, "ffmpeg": _probe_ffmpeg}


def read_clips(path: Path, info: VideoInfo, clips: Sequence[Sequence[int]], store_size: int
               ) -> Iterator[np.ndarray]:
    """Yield each clip's frames (T, store_size, store_size, 3) uint8, in order.

    Frames are resized so the short side is `store_size`, then centre-cropped.
    """
    width, height = scaled_size(info.width, info.height, store_size)
    if info.backend == "decord":
        import decord

        reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
        for number, indices in enumerate(clips, start=1):
            frames = reader.get_batch(list(indices)).asnumpy()
            if number == len(clips):  # a live reader goes on decoding ahead in the background:
                del reader            # drop it before the caller spends time on the last clip
            yield _checked(center_crop(frames, store_size), len(indices), store_size)
    else:
        for frames in _ffmpeg_clips(path, clips, width, height):
            yield _checked(center_crop(frames, store_size), frames.shape[0], store_size)


def _checked(frames: np.ndarray, count: int, size: int) -> np.ndarray:
    if frames.shape != (count, size, size, 3):
        raise VideoReadError(f"decoded {frames.shape}, expected {(count, size, size, 3)}")
    return np.ascontiguousarray(frames)


def _ffmpeg_clips(path: Path, clips: Sequence[Sequence[int]], width: int, height: int
                  ) -> Iterator[np.ndarray]:
    """Stream every frame through ffmpeg once, keeping only the frames the clips need."""
    import ffmpeg

    wanted: dict[int, list[tuple[int, int]]] = {}
    for clip_idx, indices in enumerate(clips):
        for slot, frame_idx in enumerate(indices):
            wanted.setdefault(frame_idx, []).append((clip_idx, slot))
    last = max(wanted)
    buffers: dict[int, np.ndarray] = {}
    filled = [0] * len(clips)
    next_clip = 0
    process = (ffmpeg.input(ffmpeg_url(path)).filter("scale", width, height, flags="bilinear")
               .output("pipe:", format="rawvideo", pix_fmt="rgb24", vsync="passthrough")
               .global_args("-v", "error", "-nostdin")
               .run_async(pipe_stdout=True, pipe_stderr=True))
    frame_bytes = width * height * 3
    try:
        for frame_idx in range(last + 1):
            raw = process.stdout.read(frame_bytes)
            if len(raw) < frame_bytes:
                raise VideoReadError(f"ffmpeg stopped at frame {frame_idx} of {last + 1}")
            for clip_idx, slot in wanted.get(frame_idx, ()):
                buf = buffers.setdefault(clip_idx, np.empty((len(clips[clip_idx]), height, width, 3),
                                                            np.uint8))
                buf[slot] = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
                filled[clip_idx] += 1
            while next_clip < len(clips) and filled[next_clip] == len(clips[next_clip]):
                yield buffers.pop(next_clip)
                next_clip += 1
    finally:
        process.stdout.close()
        process.kill()
        process.wait()


def read_frames(path: Path, info: VideoInfo, indices: Sequence[int], width: int, height: int
                ) -> np.ndarray:
    """Frames `indices` of a file, resized to width x height (bilinear, no crop): (N, H, W, 3) uint8."""
    if info.backend == "decord":
        import decord

        reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
        frames = reader.get_batch(list(indices)).asnumpy()
    else:
        frames = next(_ffmpeg_clips(path, [list(indices)], width, height))
    if frames.shape != (len(indices), height, width, 3):
        raise VideoReadError(f"decoded {frames.shape}, expected {(len(indices), height, width, 3)}")
    return np.ascontiguousarray(frames)


def write_mp4(path: Path, frames: Iterable[np.ndarray], *, fps: float, crf: int = 18) -> Path:
    """Encode (H, W, 3) uint8 frames to an H.264 mp4 with the ffmpeg binary (bit-exact flags)."""
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    command = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-c:v", "libx264",
               "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p", "-threads", "1",
               "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
               "-f", "mp4", ffmpeg_url(path)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write(np.ascontiguousarray(first).tobytes())
        for frame in frames:
            process.stdin.write(np.ascontiguousarray(frame).tobytes())
        process.stdin.close()
    except BrokenPipeError:
        pass
    stderr = process.stderr.read().decode(errors="replace")
    if process.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {stderr.strip()}")
    return Path(path)


def _first_line(err: BaseException) -> str:
    stderr = getattr(err, "stderr", None)  # ffmpeg.Error keeps the useful text in stderr
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) and stderr else str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__
