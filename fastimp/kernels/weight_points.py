"""Triton kernel of ``fastimp.ops.weight_points``: one program per (block of coordinates, point).

The coordinate blocks are on grid axis 0 (up to 2^31 - 1 blocks) and the points on axis 1 (at
most 65,535 per launch: the launcher splits larger K); every offset is 64-bit."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GRID_Y = 65535


@triton.jit
def weight_points_kernel(origin_ptr, dir_ptr, coef_ptr, clip_ptr, lo_ptr, hi_ptr, out_ptr,
                         D, J, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(1).to(tl.int64)
    D64 = D.to(tl.int64)
    inb = offs < D64
    acc = tl.load(origin_ptr + offs, mask=inb, other=0.0)
    clipped = tl.load(clip_ptr + offs, mask=inb, other=0) != 0
    for j in range(0, J):
        c = tl.load(coef_ptr + k * J + j)
        cc = tl.minimum(tl.maximum(c, tl.load(lo_ptr + j)), tl.load(hi_ptr + j))
        u = tl.load(dir_ptr + j * D64 + offs, mask=inb, other=0.0)
        acc += tl.where(clipped, cc, c) * u
    tl.store(out_ptr + k * D64 + offs, acc, mask=inb)


def grid(K: int, D: int, block: int, max_k: int = MAX_GRID_Y):
    """(first point, points, grid) of each launch that covers K points of D coordinates."""
    return [(k0, min(max_k, K - k0), (triton.cdiv(D, block), min(max_k, K - k0)))
            for k0 in range(0, K, max_k)]


def weight_points_triton(origin, directions, coeffs, clip, lo, hi, out, block: int = 1024,
                         max_k: int = MAX_GRID_Y) -> None:
    K, J = coeffs.shape
    D = origin.numel()
    if K == 0 or D == 0:
        return
    clip_u8 = clip.view(torch.uint8)
    for k0, kn, g in grid(K, D, block, max_k):
        c, o = coeffs[k0:k0 + kn], out[k0:k0 + kn]
        if origin.is_cuda:
            with torch.cuda.device(origin.device):
                weight_points_kernel[g](origin, directions, c, clip_u8, lo, hi, o, D, J,
                                        BLOCK=block)
        else:
            weight_points_kernel[g](origin, directions, c, clip_u8, lo, hi, o, D, J, BLOCK=block)
