"""Atomic file writes (temp file in the same folder + ``os.replace``) for run folders."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def _atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return _atomic(path, write)


def load_json(path: PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_torch(obj: Any, path: PathLike) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: PathLike) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
