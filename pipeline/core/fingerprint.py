"""Fingerprints: short stable digests that identify a run's work, so resumable state made by other
settings or inputs is never mistaken for this run's.

`fingerprint(*parts)` hashes JSON-able parts (pydantic models are dumped, paths become strings,
numpy arrays and bytes are hashed by content); `file_digest` hashes a file's bytes;
`input_stamp` identifies a version of stores and files by size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

DIGITS = 16


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, np.ndarray | bytes):
        raw = value.tobytes() if isinstance(value, np.ndarray) else value
        return hashlib.sha256(raw).hexdigest()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def fingerprint(*parts: Any) -> str:
    """A stable digest (16 hex digits) of `parts`: equal parts give equal digests, in any process."""
    blob = json.dumps(parts, sort_keys=True, default=_plain)
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGITS]


def file_digest(path: Path | str, block: int = 1 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def input_stamp(*paths: Path | str | None) -> list:
    """What identifies a version of a stage's inputs, for the resume fingerprints of training stages.

    A store or file that a stage upstream rebuilt (stores are renamed into place whole) has a new
    modification time, so a finished checkpoint of the old inputs is not mistaken for this run's
    (DVC reruns a stage because its inputs changed; without this the run would "resume" its old
    result). Stores: their root `zarr.json`; files: themselves; missing paths: None.
    """
    stamps = []
    for path in paths:
        if path is None:
            stamps.append(None)
            continue
        path = Path(path)
        target = path / "zarr.json" if path.is_dir() else path
        stat = target.stat() if target.exists() else None
        stamps.append([str(path), stat and [stat.st_size, stat.st_mtime_ns]])
    return stamps
