"""Global magnitude threshold: prune the k smallest |w| among the unmasked weights of many tensors.

Given weights w_1..w_T and masks m_1..m_T (None: nothing masked yet), let U be the unmasked
positions, ordered by (tensor index, row-major flat index) — the *position order*. The op removes
the k positions of U with the smallest |w|; among equal |w| (ties) the earlier position is removed
first. The new masks are written to ``out``. With ``fraction`` instead of k, k = round(fraction·n),
n = |U| (Python's round: half to even). This is Algorithm 1 line 5 of the paper.

Backends take ``impl(weights, masks, out, k, fraction) -> Threshold`` (``k`` None: use
``fraction``), write the preallocated ``out`` and return the typed result. Under
``torch.compile`` the op is the custom op ``torch.ops.fastimp.magnitude_threshold``.

Backends: ``torch`` (the reference: concatenate + stable sort), ``cpu`` (C++/OpenMP two-pass
16+16-bit radix select over the float bits of |w|), ``cuda`` (the same on the GPU) and ``triton``
(histogram radix select through an int64 address table, no ``torch.cat``). Kernel backends take
float32, float16 and bfloat16 weights (|w| compared as float32, which preserves their order); for
float64 they fall back to the reference.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastimp import _ext
from fastimp._backend import register_op, resolve, status
from fastimp.ops._overlap import first_overlap, message, same_memory

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Threshold(NamedTuple):
    """What every backend returns."""
    n: int            # unmasked weights before pruning
    k: int            # weights pruned
    threshold: float  # largest pruned |w| (-inf when k = 0; NaN when nonfinite)
    nonfinite: int    # NaN/inf among the unmasked weights (then nothing was written)


class Selection(NamedTuple):
    masks: List[torch.Tensor]  # the new bool masks (the ``out`` tensors)
    n: int                     # unmasked weights before pruning
    k: int                     # weights pruned
    threshold: float           # largest pruned |w| (-inf when k = 0)


def _as_sort_key(w: torch.Tensor) -> torch.Tensor:
    a = w.detach().abs().reshape(-1)
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def reference(weights: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]],
              out: Sequence[torch.Tensor], k: Optional[int], fraction: float) -> Threshold:
    """Concatenate the unmasked |w| in position order, stable-sort, remove the first k
    (k None: k = round(fraction·n)). When some unmasked weight is NaN/inf, nothing is written and
    ``nonfinite`` counts them."""
    vals = []
    for i, w in enumerate(weights):
        a = _as_sort_key(w)
        if masks is not None:
            a = a[masks[i].reshape(-1).to(a.device)]
        vals.append(a)
    device = weights[0].device if len(weights) else torch.device("cpu")
    allv = torch.cat(vals) if vals else torch.zeros(0, device=device)
    n = allv.numel()
    nonfinite = int((~torch.isfinite(allv)).sum())
    if k is None:
        k = round(fraction * n)
    if nonfinite:
        return Threshold(n, k, float("nan"), nonfinite)
    if not 0 <= k <= n:
        raise ValueError(f"magnitude_threshold: argument 'k': expected 0 <= k <= n={n} (the "
                         f"unmasked weights), got {k}")
    order = torch.sort(allv, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[order[:k]] = False
    threshold = float(allv[order[k - 1]]) if k > 0 else float("-inf")
    off = 0
    for i, w in enumerate(weights):
        o = out[i].reshape(-1)
        if masks is None:
            o.copy_(keep[off:off + w.numel()])
            off += w.numel()
        else:
            mf = masks[i].reshape(-1).to(device)
            if mf.data_ptr() == o.data_ptr():  # out[i] is masks[i]: pruning in place
                mf = mf.clone()
            c = int(mf.sum())
            o.zero_()
            o[mf] = keep[off:off + c]
            off += c
    return Threshold(n, k, threshold, 0)


def _kernel_ok(weights) -> bool:
    return all(w.dtype in KERNEL_DTYPES for w in weights)


def _compiled(symbol: str):
    """The backend calling ``fastimp._C.<symbol>`` (dtypes it lacks go to the reference)."""
    def run(weights, masks, out, k, fraction):
        if not _kernel_ok(weights):
            return reference(weights, masks, out, k, fraction)
        n, k, bits, nonfinite = getattr(_ext._C, symbol)(
            list(weights), list(masks) if masks is not None else [], list(out), k,
            float(fraction))
        return _typed(n, k, bits, nonfinite)
    run.__name__ = f"_{symbol}"
    return run


_cpu = _compiled("magnitude_threshold_cpu")
_cuda = _compiled("magnitude_threshold_cuda")


def _triton(weights, masks, out, k, fraction):
    if not _kernel_ok(weights):
        return reference(weights, masks, out, k, fraction)
    from fastimp.kernels.magnitude_threshold import magnitude_threshold_triton
    return _typed(*magnitude_threshold_triton(weights, masks, out, k, fraction))


def _typed(n: int, k: int, bits: int, nonfinite: int) -> Threshold:
    """A kernel's (n, k, threshold key bits, nonfinite) as a Threshold."""
    if nonfinite:
        return Threshold(n, k, float("nan"), nonfinite)
    if k <= 0:
        return Threshold(n, k, float("-inf"), 0)
    return Threshold(n, k, float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)), 0)


