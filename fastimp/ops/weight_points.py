"""``weight_points``: the weight sets of K points of an affine slice of weight space, in one pass.

    theta[k, i] = origin[i] + sum_j c_kj(i) * directions[j, i]
    c_kj(i)     = clamp(coeffs[k, j], lo[j], hi[j])   if clip[i]   (non-prunable coordinates)
                  coeffs[k, j]                        otherwise

With directions u_j = w_j - w_0 between solutions, clamping the coefficients of the non-prunable
coordinates to [0, 1] keeps them inside the convex hull of the solutions and projects them onto its
nearest boundary outside it, while the prunable ones are extrapolated (paper, Appendix B).
Sums run over j in order with accumulation in the output dtype (float32 or float64).

Backends take ``impl(origin, directions, coeffs, clip, lo, hi, out) -> None`` and write the
preallocated ``out``. Under ``torch.compile`` the op is the custom op
``torch.ops.fastimp.weight_points_``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastimp import _ext
from fastimp._backend import register_op, resolve
from fastimp.ops._overlap import message, overlap

DTYPES = (torch.float32, torch.float64)


def reference(origin, directions, coeffs, clip, lo, hi, out) -> None:
    """Pure-PyTorch reference (the spec)."""
    K, J = coeffs.shape
    out.copy_(origin.expand(K, -1))
    if J == 0 or K == 0:
        return
    cc = torch.minimum(torch.maximum(coeffs, lo), hi)  # [K, J] clamped
    clipf = clip.to(out.dtype)  # [D]
    for j in range(J):
        c = coeffs[:, j:j + 1] + (cc[:, j:j + 1] - coeffs[:, j:j + 1]) * clipf  # [K, D]
        out.addcmul_(c, directions[j].expand(K, -1))


def _cpu(origin, directions, coeffs, clip, lo, hi, out) -> None:
    _ext._C.weight_points_cpu(origin, directions, coeffs, clip, lo, hi, out)


def _triton(origin, directions, coeffs, clip, lo, hi, out) -> None:
    from fastimp.kernels.weight_points import weight_points_triton
    weight_points_triton(origin, directions, coeffs, clip, lo, hi, out)


register_op("weight_points", {"torch": reference, "cpu": _cpu, "triton": _triton},
            auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
            ext_symbols={"cpu": "weight_points_cpu"})


def _run(origin, directions, coeffs, clip, lo, hi, out, backend) -> None:
    resolve("weight_points", backend, origin.device)(origin, directions, coeffs, clip, lo, hi, out)


@torch.library.custom_op("fastimp::weight_points_", mutates_args=("out",))
def _weight_points_op(origin: Tensor, directions: Tensor, coeffs: Tensor, clip: Tensor,
                      lo: Tensor, hi: Tensor, out: Tensor, backend: str) -> None:
    """The op as a torch custom op (writes ``out``)."""
    _run(origin, directions, coeffs, clip, lo, hi, out, backend)


@_weight_points_op.register_fake
def _(origin, directions, coeffs, clip, lo, hi, out, backend):
    return None


def call_op(origin, directions, coeffs, clip, lo, hi, out, backend) -> None:
    """The op through ``torch.ops.fastimp.weight_points_`` (what ``torch.compile`` traces)."""
    torch.ops.fastimp.weight_points_(origin, directions, coeffs, clip, lo, hi, out, backend)


def _check(origin, directions, coeffs, clip, lo, hi, out):
    if not isinstance(origin, torch.Tensor) or origin.dim() != 1:
        raise TypeError(f"origin: expected a 1-D tensor [D], got "
                        f"{getattr(origin, 'shape', type(origin).__name__)}")
    D = origin.numel()
    dt, dev = origin.dtype, origin.device
    if dt not in DTYPES:
        raise TypeError(f"origin: expected dtype float32 or float64, got {dt}")
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[1] != D:
        raise ValueError(f"directions: expected a tensor [J, {D}], got "
                         f"{getattr(directions, 'shape', type(directions).__name__)}")
    J = directions.shape[0]
    if not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != J:
        raise ValueError(f"coeffs: expected a tensor [K, {J}], got "
                         f"{getattr(coeffs, 'shape', type(coeffs).__name__)}")
    for name, t in (("directions", directions), ("coeffs", coeffs), ("lo", lo), ("hi", hi)):
        if t.dtype != dt or t.device != dev:
            raise TypeError(f"{name}: expected {dt} on {dev} like origin, got {t.dtype} on {t.device}")
    if clip.shape != (D,) or clip.dtype != torch.bool or clip.device != dev:
        raise ValueError(f"clip: expected a bool tensor [{D}] on {dev}, got {clip.dtype} "
                         f"{tuple(clip.shape)} on {clip.device}")
    if lo.shape != (J,) or hi.shape != (J,):
        raise ValueError(f"lo, hi: expected tensors [{J}], got {tuple(lo.shape)}, {tuple(hi.shape)}")
    if out is not None:
        if out.shape != (coeffs.shape[0], D) or out.dtype != dt or out.device != dev \
                or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous {dt} tensor [{coeffs.shape[0]}, {D}] on "
                             f"{dev}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        for name, t in (("origin", origin), ("directions", directions), ("coeffs", coeffs),
                        ("clip", clip), ("lo", lo), ("hi", hi)):
            if overlap(t, out):
                raise ValueError(message(name, None, "out", None))


def weight_points(origin: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor, *,
                  clip: Optional[torch.Tensor] = None, lo=None, hi=None,
                  out: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Write the K weight sets ``origin + coeffs @ directions`` into ``out`` ([K, D]).

    ``clip`` (bool [D]) marks the coordinates whose coefficients are clamped to ``[lo[j], hi[j]]``
    (``lo``/``hi``: tensors or sequences [J]; default: no clamping). ``out`` may share no
    memory with an input (ValueError).
    """
    if isinstance(origin, torch.Tensor) and origin.dtype not in DTYPES:
        raise TypeError(f"origin: expected dtype float32 or float64, got {origin.dtype}")
    if isinstance(directions, torch.Tensor) and directions.dim() == 2 and isinstance(origin, torch.Tensor):
        J = directions.shape[0]
        dt, dev = origin.dtype, origin.device
        if clip is None:
            clip = torch.zeros(origin.numel(), dtype=torch.bool, device=dev)
        lo = torch.full((J,), -float("inf"), dtype=dt, device=dev) if lo is None else \
            torch.as_tensor(lo, dtype=dt, device=dev)
        hi = torch.full((J,), float("inf"), dtype=dt, device=dev) if hi is None else \
            torch.as_tensor(hi, dtype=dt, device=dev)
    _check(origin, directions, coeffs, clip, lo, hi, out)
    if out is None:
        out = torch.empty(coeffs.shape[0], origin.numel(), dtype=origin.dtype, device=origin.device)
    if out.numel() == 0:
        return out
    if bool(torch.any(lo > hi)):
        raise ValueError("lo, hi: expected lo[j] <= hi[j] for every direction")
    run = call_op if torch.compiler.is_compiling() else _run
    run(origin.contiguous(), directions.contiguous(), coeffs.contiguous(), clip.contiguous(),
        lo.contiguous(), hi.contiguous(), out, backend)
    return out
