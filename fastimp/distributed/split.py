"""Independent work spread over the ranks: each rank takes a contiguous share of n items (points
of a landscape grid, Hessian probes, SLQ runs, trainings) and the results are gathered back in
the items' order, so the output is the one-process output."""
from __future__ import annotations

from typing import Callable, List, Sequence, TypeVar

from fastimp.distributed import env

__all__ = ["shard", "spread", "gather_parts"]

T = TypeVar("T")


def shard(n: int, rank: int = None, world: int = None) -> range:
    """The items ``[n r / W, n (r + 1) / W)`` of rank r of W (contiguous; sizes differ by at most
    one; ``range(n)`` without a process group)."""
    r = env.rank() if rank is None else rank
    w = env.world_size() if world is None else world
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    return range(n * r // w, n * (r + 1) // w)


def gather_parts(local: List[T]) -> List[T]:
    """Every rank's list concatenated in rank order (the shares of :func:`shard`)."""
    parts = env.all_gather_objects(list(local))
    return [x for part in parts for x in part]


def spread(items: Sequence, fn: Callable[[List], List]) -> List:
    """``fn(items)`` computed in shares: rank r calls ``fn`` on its :func:`shard` of ``items``
    (a list -> a list of one result per item) and every rank gets all results in order."""
    items = list(items)
    mine = [items[i] for i in shard(len(items))]
    out = fn(mine) if mine else []
    if len(out) != len(mine):
        raise RuntimeError(f"spread: fn returned {len(out)} results for {len(mine)} items")
    return gather_parts(out)
