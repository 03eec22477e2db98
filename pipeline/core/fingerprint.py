"""Fingerprints: short stable digests that identify a run's work, so resumable state made by other
settings or inputs is never mistaken for this run's.

`fingerprint(*parts)` hashes JSON-able parts (pydantic models are dumped, paths become strings,
numpy arrays and bytes are hashed by content); `file_digest` hashes a file's bytes;
`input_stamp` identifies a version of stores and files by size and modification time;
`source_digest` hashes the project's source files that define a set of objects (a model, its loss, its
dataset), so work done by other code is recognised too.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

DIGITS = 16
PROJECT = Path(__file__).resolve().parents[2]


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


def source_digest(*objects: Any) -> str:
    """A digest of the project's source files that define `objects` (`defining_files`): equal while
    none of those files changes. Installed packages (torch, torchvision, timm) do not count."""
    files = sorted(set().union(*(defining_files(obj) for obj in objects)))
    return fingerprint(*[[path.relative_to(PROJECT).as_posix(), file_digest(path)] for path in files])


def defining_files(obj: Any) -> set[Path]:
    """The project's source files behind `obj`: a module's own file; for a class, the modules of its
    bases; for a torch module, the classes of every submodule; for a function (also inside a
    `functools.partial` or a bound method), its module and the modules of the project functions and
    classes its code names; for any other object, its class's."""
    names: set[str] = set()
    _module_names(obj, names)
    files = set()
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path is None:
            continue
        path = Path(path).resolve()
        if path.is_relative_to(PROJECT) and "site-packages" not in path.parts:
            files.add(path)
    return files


def _module_names(obj: Any, names: set[str], depth: int = 0) -> None:
    if obj is None:
        return
    if isinstance(obj, types.ModuleType):
        names.add(obj.__name__)
    elif isinstance(obj, functools.partial):
        _module_names(obj.func, names, depth)
    elif isinstance(obj, types.MethodType):
        _module_names(obj.__func__, names, depth)
        _module_names(type(obj.__self__), names, depth)
    elif isinstance(obj, types.FunctionType):
        names.add(obj.__module__)
        if depth == 0:  # what it calls by name: the helpers of a loss, one level deep
            for name in obj.__code__.co_names:
                value = obj.__globals__.get(name)
                if isinstance(value, types.FunctionType) or inspect.isclass(value):
                    _module_names(value, names, depth + 1)
    elif inspect.isclass(obj):
        names.update(cls.__module__ for cls in obj.__mro__)
    elif _is_torch_module(obj):
        for module in obj.modules():
            _module_names(type(module), names, depth)
    else:
        _module_names(type(obj), names, depth)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # not imported here: an object can only be one once torch is loaded
    return torch is not None and isinstance(obj, torch.nn.Module)
