"""Masks across ranks: computed once (on rank 0), broadcast, and verified before every level.

Pruning libraries have shipped masks that differ across DDP ranks (sparseml #429, NNI #5217);
here every rank trains under rank 0's masks by construction (:func:`broadcast_masks`), and
:func:`verify_masks` proves it: the CRC-32 of every mask (and of the names, in order) is reduced
with MIN and MAX over the ranks, and any difference raises :class:`MaskMismatchError` on every
rank, naming the parameters that differ.
"""
from __future__ import annotations

import zlib
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist

from fastimp.distributed import env

__all__ = ["MaskMismatchError", "masks_checksum", "broadcast_masks", "verify_masks"]


class MaskMismatchError(RuntimeError):
    """The ranks of a job hold different masks (never silently trained through)."""


def masks_checksum(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """int64 [1 + n]: the CRC-32 of the names (in order, with shapes), then of each mask's bits
    (bool, row-major)."""
    names = ";".join(f"{n}{tuple(m.shape)}" for n, m in masks.items())
    out = [zlib.crc32(names.encode())]
    for m in masks.values():
        bits = m.detach().to("cpu", torch.bool).contiguous().reshape(-1).numpy()
        out.append(zlib.crc32(bits.tobytes()))
    return torch.tensor(out, dtype=torch.int64)


def _collective_device() -> torch.device:
    """Where a tensor collective on the default group runs: the rank's card when the group is
    NCCL only, else the CPU (gloo; the ``cpu:gloo,cuda:nccl`` group sends CPU tensors by gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def verify_masks(masks: Mapping[str, torch.Tensor], what: str = "masks") -> None:
    """Raise :class:`MaskMismatchError` on every rank unless every rank holds the same ``masks``
    (names, order, shapes and bits). A no-op without a process group."""
    if not env.active() or env.world_size() == 1:
        return
    local = masks_checksum(masks)
    n = torch.tensor([local.numel()], dtype=torch.int64)
    lo_n, hi_n = n.clone(), n.clone()
    dev = _collective_device()
    lo_n, hi_n = lo_n.to(dev), hi_n.to(dev)
    dist.all_reduce(lo_n, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi_n, op=dist.ReduceOp.MAX)
    if int(lo_n) != int(hi_n):
        raise MaskMismatchError(f"{what}: the ranks hold different numbers of masks "
                                f"({int(lo_n) - 1} to {int(hi_n) - 1}); this rank "
                                f"({env.rank()}) has {local.numel() - 1}")
    lo, hi = local.to(dev), local.clone().to(dev)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differ = (lo != hi).cpu()
    if bool(differ.any()):
        names = list(masks)
        bad = [names[i - 1] for i in range(1, differ.numel()) if bool(differ[i])]
        head = "the names, order or shapes differ" if bool(differ[0]) else \
            f"{len(bad)} mask(s) differ: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
        raise MaskMismatchError(f"{what}: the {env.world_size()} ranks do not hold the same "
                                f"masks ({head}; checked on rank {env.rank()}); the run stops "
                                "rather than train different networks on different ranks")


def broadcast_masks(masks: Optional[Mapping[str, torch.Tensor]], src: int = 0,
                    device=None):
    """``src``'s masks on every rank as a ``fastimp.Masks`` on ``device`` (default: where
    ``src``'s masks are, else the CPU). Other ranks may pass None. Without a process group,
    ``masks`` itself."""
    from fastimp.masks import Masks
    if not env.active() or env.world_size() == 1:
        if masks is None:
            raise ValueError("masks: None with no other rank to receive them from")
        return masks if isinstance(masks, Masks) else Masks(dict(masks))
    if env.rank() == src:
        if masks is None:
            raise ValueError(f"masks: rank {src} broadcasts the masks and has none")
        layout = [(n, tuple(m.shape)) for n, m in masks.items()]
    else:
        layout = None
    layout = env.agree(layout, src)
    sizes = [int(torch.Size(s).numel()) for _, s in layout]
    dev = _collective_device()
    if env.rank() == src:
        flat = torch.cat([m.detach().reshape(-1).to(dev, torch.uint8) for m in masks.values()]) \
            if layout else torch.zeros(0, dtype=torch.uint8, device=dev)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
    dist.broadcast(flat, src=src)
    if device is None:
        device = next(iter(masks.values())).device if masks else "cpu"
    out: Dict[str, torch.Tensor] = {}
    for (name, shape), part in zip(layout, torch.split(flat, sizes)):
        out[name] = part.reshape(shape).to(device=device, dtype=torch.bool)
    return Masks(out)
