"""One writer per IMP run folder: an exclusive ``fcntl.flock`` on ``DIR/.lock``.

The kernel releases the lock when its holder exits, however it exits (``kill -9`` included), so
a dead holder never blocks a rerun. While held, the file says who holds it (pid, host, start time,
command line), which is what a second process reports before it exits (or waits, ``wait=True``);
it is emptied on release. Platforms without ``fcntl`` (Windows) get no lock.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""

    def __init__(self, folder, holder: Optional[dict]):
        self.folder, self.holder = Path(folder), holder
        super().__init__(f"{self.folder} is in use by {describe_holder(holder)}; wait for it to "
                         "finish, or pass --wait (wait=True) to start when it does")


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("fastimp", "__main__.py")):  # the CLI, or python -m fastimp
        argv[0] = "fastimp"
    elif argv:
        argv.insert(0, os.path.basename(sys.executable))
    return " ".join(argv)[:500]


def _read_holder(fd: int) -> Optional[dict]:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data.decode()) if data.strip() else None
    except (OSError, ValueError):
        return None


def read_holder(folder) -> Optional[dict]:
    """Who holds ``folder``'s lock now (None when nobody does)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(folder, wait=False):`` -- the exclusive writer's lock on ``folder``
    (created if needed). Busy: :class:`RunLockedError`, or with ``wait=True`` block until it is
    free (``on_wait(holder)`` is called once first, e.g. to print who is being waited for)."""

    def __init__(self, folder, wait: bool = False,
                 on_wait: Optional[Callable[[Optional[dict]], None]] = None):
        self.folder = Path(folder)
        self.wait, self.on_wait = bool(wait), on_wait
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"RunLock({str(self.folder)!r}) is already held")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    if not self.wait:
                        raise RunLockedError(self.folder, holder) from None
                    if self.on_wait is not None:
                        self.on_wait(holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
