"""Chunk tables shared by the multi-tensor Triton kernels (one launch over many tensors)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

_CACHE: Dict[Tuple, torch.Tensor] = {}


def chunk_table(numels: Tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """[n_chunks, 2] int64 on ``device``: (tensor index, first element) of every ``block``-sized
    chunk of every tensor, in order; cached per (sizes, block, device)."""
    key = (numels, block, str(device))
    table = _CACHE.get(key)
    if table is None:
        counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
        idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(idx.numel(), dtype=torch.int64) - first[idx]) * block
        table = torch.stack([idx, start], 1).contiguous().to(device)
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = table
    return table
