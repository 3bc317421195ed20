"""Triton multi-tensor masked SGD step: one launch for every tensor of one device and dtype.

:func:`build_table` writes, once per (tensors, masks), an int64 device table: per tensor the
addresses of p, g, b, m (0 when absent) and its size; per chunk of ``BLOCK`` elements the tensor
it belongs to and its first element. :func:`launch` runs one step over a table: no host-to-device
copy, no sync (CUDA-graph capturable). The chunk start is folded into the base pointers, so the
offsets inside a chunk are 32-bit. The per-element formula is
:func:`fastimp.ops.masked_sgd.reference`'s, computed in float32 (float64 for float64 storage); the
hyperparameters arrive as float64 and lr may be read on the device from a one-element tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

FIELDS = 5  # per tensor: p, g, b, m, n
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}

# (BLOCK, num_warps) launched on a GPU: the config of the compile check's sweep with the most
# elements resident per SM and no spills (benchmarks/RESULTS.md, "Triton registers").
GPU_CONFIG = (2048, 4)
INTERPRETER_BLOCK = 128  # the Triton interpreter (CPU tests): small blocks, many programs

# flags (one int32): wd_mode (2 bits: 0 none, 1 coupled, 2 decoupled) | nesterov << 2 |
# maximize << 3 | init << 4 | lr_kind << 5 (0: the lr argument, 1: float32 at lr_addr, 2: float64)


@triton.jit
def _step_block(p_ptr, g_ptr, b_ptr, m_ptr, has_mask, offs, n, neg_lr, momentum, one_minus_damp,
                wd, decay, sign, init, wd_mode, nesterov, DTYPE: tl.constexpr, ACC: tl.constexpr,
                HAS_MOM: tl.constexpr, FULL: tl.constexpr):
    # FULL: the whole block is inside the tensor, so no bounds mask (lets the loads vectorize).
    if FULL:
        p = tl.load(p_ptr + offs).to(ACC)
        d = tl.load(g_ptr + offs).to(ACC) * sign
    else:
        inb = offs < n
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(ACC)
        d = tl.load(g_ptr + offs, mask=inb, other=0.0).to(ACC) * sign
    if wd_mode == 1:
        d = p * wd + d
    if HAS_MOM:
        # a new buffer is read too (allocated; its garbage is discarded by the where)
        if FULL:
            b_old = tl.load(b_ptr + offs).to(ACC)
        else:
            b_old = tl.load(b_ptr + offs, mask=offs < n, other=0.0).to(ACC)
        b = tl.where(init != 0, d, d * one_minus_damp + b_old * momentum)
        if nesterov != 0:
            d = b * momentum + d
        else:
            d = b
    if wd_mode == 2:
        p = p * decay
    p = d * neg_lr + p
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


@triton.jit(do_not_specialize=["lr_addr", "flags"])
def masked_sgd_kernel(tensors, chunks, lr_addr: tl.int64, lr: tl.float64, momentum: tl.float64,
                      dampening: tl.float64, weight_decay: tl.float64, flags: tl.int32,
                      DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_MOM: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + pid * 2)
    start = tl.load(chunks + pid * 2 + 1)
    row = tensors + t * 5
    # the chunk start folded into the base pointers (64-bit once); offsets below are 32-bit
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE)) + start
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE)) + start
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE)) + start
    m_addr = tl.load(row + 3)
    m_ptr = m_addr.to(tl.pointer_type(tl.uint8)) + start
    n = tl.minimum(tl.load(row + 4) - start, BLOCK).to(tl.int32)
    if ALIGNED:  # every address is 16-byte aligned (checked by build_table)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    wd_mode = flags & 3
    nesterov = (flags >> 2) & 1
    init = (flags >> 4) & 1
    lr_kind = (flags >> 5) & 3
    if lr_kind == 1:
        lr = tl.load(lr_addr.to(tl.pointer_type(tl.float32))).to(tl.float64)
    elif lr_kind == 2:
        lr = tl.load(lr_addr.to(tl.pointer_type(tl.float64)))
    neg_lr = (0.0 - lr).to(ACC)
    decay = (1.0 - lr * weight_decay).to(ACC)
    one_minus_damp = (1.0 - dampening).to(ACC)
    sign = (1 - 2 * ((flags >> 3) & 1)).to(ACC)
    offs = tl.arange(0, BLOCK)
    if n == BLOCK:
        _step_block(p_ptr, g_ptr, b_ptr, m_ptr, m_addr != 0, offs, n, neg_lr, momentum.to(ACC),
                    one_minus_damp, weight_decay.to(ACC), decay, sign, init, wd_mode, nesterov,
                    DTYPE, ACC, HAS_MOM, True)
    else:
        _step_block(p_ptr, g_ptr, b_ptr, m_ptr, m_addr != 0, offs, n, neg_lr, momentum.to(ACC),
                    one_minus_damp, weight_decay.to(ACC), decay, sign, init, wd_mode, nesterov,
                    DTYPE, ACC, HAS_MOM, False)


@dataclass(frozen=True)
class Table:
    """A group's device table (see the module docstring) and what a launch needs to know."""
    table: torch.Tensor  # int64 [FIELDS * n_tensors (+1 pad to 16 B) + 2 * n_chunks] on the device
    n_tensors: int
    n_chunks: int
    aligned: bool
    block: int
    num_warps: int


