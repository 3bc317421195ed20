"""How ``fastimp.imp.run`` runs under torchrun (docs/DISTRIBUTED.md): which mode, who holds the
run folder's lock, where the ranks wait for each other.

- ``"none"``: no process group (or one rank): one process, as always.
- ``"data"``: every run data-parallel over the ranks; rank 0 runs the level loop, holds the lock
  and writes (``fastimp.distributed.data_parallel``: the other ranks follow it).
- ``"runs"``: each rank trains and writes a share of the (replicate, rewind step) runs; rank 0
  holds the lock for the job (the others learn whether it got it, so a busy folder stops every
  rank instead of leaving them waiting) and writes results.json once every rank is done.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

from fastimp import distributed

MODES = ("data", "runs")


def mode(parallel: str) -> str:
    """``"none"`` without a process group of several ranks, else ``parallel`` (checked)."""
    if parallel not in MODES:
        raise ValueError(f"parallel (--parallel): expected one of {MODES}, got {parallel!r}")
    if not distributed.active() or distributed.world_size() == 1:
        return "none"
    return parallel


def is_main() -> bool:
    return distributed.is_main()


def agree(obj: Any) -> Any:
    return distributed.agree(obj)


def barrier(mode_: str) -> None:
    if mode_ == "runs":
        distributed.barrier()


@contextlib.contextmanager
def nothing():
    yield None


def follower_run(folder: Optional[str]):
    """What ``run`` returns on a follower: rank 0's run, when this rank can read it."""
    from fastimp.imp.folder import load_run
    if folder is None or not (Path(folder) / "config.json").exists():
        return None
    return load_run(folder)


def on_main(mode_: str, fn, share: bool = True):
    """``fn()`` on rank 0. With ``mode_="runs"`` every rank waits for it: the others get its
    result (``share``; else None) or, when it raised, stop with
    :class:`~fastimp.distributed.RankStoppedError` naming its error instead of waiting in the
    next collective."""
    if mode_ != "runs":
        return fn()
    result, error = None, None
    if distributed.is_main():
        try:
            result = fn()
        except BaseException as exc:  # RunLockedError, CorruptFileError, Ctrl-C, ...
            error = exc
    said = distributed.agree(("error", f"{type(error).__name__}: {error}") if error is not None
                             else ("ok", result if share else None))
    if error is not None:
        raise error
    if said[0] == "error":
        raise distributed.RankStoppedError(0, said[1])
    return result if distributed.is_main() else said[1]


@contextlib.contextmanager
def run_lock(folder, wait: bool, on_wait, mode_: str):
    """The run folder's lock (:class:`fastimp.imp.lock.RunLock`), taken by rank 0 alone; with
    ``mode_="runs"`` (``--parallel runs``, and the analysis commands: work every rank does and
    rank 0 records) the other ranks wait for rank 0's answer and stop with its error."""
    from fastimp.imp.lock import RunLock
    if mode_ != "runs":
        with RunLock(folder, wait=wait, on_wait=on_wait):
            yield
        return
    lock = on_main(mode_, lambda: RunLock(folder, wait=wait, on_wait=on_wait).acquire(),
                   share=False)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
