"""Triton kernel of ``fastimp.ops.weight_points``: one program per (point k, block of coordinates)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_points_kernel(origin_ptr, dir_ptr, coef_ptr, clip_ptr, lo_ptr, hi_ptr, out_ptr,
                          D, J, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    acc = tl.load(origin_ptr + offs, mask=inb, other=0.0)
    clipped = tl.load(clip_ptr + offs, mask=inb, other=0) != 0
    for j in range(0, J):
        c = tl.load(coef_ptr + k * J + j)
        cc = tl.minimum(tl.maximum(c, tl.load(lo_ptr + j)), tl.load(hi_ptr + j))
        u = tl.load(dir_ptr + j * D + offs, mask=inb, other=0.0)
        acc += tl.where(clipped, cc, c) * u
    tl.store(out_ptr + k * D + offs, acc, mask=inb)


def weight_points_triton(origin, directions, coeffs, clip, lo, hi, out, block: int = 1024):
    K, J = coeffs.shape
    D = origin.numel()
    if K == 0 or D == 0:
        return out
    clip_u8 = clip.view(torch.uint8)
    grid = (K, triton.cdiv(D, block))
    _weight_points_kernel[grid](origin, directions, coeffs, clip_u8, lo, hi, out, D, J, BLOCK=block)
    return out
