"""The process group of a ``torchrun`` job: started from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` or a c10d rendezvous), NCCL for
CUDA tensors and gloo for CPU tensors, and the few collectives fastimp needs (agreeing on a value,
gathering objects, a barrier). Without a process group every function here is the one-process
answer (rank 0 of 1), so the same code runs under torchrun and without it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["RankStoppedError", "launched", "init", "shutdown", "abandon", "active", "rank",
           "world_size", "local_rank", "is_main", "device", "barrier", "agree",
           "all_gather_objects", "main_writes", "backend_for"]

DEFAULT_TIMEOUT_S = 1800.0


class RankStoppedError(RuntimeError):
    """Another rank of the job stopped with an error (``error``, its one-line message), so this
    rank stops too. The CLI exits with status 2 on every rank, and only the rank that failed
    prints the error."""

    def __init__(self, rank: Optional[int], error: str):
        super().__init__(f"{'another rank' if rank is None else f'rank {rank}'} stopped: {error}")
        self.rank, self.error = rank, error


def peer_gone(exc: BaseException) -> Optional[RankStoppedError]:
    """``exc`` as a :class:`RankStoppedError` when it is a collective failing because another
    rank left the job (gloo: its connection closed), else None."""
    text = str(exc)
    for sign in ("Connection closed by peer", "Connection reset by peer"):
        if sign in text:
            where = text[text.index(sign):].split(". ")[0]
            return RankStoppedError(None, f"{where} (its own message says why)")
    return None


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: Optional[str] = None) -> str:
    """``"cpu:gloo,cuda:nccl"`` when CUDA is usable (collectives pick the backend by the tensors'
    device), else ``"gloo"``; ``device="cpu"`` forces gloo."""
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if device is not None and torch.device(device).type == "cpu":
        cuda = False
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init(backend: Optional[str] = None, device: Optional[str] = None,
         timeout_s: Optional[float] = None) -> bool:
    """Join the job's process group from torchrun's environment (``env://``); returns whether a
    group is active. Does nothing when one is already initialized or when not launched by torchrun.
    On a GPU machine each process takes the card ``LOCAL_RANK`` (``torch.cuda.set_device``), so
    ``"cuda"`` means that card. ``timeout_s``: how long a collective waits for the other ranks
    (default ``$FASTIMP_DIST_TIMEOUT`` or 30 minutes)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    backend = backend or backend_for(device)
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    if timeout_s is None:
        timeout_s = float(os.environ.get("FASTIMP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))
    return True


def shutdown() -> None:
    """Leave the process group (after a barrier, so that no rank leaves while others still talk)."""
    if active():
        try:
            barrier()
        finally:
            dist.destroy_process_group()


def abandon() -> None:
    """Leave the process group after an error, without waiting for the other ranks (they may be
    stopping too, or inside a collective that now fails at once instead of timing out): a process
    that exits with its group still up can die in the group's threads (SIGABRT)."""
    if active():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- already stopping with an error
            pass


def active() -> bool:
    """Whether a process group is initialized (world size 1 included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """The rank on this node (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes the files of a data-parallel run and of the analyses."""
    return rank() == 0


def device(requested: Optional[str] = None) -> str:
    """The device of this rank: ``requested`` when given ("cuda" meaning this rank's card), else
    this rank's card when CUDA is there, else the CPU."""
    if requested is not None and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and active():
            return f"cuda:{torch.cuda.current_device()}"
        return str(dev)
    if torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}" if launched() else "cuda"
    return "cpu"


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if active() and world_size() > 1:
        dist.barrier()


def agree(obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank (``broadcast_object_list``); ``obj`` itself alone."""
    if not active() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not active() or world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_writes():
    """Only rank 0 writes files within it: on the other ranks every fastimp writer
    (``fastimp._io.atomic_write``) writes nothing. For work that every rank does together and
    rank 0 records (a data-parallel run, an analysis split over ranks)."""
    from fastimp._io import no_writes
    if is_main():
        yield
        return
    with no_writes():
        yield