# Order on CUDA: Triton first, then the CUDA kernel. Neither has been timed on a GPU yet, so this
# is not a speed claim: the Triton kernels' source runs in CI (Triton interpreter) on every
# backend test, the CUDA kernels are only compiled. `python -m benchmarks.gpu_check` times both.
_OP = register_op("magnitude_threshold",
                  {"torch": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton},
                  auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")},
                  ext_symbols={"cpu": "magnitude_threshold_cpu",
                               "cuda": "magnitude_threshold_cuda"})


# The Triton and CUDA kernels count weights in 32 bits (they refuse more); "auto" hands larger
# sets to the next backend in its order that has no such limit.
KERNEL_MAX_WEIGHTS = 2 ** 31 - 1


def _run(weights, masks, out, k, fraction, backend) -> Threshold:
    device = weights[0].device if weights else torch.device("cpu")
    if backend == "auto" and sum(w.numel() for w in weights) > KERNEL_MAX_WEIGHTS:
        for name in _OP.auto.get(device.type, ()) + ("torch",):
            if name not in ("triton", "cuda") and status(_OP.name, name, device.type):
                return _OP.impls[name](weights, masks, out, k, fraction)
    return resolve("magnitude_threshold", backend, device)(weights, masks, out, k, fraction)


@torch.library.custom_op("fastimp::magnitude_threshold", mutates_args=("out",))
def _magnitude_threshold_op(weights: List[Tensor], masks: List[Tensor], out: List[Tensor],
                            k: Optional[int], fraction: float, backend: str) -> Tensor:
    """The op as a torch custom op (``masks`` empty: none): float64 [4] on the CPU =
    (n, k, threshold, nonfinite)."""
    return torch.tensor(list(_run(weights, masks or None, out, k, fraction, backend)),
                        dtype=torch.float64)


@_magnitude_threshold_op.register_fake
def _(weights, masks, out, k, fraction, backend):
    return torch.empty(4, dtype=torch.float64, device="cpu")


def call_op(weights, masks, out, k, fraction, backend) -> Threshold:
    """The op through ``torch.ops.fastimp.magnitude_threshold`` (what ``torch.compile`` traces)."""
    r = torch.ops.fastimp.magnitude_threshold(list(weights), list(masks or []), list(out), k,
                                              float(fraction), backend)
    n, k, thr, nonfinite = r.tolist()
    return Threshold(int(n), int(k), thr, int(nonfinite))