def config(device: torch.device) -> Tuple[int, int]:
    """(BLOCK, num_warps) for ``device``."""
    return GPU_CONFIG if device.type == "cuda" else (INTERPRETER_BLOCK, 1)


def build_table(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                bufs: Sequence[Optional[torch.Tensor]],
                masks: Sequence[Optional[torch.Tensor]]) -> Table:
    """Upload the table of one checked group (one host-to-device copy)."""
    device = params[0].device
    block, warps = config(device)
    rows: List[int] = []
    numels: List[int] = []
    for p, g, b, m in zip(params, grads, bufs, masks):
        rows += [p.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else 0,
                 m.data_ptr() if m is not None else 0, p.numel()]
        numels.append(p.numel())
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(idx.numel(), dtype=torch.int64) - first[idx]) * block
    rows += [0] * (len(rows) % 2)  # the chunk table starts 16-byte aligned, like the table
    host = torch.cat([torch.tensor(rows, dtype=torch.int64), torch.stack([idx, start], 1).reshape(-1)])
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fastimp: masked SGD: the tensor table must be built before CUDA graph capture "
                "(run one step with the same params, grads, buffers and masks first; keep the "
                "grads with zero_grad(set_to_none=False))")
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    aligned = all(a % 16 == 0 for k, a in enumerate(rows[:FIELDS * len(numels)]) if k % FIELDS < 4)
    return Table(table, len(numels), int(idx.numel()), aligned, block, warps)


def _f64(x: float):
    """A float64 scalar argument. Compiled kernels get it typed by the annotation; the Triton
    interpreter passes Python floats through untyped, so it gets a float64 scalar tensor."""
    if not INTERPRETER:
        return float(x)
    import numpy as np
    from triton.runtime.interpreter import TensorHandle
    return tl.tensor(TensorHandle(np.array([x], dtype=np.float64), tl.float64), tl.float64)


def _lr_kind(lr_tensor: Optional[torch.Tensor]) -> int:
    if lr_tensor is None:
        return 0
    return 1 if lr_tensor.dtype == torch.float32 else 2


def launch(table: Table, dtype: torch.dtype, *, init: bool, lr: float,
           lr_tensor: Optional[torch.Tensor], momentum: float, dampening: float,
           weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool) -> None:
    """One step over ``table`` (``init``: every buffer in it is new this step)."""
    if table.n_chunks == 0:
        return
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    flags = (wd_mode | (int(bool(nesterov)) << 2) | (int(bool(maximize)) << 3)
             | (int(bool(init)) << 4) | (_lr_kind(lr_tensor) << 5))
    lr_addr = lr_tensor.data_ptr() if lr_tensor is not None else 0
    tensors = table.table
    chunks = tensors[tensors.numel() - 2 * table.n_chunks:]
    extra = {"num_warps": table.num_warps} if tensors.device.type == "cuda" else {}
    masked_sgd_kernel[(table.n_chunks,)](
        tensors, chunks, lr_addr, _f64(lr), _f64(momentum), _f64(dampening),
        _f64(weight_decay), flags, **constexprs(dtype, momentum != 0, table.aligned, table.block),
        **extra)


def constexprs(dtype: torch.dtype, has_mom: bool, aligned: bool, block: int) -> dict:
    """The compile-time arguments of one launch (also what :func:`variants` enumerates)."""
    return dict(DTYPE=TL_DTYPES[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                HAS_MOM=bool(has_mom), ALIGNED=bool(aligned), BLOCK=block)


SIGNATURE = {"tensors": "*i64", "chunks": "*i64", "lr_addr": "i64", "lr": "fp64",
             "momentum": "fp64", "dampening": "fp64", "weight_decay": "fp64", "flags": "i32"}


def variants(config=None):
    """Every compiled variant a GPU launch can take: (name, kernel, signature, constexprs,
    16-byte aligned pointer args, num_warps). ``config``: (BLOCK, num_warps), default GPU_CONFIG."""
    block, warps = config or GPU_CONFIG
    for dtype in TL_DTYPES:
        for has_mom in (False, True):
            for aligned in (True, False):
                name = (f"masked_sgd {str(dtype).replace('torch.', '')} "
                        f"{'momentum' if has_mom else 'no momentum'}"
                        f"{'' if aligned else ' unaligned'}")
                yield (name, masked_sgd_kernel, SIGNATURE,
                       constexprs(dtype, has_mom, aligned, block), ("tensors", "chunks"), warps)

