"""Atomic file writes: a temp file in the same folder, then ``os.replace`` — a killed process
leaves either the old file or the new one, never a torn one. Every writer in fastimp uses it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp path beside ``path`` (same suffix, so that writers that infer
    the format from it, e.g. ``savefig``, work), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_json(obj: Any, path: PathLike) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write)


def load_json(path: PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_torch(obj: Any, path: PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: PathLike) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
