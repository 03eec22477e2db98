"""Atomic outputs: nothing appears until the block succeeds; a failure leaves the old output."""

from __future__ import annotations

import pytest

from pipeline.core.atomic import atomic_dir, atomic_file, partial_path, write_json


def test_atomic_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert not final.exists()
    with atomic_dir(final) as tmp:
        assert not (tmp / "a.txt").exists(), "a fresh run starts from an empty partial"
        (tmp / "b.txt").write_text("done")
    assert (final / "b.txt").read_text() == "done" and not partial_path(final).exists()


def test_atomic_dir_replaces_previous_output_and_resume_keeps_partial(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "old.txt").write_text("1")
    partial_path(final).mkdir()
    (partial_path(final) / "work.txt").write_text("kept")
    with atomic_dir(final, resume=True) as tmp:
        assert (tmp / "work.txt").read_text() == "kept"
    assert sorted(p.name for p in final.iterdir()) == ["work.txt"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    path = write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            tmp.write_text("{broken")
            raise ValueError
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert not partial_path(path).exists()
