"""weight_points: the K weight sets of a slice of weight space in one pass, against what users
write today (``origin + coeffs @ directions`` with ``torch.addmm``, which cannot clip, and the
PyTorch reference loop, which clips). Traffic floor: read origin, the J directions and the clip
mask once, write K x D outputs: ((J + 1) * 4 + 1 + K * 4) bytes per coordinate (float32)."""
from __future__ import annotations

from typing import List

import torch

from benchmarks.common import Table, timeit
from fastimp import _backend
from fastimp.ops import weight_points as op

CASES = [("ResNet-20 (0.27 M)", 272_474, 2, 9), ("ResNet-20 (0.27 M)", 272_474, 2, 64),
         ("ResNet-18 (11.2 M)", 11_173_962, 2, 9)]


def _inputs(D, J, K, device):
    g = torch.Generator().manual_seed(0)
    origin = torch.randn(D, generator=g).to(device)
    U = torch.randn(J, D, generator=g).to(device)
    C = torch.randn(K, J, generator=g).to(device)
    clip = (torch.rand(D, generator=g) < 0.1).to(device)
    lo, hi = torch.zeros(J, device=device), torch.ones(J, device=device)
    return origin, U, C, clip, lo, hi, torch.empty(K, D, device=device)


def table(device, cases, repeat: int) -> Table:
    dev_type = torch.device(device).type
    t = Table(f"weight_points: K points of a J = 2 slice, float32, {device}")
    for name, D, J, K in cases:
        origin, U, C, clip, lo, hi, out = _inputs(D, J, K, device)
        case = f"{name}, K={K}"
        nbytes = ((J + 1) * 4 + 1 + K * 4) * D
        base = "torch.addmm (no clipping)"
        sec = timeit(lambda: torch.addmm(origin, C, U, out=out), device, repeat=repeat)
        t.add(case, base, sec, extra=f"{nbytes / sec / 1e9:.1f} GB/s")
        for b in ("torch", "cpu", "triton"):
            if not _backend.status("weight_points", b, dev_type) or (
                    b == "triton" and dev_type == "cpu"):
                continue
            sec = timeit(lambda: op.weight_points(origin, U, C, clip=clip, lo=lo, hi=hi, out=out,
                                                  backend=b), device, repeat=repeat)
            label = "reference loop (clips)" if b == "torch" else f"fastimp weight_points ({b})"
            t.add(case, label, sec, baseline=base, extra=f"{nbytes / sec / 1e9:.1f} GB/s")
        del origin, U, C, clip, out
    return t


def tables(device: str, quick: bool) -> List[Table]:
    cases = CASES[:1] if quick else CASES
    return [table(device, cases, 3 if quick else 10)]
