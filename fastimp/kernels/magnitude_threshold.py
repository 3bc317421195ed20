"""Triton global magnitude threshold: 16+16-bit radix select over the float bits of |w|.

An int64 table holds, per tensor, the addresses of w (float32), its mask (0: none) and its output
mask, and its size; a second one, per chunk of ``BLOCK`` elements, the tensor and first element.
Pass 1 histograms key >> 16 (key = bits of |w|, sign cleared) over the unmasked weights with
global atomics, pass 2 histograms key & 0xffff among keys in the selected high bin, and one pass
writes the masks. When only some of the weights equal to the threshold are pruned, a counting pass
and an exclusive scan over chunks rank those ties by position (earlier pruned first).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastimp.kernels._tables import chunk_table

_BINS = 1 << 16
_NONFINITE_HI = 0x7F80  # hi16 of +inf; NaN/inf keys have hi16 >= this


@triton.jit
def _load_keys(segs, chunks, pid, BLOCK: tl.constexpr):
    t = tl.load(chunks + pid * 2)
    start = tl.load(chunks + pid * 2 + 1)
    row = segs + t * 4
    w_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    m_addr = tl.load(row + 1)
    o_addr = tl.load(row + 2)
    n = tl.load(row + 3)
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    key = w.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    m_ptr = m_addr.to(tl.pointer_type(tl.uint8))
    live = valid & (tl.load(m_ptr + offs, mask=valid & (m_addr != 0), other=1) != 0)
    return key, live, valid, offs, o_addr


@triton.jit(do_not_specialize=["hi"])
def _histogram_kernel(segs, chunks, hist, hi, SECOND: tl.constexpr, BLOCK: tl.constexpr,
                      SEM: tl.constexpr):
    key, live, valid, offs, o_addr = _load_keys(segs, chunks, tl.program_id(0), BLOCK)
    if SECOND:
        live = live & ((key >> 16) == hi)
        digit = key & 0xFFFF
    else:
        digit = key >> 16
    ones = tl.full([BLOCK], 1, tl.int32)
    # relaxed: a count needs no ordering (the default acq_rel fences every element)
    tl.atomic_add(hist + digit, ones, mask=live, sem=SEM)


@triton.jit(do_not_specialize=["thr"])
def _count_equal_kernel(segs, chunks, thr, eq, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    key, live, valid, offs, o_addr = _load_keys(segs, chunks, pid, BLOCK)
    tie = live & (key == thr)
    tl.store(eq + pid, tl.sum(tie.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["thr", "t_rem"])
def _write_kernel(segs, chunks, thr, t_rem, eq_before, RANKED: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    key, live, valid, offs, o_addr = _load_keys(segs, chunks, pid, BLOCK)
    if RANKED:
        tie = live & (key == thr)
        tie_i = tie.to(tl.int64)
        rank = tl.load(eq_before + pid) + tl.cumsum(tie_i, axis=0) - tie_i
        pruned = (key < thr) | (tie & (rank < t_rem))
        keep = live & (pruned == 0)
    else:
        keep = live & (key > thr)
    o_ptr = o_addr.to(tl.pointer_type(tl.uint8))
    tl.store(o_ptr + offs, keep.to(tl.uint8), mask=valid)


GPU_BLOCK = 1024  # elements per program on a GPU (num_warps: Triton's default, 4)


def variants():
    """Every compiled variant a GPU launch can take: (name, kernel, signature, constexprs,
    16-byte aligned pointer args, num_warps)."""
    tabs = {"segs": "*i64", "chunks": "*i64"}
    aligned = ("segs", "chunks", "hist", "eq", "eq_before")
    for sem in ("relaxed", "acq_rel"):
        for second in (False, True):
            yield (f"threshold histogram pass {2 if second else 1} ({sem})", _histogram_kernel,
                   {**tabs, "hist": "*i32", "hi": "i32"},
                   dict(SECOND=second, BLOCK=GPU_BLOCK, SEM=sem), aligned, 4)
    yield ("threshold count ties", _count_equal_kernel, {**tabs, "thr": "i32", "eq": "*i64"},
           dict(BLOCK=GPU_BLOCK), aligned, 4)
    for ranked in (False, True):
        yield (f"threshold write masks{' (ranked ties)' if ranked else ''}", _write_kernel,
               {**tabs, "thr": "i32", "t_rem": "i32", "eq_before": "*i64"},
               dict(RANKED=ranked, BLOCK=GPU_BLOCK), aligned, 4)


def _select_bin(hist: torch.Tensor, k: int) -> Tuple[int, int]:
    """First bin b with cumsum[b] >= k (k >= 1), and k minus the count below b."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)))
    below = int(cum[b - 1]) if b > 0 else 0
    return b, k - below


