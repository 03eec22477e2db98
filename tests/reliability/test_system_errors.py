"""A full disk, a read-only output, a file in the way or an unusable MLflow store fail the stage with
one line naming the reason and the path; the videos are never counted as bad, and nothing is
committed. The full and read-only disks are real: a small tmpfs mounted in a private mount namespace
(`unshare`), skipped where the namespace cannot be made."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import zarr

from pipeline.core.errors import OutputWriteError
from pipeline.core.shards import ProgressMarkers
from stages.decode import Params, run
from tests.reliability.helpers import decode_sets, error_lines, stage_command, stage_env


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -rm` with tmpfs mounts "
                                  "(user or root mount namespaces)")


def in_namespace(project: Path, mount: str, command: list[str], env: dict[str, str]
                 ) -> subprocess.CompletedProcess:
    """Run `command` with `project/out` replaced by a tmpfs mounted with `mount` options."""
    (project / "out").mkdir(exist_ok=True)
    script = f'mount -t tmpfs -o {mount} none "{project / "out"}" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_write_error_fails_decode_instead_of_skipping_the_video(video_project, monkeypatch):
    original = zarr.Array.__setitem__

    def full(self, key, value):  # the disk fills up once the frames start arriving
        if getattr(value, "ndim", 0) == 4:  # a clip of frames
            raise OSError(errno.ENOSPC, "No space left on device", "clips.zarr/frames/c/0")
        original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    params = Params(workers=0, num_frames=8, store_size=64)
    with pytest.raises(OutputWriteError, match="No space left"):
        run(params, videos=video_project / "raw", clips=video_project / "clips.zarr",
            report=video_project / "report.json")
    assert not (video_project / "clips.zarr").exists() and not (video_project / "report.json").exists()
    failed = ProgressMarkers(video_project / ".clips.zarr.partial").failures()
    assert failed == {}, "a full disk must not mark videos as bad"


@needs_mounts
@pytest.mark.parametrize(("mount", "reason"), [("size=96k", "No space left on device"),
                                               ("ro,size=1m", "Read-only file system")],
                         ids=["full disk", "read-only"])
def test_an_unwritable_output_fails_decode_with_one_line(video_project, mount, reason):
    sets = (*decode_sets(video_project), f"paths.clips={video_project / 'out/clips.zarr'}")
    result = in_namespace(video_project, mount, stage_command("decode", *sets), stage_env())
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert reason in lines[0] and "clips.zarr" in lines[0]
    assert "Traceback" not in result.stderr


@needs_mounts
def test_a_read_only_mlflow_store_fails_before_any_work(video_project):
    env = stage_env(mlflow=True, MLFLOW_TRACKING_URI=f"sqlite:///{video_project / 'out/mlflow.db'}")
    result = in_namespace(video_project, "ro,size=1m", stage_command("decode", *decode_sets(video_project)),
                          env)
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "cannot open the MLflow store" in lines[0] and "MAM2_MLFLOW=0" in lines[0]
    assert not (video_project / "clips.zarr").exists()


def test_a_file_in_the_output_path_fails_with_one_line(video_project):
    (video_project / "blocker").write_text("not a folder")
    sets = (*decode_sets(video_project), f"paths.clips={video_project / 'blocker/clips.zarr'}")
    result = subprocess.run(stage_command("decode", *sets), cwd=video_project, env=stage_env(),
                            capture_output=True, text=True, timeout=300)
    lines = error_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "blocker" in lines[0] and "Traceback" not in result.stderr
