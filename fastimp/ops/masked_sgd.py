r"""Fused masked SGD step: ``torch.optim.SGD``'s update, then the mask on the param and its buffer.

Per tensor, with the math in fp32 whatever the storage dtype (fp32, bf16, fp16):

.. math::
    d &= \pm g \quad (- \text{ if maximize}) \\
    d &= d + \lambda p \quad \text{(coupled weight decay)} \\
    b &= d \text{ on the buffer's first step, else } \mu b + (1 - \tau) d \\
    d &= d + \mu b \text{ (nesterov) or } b \\
    p &= p - \gamma d \quad \text{or, decoupled, } p = (1 - \gamma\lambda) p - \gamma d \\
    p &= m \,?\, p : 0, \quad b = m \,?\, b : 0

For finite values the last line is ``p.mul_(m)``, ``b.mul_(m)``; it also zeroes non-finite values
at masked coordinates, so pruned weights and their momentum are exactly 0 after every step.

:func:`masked_sgd_` is the entry point (groups tensors by device and dtype, creates buffers);
backends (``torch`` = :func:`reference`, ``cpu``, ``cuda``, ``triton``) take one group.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastimp import _ext
from fastimp._backend import register_op, resolve

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASKS = (torch.bool, torch.uint8)


def reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              bufs: Sequence[Optional[torch.Tensor]], masks: Sequence[Optional[torch.Tensor]],
              init: Sequence[bool], *, lr: float, momentum: float, dampening: float,
              weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool) -> None:
    """The spec in plain PyTorch: ``torch.optim.SGD``'s for-loop step, then the mask.

    ``bufs[i]`` is preallocated when ``momentum != 0``; ``init[i]`` marks a buffer created this
    step (it becomes ``d``, undampened, as in torch). Low-precision tensors are upcast to fp32.
    """
    for p, g, b, m, first in zip(params, grads, bufs, masks, init):
        low = p.dtype != torch.float32
        pf = p.float() if low else p
        d = g.float()
        if maximize:
            d = -d
        if weight_decay != 0 and not decoupled:
            d = d.add(pf, alpha=weight_decay)
        bf = None
        if momentum != 0:
            bf = b.float() if low else b
            if first:
                bf.copy_(d)
            else:
                bf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(bf, alpha=momentum) if nesterov else bf
        if weight_decay != 0 and decoupled:
            pf.mul_(1 - lr * weight_decay)
        pf.add_(d, alpha=-lr)
        if m is not None:
            keep = m.bool()
            pf.masked_fill_(~keep, 0)
            if bf is not None:
                bf.masked_fill_(~keep, 0)
        if low:
            p.copy_(pf)
            if bf is not None:
                b.copy_(bf)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_like(t: Optional[torch.Tensor], p: torch.Tensor) -> bool:
    return t is None or (t.stride() == p.stride() and t.device == p.device)


def _split_by_layout(impl: Callable) -> Callable:
    """Compiled backends need p, g, b, m laid out alike in memory (they walk the flat storage);
    the rare tensor that is not (e.g. a mask in another memory format) goes to the reference."""
    def run(params, grads, bufs, masks, init, **kw):
        fast, slow = [], []
        for i, p in enumerate(params):
            m = masks[i]
            b = bufs[i]
            if (p.is_contiguous() and grads[i].is_contiguous()
                    and (b is None or b.is_contiguous())
                    and (m is None or (m.is_contiguous() and m.dtype in _MASKS))):
                fast.append(i)  # the common case, checked cheaply
                continue
            ok = (_dense(p) and _dense_like(grads[i], p)
                  and _dense_like(bufs[i], p) and _dense_like(masks[i], p)
                  and (masks[i] is None or masks[i].dtype in (torch.bool, torch.uint8)))
            (fast if ok else slow).append(i)
        if slow:
            pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
            reference(pick(params, slow), pick(grads, slow), pick(bufs, slow),
                      pick(masks, slow), pick(init, slow), **kw)
            if not fast:
                return
            params, grads, bufs, masks, init = (pick(x, fast) for x in
                                                (params, grads, bufs, masks, init))
        impl(params, grads, bufs, masks, init, **kw)
    run.__name__ = getattr(impl, "__name__", "run")
    return run


def _compiled(symbol: str) -> Callable:
    def impl(params, grads, bufs, masks, init, *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, decoupled):
        getattr(_ext._C, symbol)(list(params), list(grads), list(bufs), list(masks),
                                 [bool(x) for x in init], float(lr), float(momentum),
                                 float(dampening), float(weight_decay), bool(nesterov),
                                 bool(maximize), bool(decoupled))
    impl.__name__ = symbol
    return _split_by_layout(impl)


def _triton(params, grads, bufs, masks, init, **kw):
    from fastimp.kernels.masked_sgd import masked_sgd_triton
    masked_sgd_triton(params, grads, bufs, masks, init, **kw)


_cpu = _compiled("masked_sgd_cpu")
_cuda = _compiled("masked_sgd_cuda")
_triton = _split_by_layout(_triton)

register_op("masked_sgd", {"torch": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton},
            auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
            ext_symbols={"cpu": "masked_sgd_cpu", "cuda": "masked_sgd_cuda"})


@torch.no_grad()
def masked_sgd_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None,
                masks: Optional[Sequence[Optional[torch.Tensor]]] = None, *, lr: float,
                momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                nesterov: bool = False, maximize: bool = False, decoupled: bool = False,
                backend: str = "auto") -> List[Optional[torch.Tensor]]:
    """One masked SGD step over ``params`` in place (the formula in this module's docstring).

    ``momentum_buffers[i]`` None creates the buffer (``b = d``); masks are bool/uint8 tensors
    laid out like their param, or None. Returns the momentum buffers (all None without momentum).
    One kernel launch per (device, dtype) group for the compiled and Triton backends.
    """
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"grads: expected {n} tensors (one per param), got {len(grads)}")
    bufs: List[Optional[torch.Tensor]] = (list(momentum_buffers) if momentum_buffers is not None
                                          else [None] * n)
    mks = list(masks) if masks is not None else [None] * n
    if len(bufs) != n or len(mks) != n:
        raise ValueError("momentum_buffers and masks: expected one entry (or None) per param")
    init = [False] * n
    if momentum != 0:
        for i in range(n):
            if bufs[i] is None:
                bufs[i] = torch.empty_like(grads[i], memory_format=torch.preserve_format)
                init[i] = True
    else:
        bufs = [None] * n
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, decoupled=decoupled)
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        if dtype not in _DTYPES:
            what = "complex" if dtype.is_complex else str(dtype)
            raise TypeError(f"params: expected float32, bfloat16 or float16 tensors, got {what} "
                            "(complex, float64 and integer params are not supported)")
        impl = resolve("masked_sgd", backend, device)
        if len(idx) == n:
            impl(params, grads, bufs, mks, init, **kw)
        else:
            impl([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                 [mks[i] for i in idx], [init[i] for i in idx], **kw)
    return bufs
