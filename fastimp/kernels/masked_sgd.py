"""Triton multi-tensor masked SGD step: one launch for every tensor of one device and dtype.

An int64 table holds, per tensor, the addresses of p, g, b, m (0 when absent), its size and
whether its momentum buffer is created this step; a second one, per chunk of ``BLOCK`` elements,
the tensor it belongs to and its first element. The per-element formula is
:func:`fastimp.ops.masked_sgd.reference`'s, computed in fp32 whatever the storage dtype.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from fastimp.kernels._tables import chunk_table

_FIELDS = 6  # p, g, b, m, n, init

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _update(p_ptr, g_ptr, b_ptr, m_ptr, has_mask, init, offs, n, neg_lr, momentum, one_minus_damp,
            wd, decay, sign, DTYPE: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
            WD_MODE: tl.constexpr, FULL: tl.constexpr):
    # FULL: the whole block is inside the tensor, so no bounds mask (lets the loads vectorize).
    if FULL:
        p = tl.load(p_ptr + offs).to(tl.float32)
        d = tl.load(g_ptr + offs).to(tl.float32) * sign
    else:
        p = tl.load(p_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        d = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32) * sign
    if WD_MODE == 1:
        d = d + wd * p
    if HAS_MOM:
        # a new buffer is read too (it is allocated, its garbage is discarded by the where)
        if FULL:
            b_old = tl.load(b_ptr + offs).to(tl.float32)
        else:
            b_old = tl.load(b_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        b = tl.where(init != 0, d, b_old * momentum + one_minus_damp * d)
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
    if WD_MODE == 2:
        p = p * decay
    p = p + neg_lr * d
    if has_mask:
        if FULL:
            keep = tl.load(m_ptr + offs) != 0
        else:
            keep = tl.load(m_ptr + offs, mask=offs < n, other=1) != 0
        p = tl.where(keep, p, 0.0)
        if HAS_MOM:
            b = tl.where(keep, b, 0.0)
    if FULL:
        tl.store(p_ptr + offs, p.to(DTYPE))
        if HAS_MOM:
            tl.store(b_ptr + offs, b.to(DTYPE))
    else:
        tl.store(p_ptr + offs, p.to(DTYPE), mask=offs < n)
        if HAS_MOM:
            tl.store(b_ptr + offs, b.to(DTYPE), mask=offs < n)


@triton.jit
def _masked_sgd_kernel(tensors, chunks, neg_lr, momentum, one_minus_damp, wd, decay, sign,
                       DTYPE: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                       WD_MODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + pid * 2)
    start = tl.load(chunks + pid * 2 + 1)
    row = tensors + t * 6
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    m_addr = tl.load(row + 3)
    m_ptr = m_addr.to(tl.pointer_type(tl.uint8))
    n = tl.load(row + 4)
    init = tl.load(row + 5)
    if ALIGNED:  # every address is 16-byte aligned (checked by the launcher)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _update(p_ptr, g_ptr, b_ptr, m_ptr, m_addr != 0, init, offs, n, neg_lr, momentum,
                one_minus_damp, wd, decay, sign, DTYPE, HAS_MOM, NESTEROV, WD_MODE, True)
    else:
        _update(p_ptr, g_ptr, b_ptr, m_ptr, m_addr != 0, init, offs, n, neg_lr, momentum,
                one_minus_damp, wd, decay, sign, DTYPE, HAS_MOM, NESTEROV, WD_MODE, False)


def masked_sgd_triton(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      bufs: Sequence[Optional[torch.Tensor]],
                      masks: Sequence[Optional[torch.Tensor]], init: Sequence[bool], *,
                      lr: float, momentum: float, dampening: float, weight_decay: float,
                      nesterov: bool, maximize: bool, decoupled: bool) -> None:
    """One launch over ``params`` (all of one device and dtype, dense, each with its grad, buffer
    and bool/uint8 mask laid out like it); updates params and buffers in place."""
    if not params:
        return
    p0 = params[0]
    device, dtype = p0.device, p0.dtype
    has_mom = momentum != 0
    rows: List[int] = []
    numels: List[int] = []
    for i, p in enumerate(params):
        b = bufs[i] if has_mom else None
        m = masks[i]
        if p.numel() == 0:
            continue
        rows += [p.data_ptr(), grads[i].data_ptr(), b.data_ptr() if b is not None else 0,
                 m.data_ptr() if m is not None else 0, p.numel(), 1 if init[i] else 0]
        numels.append(p.numel())
    if not numels:
        return
    block = 128 if device.type == "cpu" else 4096
    chunks = chunk_table(tuple(numels), block, device)
    tensors = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cpu":
        tensors = tensors.pin_memory().to(device, non_blocking=True)
    aligned = all(a % 16 == 0 for k, a in enumerate(rows) if k % _FIELDS < 4)
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    extra = {} if device.type == "cpu" else {"num_warps": 8}
    _masked_sgd_kernel[(chunks.shape[0],)](
        tensors, chunks, -float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay),
        1.0 - float(lr) * float(weight_decay), -1.0 if maximize else 1.0,
        DTYPE=_TL_DTYPES[dtype], HAS_MOM=has_mom, NESTEROV=bool(nesterov), WD_MODE=wd_mode,
        ALIGNED=aligned, BLOCK=block, **extra)
