"""Atomic file writes: a temp file in the same folder, then ``os.replace`` — a killed process
leaves either the old file or the new one, never a torn one. Every writer in fastimp uses it.

Files are created like any other tool's (mode 0666 minus the user's umask: 0644 under umask
022), not 0600 as ``tempfile.mkstemp`` would. A temp file is named
``.<name>.<pid>@<host>.<random>.tmp<suffix>``, so :func:`clean_stale_tmp` can tell the ones whose
writer died (killed mid-write) from those still being written.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Callable, List, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

# A temp file left by a writer on another host (or by an older fastimp, whose names carry no
# pid) counts as stale once it has not been touched for this long.
STALE_AFTER_S = 3600.0

_TMP_RE = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)\.)?"
                     r"(?P<rand>[A-Za-z0-9_]{8})\.tmp(?:\.[^.]*)?$")


# False in the processes that must not write (the ranks other than 0 of a torch.distributed job
# whose files rank 0 writes, ``fastimp.distributed.main_writes``): per context, not per process.
_WRITES: "contextvars.ContextVar[bool]" = contextvars.ContextVar("fastimp_writes", default=True)


def writes_enabled() -> bool:
    """Whether :func:`atomic_write` writes in this context (see :func:`no_writes`)."""
    return _WRITES.get()


@contextlib.contextmanager
def no_writes():
    """Within it, :func:`atomic_write` (hence every fastimp writer) writes nothing and returns the
    path: the ranks of a distributed job whose files another rank writes."""
    token = _WRITES.set(False)
    try:
        yield
    finally:
        _WRITES.reset(token)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _create_temp(path: Path) -> str:
    """Create an empty temp file beside ``path`` (O_EXCL, mode 0666 & ~umask); return its name."""
    for _ in range(100):
        tmp = path.parent / (f".{path.name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}"
                             f".tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"could not create a temp file beside {path}")  # pragma: no cover


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp path beside ``path`` (same suffix, so that writers that infer
    the format from it, e.g. ``savefig``, work), then rename it to ``path``. Inside
    :func:`no_writes` it writes nothing."""
    path = Path(path)
    if not _WRITES.get():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale_tmp(path: PathLike, now: float = None) -> bool:
    """Whether ``path`` is a temp file of :func:`atomic_write` whose writer is gone: its pid is
    dead on this host, or (another host, or no pid in the name) untouched for ``STALE_AFTER_S``."""
    path = Path(path)
    m = _TMP_RE.match(path.name)
    if m is None:
        return False
    if m["pid"] is not None and m["host"] == _host():
        return not _alive(int(m["pid"]))
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_AFTER_S


def clean_stale_tmp(folder: PathLike) -> List[Path]:
    """Delete the stale temp files (:func:`is_stale_tmp`) under ``folder``; returns them."""
    removed = []
    for p in Path(folder).rglob(".*.tmp*"):
        if p.is_file() and is_stale_tmp(p):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:  # another cleaner was first
                pass
    return removed


def folder_path(path: PathLike, arg: str, what: str) -> Path:
    """``path`` as a folder to write into (it may not exist yet): a ValueError naming ``arg`` when
    it, or the nearest existing folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{arg}: {p} is a file, not a folder; pass a folder {what}")
            break
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


def write_torch(obj: Any, tmp: PathLike) -> None:
    """``torch.save`` through a file object: given a path, torch names the zip's records after the
    file (here a random temp name), so the bytes of the same object would differ between writes."""
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; the same object gives the same bytes."""
    return atomic_write(path, lambda tmp: write_torch(obj, tmp))


def load_torch(path: PathLike) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
