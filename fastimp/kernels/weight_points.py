"""Triton kernel of ``fastimp.ops.weight_points``: one program per (block of coordinates, point).

The coordinate blocks are on grid axis 0 (up to 2^31 - 1 blocks) and the points on axis 1 (at
most 65,535 per launch: the launcher splits larger K); every offset is 64-bit."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GRID_Y = 65535
GPU_BLOCK = 1024


@triton.jit(do_not_specialize=["D", "J"])
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


def variants():
    """Every compiled variant a GPU launch can take: (name, kernel, signature, constexprs,
    16-byte aligned pointer args, num_warps). Triton specializes each pointer on 16-byte
    alignment: a launch over points k0 > 0 (K > 65,535) passes row slices of coeffs and out,
    which need not be aligned ("sliced"), and views that start inside their storage may leave
    any pointer unaligned ("unaligned": none aligned, the most general of those
    specializations); D >= 2^31 is int64."""
    for dt in ("fp32", "fp64"):
        for d_type in ("i32", "i64"):
            for kind in ("", " sliced", " unaligned"):
                sig = {"origin_ptr": f"*{dt}", "dir_ptr": f"*{dt}", "coef_ptr": f"*{dt}",
                       "clip_ptr": "*u8", "lo_ptr": f"*{dt}", "hi_ptr": f"*{dt}",
                       "out_ptr": f"*{dt}", "D": d_type, "J": "i32"}
                aligned = () if kind == " unaligned" else tuple(
                    k for k in sig if k.endswith("_ptr")
                    and not (kind == " sliced" and k in ("coef_ptr", "out_ptr")))
                yield (f"weight_points {dt} D {d_type}{kind}", weight_points_kernel, sig,
                       dict(BLOCK=GPU_BLOCK), aligned, 4)


def weight_points_triton(origin, directions, coeffs, clip, lo, hi, out, block: int = GPU_BLOCK,
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