def magnitude_threshold_triton(weights: Sequence[torch.Tensor],
                               masks: Optional[Sequence[torch.Tensor]],
                               out: Sequence[torch.Tensor], k: Optional[int], fraction: float,
                               block: Optional[int] = None,
                               sem: str = "relaxed") -> Tuple[int, int, int, int]:
    """Writes ``out``; returns ``(n, k, threshold key bits, nonfinite)`` like the C++ kernel
    (k None: k = round(fraction · n)). float16/bfloat16 weights are read through float32 copies.
    ``sem``: the histogram atomics' memory order (benchmarks compare "relaxed" and "acq_rel")."""
    device = weights[0].device
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _select(weights, masks, out, k, fraction, block or GPU_BLOCK, sem)
    return _select(weights, masks, out, k, fraction, block or 128, sem)


def _tables(weights, masks, out, block):
    """float32 views of the weights, the segment table and the chunk table."""
    device = weights[0].device
    total = sum(w.numel() for w in weights)
    if total >= 2 ** 31:
        raise ValueError("magnitude_threshold (triton): argument 'weights': expected fewer than "
                         "2^31 weights in all")
    w32 = [w if w.dtype == torch.float32 else w.float() for w in weights]
    rows: List[List[int]] = []
    for i, w in enumerate(w32):
        m_addr = masks[i].data_ptr() if masks is not None and w.numel() else 0
        o_addr = out[i].data_ptr() if out is not None else 0
        rows.append([w.data_ptr(), m_addr, o_addr, w.numel()])
    segs = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)
    return w32, segs, chunk_table(tuple(w.numel() for w in w32), block, device)


def first_histogram(weights: Sequence[torch.Tensor], sem: str = "relaxed",
                    block: int = GPU_BLOCK) -> torch.Tensor:
    """Pass 1 alone (int32 [65536] counts of key >> 16), for benchmarks of the atomics."""
    w32, segs, chunks = _tables(weights, None, None, block)
    hist = torch.zeros(_BINS, dtype=torch.int32, device=weights[0].device)
    if chunks.shape[0]:
        _histogram_kernel[(chunks.shape[0],)](segs, chunks, hist, 0, SECOND=False, BLOCK=block,
                                              SEM=sem)
    return hist


def _select(weights, masks, out, k, fraction, block, sem):
    device = weights[0].device
    w32, segs, chunks = _tables(weights, masks, out, block)
    nc = chunks.shape[0]
    grid = (nc,)
    hist = torch.zeros(_BINS, dtype=torch.int32, device=device)
    if nc:
        _histogram_kernel[grid](segs, chunks, hist, 0, SECOND=False, BLOCK=block, SEM=sem)
    h = hist.to(torch.int64).cpu()
    n = int(h.sum())
    nonfinite = int(h[_NONFINITE_HI:].sum())
    if k is None:
        k = round(fraction * n)
    if nonfinite:
        return n, k, 0, nonfinite
    if not 0 <= k <= n:
        raise ValueError(f"magnitude_threshold: argument 'k': expected 0 <= k <= n={n} (the "
                         f"unmasked weights), got {k}")
    dummy = torch.zeros(1, dtype=torch.int64, device=device)
    if k == 0:
        if nc:
            _write_kernel[grid](segs, chunks, -1, 0, dummy, RANKED=False, BLOCK=block)
        return n, 0, 0, 0
    b1, k_rem = _select_bin(h, k)
    hist.zero_()
    _histogram_kernel[grid](segs, chunks, hist, b1, SECOND=True, BLOCK=block, SEM=sem)
    h2 = hist.to(torch.int64).cpu()
    b2, t_rem = _select_bin(h2, k_rem)
    thr = (b1 << 16) | b2
    if t_rem == int(h2[b2]):
        _write_kernel[grid](segs, chunks, thr, 0, dummy, RANKED=False, BLOCK=block)
    else:
        eq = torch.empty(nc, dtype=torch.int64, device=device)
        _count_equal_kernel[grid](segs, chunks, thr, eq, BLOCK=block)
        eq_before = torch.cumsum(eq, 0) - eq
        _write_kernel[grid](segs, chunks, thr, t_rem, eq_before, RANKED=True, BLOCK=block)
    return n, k, thr, 0