def magnitude_threshold(weights: Sequence[torch.Tensor],
                        masks: Optional[Sequence[torch.Tensor]] = None,
                        k: Optional[int] = None, *, fraction: Optional[float] = None,
                        out: Optional[Sequence[torch.Tensor]] = None,
                        backend: str = "auto") -> Selection:
    """New masks with the k smallest unmasked |w| removed (ties: earlier position first).

    Give exactly one of ``k`` and ``fraction`` (k = round(fraction·n)). ``out``: bool tensors
    shaped like ``weights`` to write into (allocated when None); ``out=masks`` prunes in place,
    any other overlap of ``out`` with the inputs or itself is a ValueError."""
    weights = list(weights)
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"magnitude_threshold: argument 'weights': entry {i} is not a "
                            f"floating-point tensor")
    if (k is None) == (fraction is None):
        raise ValueError("magnitude_threshold: give exactly one of 'k' and 'fraction'")
    if k is not None:
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"magnitude_threshold: argument 'k': expected an integer >= 0, "
                             f"got {k!r}")
        k, fraction = int(k), 0.0
    else:
        fraction = float(fraction)
        if not (0.0 <= fraction < 1.0):
            raise ValueError(f"magnitude_threshold: argument 'fraction': expected a number in "
                             f"[0, 1), got {fraction}")
    device = weights[0].device if weights else torch.device("cpu")
    if any(w.device != device for w in weights):
        raise ValueError("magnitude_threshold: argument 'weights': all tensors must be on one "
                         "device")
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(weights):
            raise ValueError(f"magnitude_threshold: argument 'masks': expected {len(weights)} "
                             f"masks, got {len(masks)}")
        for i, (w, m) in enumerate(zip(weights, masks)):
            if m.dtype != torch.bool or m.shape != w.shape or m.device != w.device:
                raise ValueError(f"magnitude_threshold: argument 'masks': entry {i} must be a "
                                 f"bool tensor of shape {tuple(w.shape)} on {w.device}, got "
                                 f"{m.dtype} {tuple(m.shape)} on {m.device}")
        masks = [m.contiguous() for m in masks]
    if out is None:
        out = [torch.empty(w.shape, dtype=torch.bool, device=device) for w in weights]
    else:
        out = list(out)
        if len(out) != len(weights) or any(
                o.dtype != torch.bool or o.shape != w.shape or o.device != w.device
                or not o.is_contiguous() for o, w in zip(out, weights)):
            raise ValueError("magnitude_threshold: argument 'out': expected contiguous bool "
                             "tensors shaped like 'weights' on their device")
    _check_no_overlap(weights, masks, out)
    weights = [w.detach().contiguous() for w in weights]
    if not weights:
        return Selection(out, 0, 0, float("-inf")) if not k else _too_many(k)
    run = call_op if torch.compiler.is_compiling() else _run
    n, k, threshold, nonfinite = run(weights, masks, out, k, fraction, backend)
    if nonfinite:
        bad = next(i for i, w in enumerate(weights)
                   if not bool(torch.isfinite(w if masks is None else w[masks[i]]).all()))
        raise ValueError(f"magnitude_threshold: argument 'weights': {nonfinite} unmasked weights "
                         f"are NaN or inf (first in tensor {bad})")
    if math.isnan(threshold):  # pragma: no cover - a backend bug
        raise RuntimeError("magnitude_threshold: backend returned no threshold")
    return Selection(out, n, k, threshold)


def _check_no_overlap(weights, masks, out) -> None:
    """``out`` shares no memory with ``weights``, other ``out`` tensors or the masks of other
    tensors; ``out[i]`` may be ``masks[i]`` itself (pruning in place)."""
    def allowed(a, b):
        if "out" not in (a[0], b[0]):
            return True  # two inputs: both only read
        return {a[0], b[0]} == {"masks", "out"} and a[1] == b[1] and same_memory(a[2], b[2])
    hit = first_overlap([("weights", weights), ("masks", masks or []), ("out", out)], allowed)
    if hit is not None:
        raise ValueError(message(*hit) + (" (out[i] may be masks[i] itself)"
                                          if "masks" in hit else ""))


def _too_many(k: int):
    raise ValueError(f"magnitude_threshold: argument 'k': expected 0 <= k <= n=0 (the unmasked "
                     f"weights), got {k}")
