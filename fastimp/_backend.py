"""Backend dispatch shared by every op in :mod:`fastimp.ops`.

Backends: ``torch`` (the pure-PyTorch reference, always there), ``cpu`` (the compiled C++/OpenMP
kernels), ``cuda`` (the compiled CUDA kernels) and ``triton``. Each op registers one callable per
backend and, per device type, the order in which ``backend="auto"`` tries them: fastest first
where ``benchmarks/`` has measured it (the CPU); on CUDA, until ``benchmarks.gpu_check`` has timed
them, the backend whose kernel source CI runs (Triton, under its interpreter) before the one that
is only compiled (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from fastimp import _ext

BACKENDS = ("torch", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Status:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


@dataclass
class Op:
    name: str
    impls: Dict[str, Callable]
    auto: Dict[str, Sequence[str]]
    ext_symbols: Dict[str, str]  # backend -> name of the function the extension must export


_OPS: Dict[str, Op] = {}


def register_op(name: str, impls: Mapping[str, Callable], auto: Mapping[str, Sequence[str]],
                ext_symbols: Optional[Mapping[str, str]] = None) -> Op:
    """Register op ``name``; ``impls`` maps backend -> callable (``torch`` is required)."""
    if "torch" not in impls:
        raise ValueError(f"op {name!r} needs a 'torch' reference implementation")
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"op {name!r}: unknown backends {sorted(unknown)}; expected {BACKENDS}")
    op = Op(name, dict(impls), {k: tuple(v) for k, v in auto.items()}, dict(ext_symbols or {}))
    _OPS[name] = op
    return op


@functools.lru_cache(maxsize=None)
def _triton_status(device_type: str) -> Status:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return Status(False, f"triton is not importable ({exc})")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Status(False, "no CUDA device")
        return Status(True, "ok")
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return Status(True, "ok (Triton interpreter, TRITON_INTERPRET=1; slow, for tests)")
        return Status(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return Status(False, f"no Triton support for device type {device_type!r}")


def status(op_name: str, backend: str, device_type: str) -> Status:
    """Whether ``backend`` can run op ``op_name`` on tensors of ``device_type``, and why not."""
    op = _get(op_name)
    if backend not in op.impls:
        return Status(False, f"op {op_name!r} has no {backend!r} implementation")
    if backend == "torch":
        return Status(True, "ok (PyTorch reference)")
    if backend == "triton":
        return _triton_status(device_type)
    if _ext._C is None:
        return Status(False, _ext.error or "compiled extension missing")
    sym = op.ext_symbols.get(backend)
    if sym and not _ext.has(sym):
        return Status(False, f"the compiled extension has no {sym!r} (rebuild with `make build`)")
    if backend == "cpu":
        return Status(True, "ok") if device_type == "cpu" else Status(False, "cpu backend needs CPU tensors")
    if backend == "cuda":
        if device_type != "cuda":
            return Status(False, "cuda backend needs CUDA tensors")
        if not _ext.cuda_compiled():
            return Status(False, "the extension was built without CUDA (no nvcc at build time, "
                                 "or FASTIMP_BUILD_CUDA=0)")
        if not torch.cuda.is_available():
            return Status(False, "no CUDA device")
        return Status(True, "ok")
    return Status(False, "unknown backend")  # pragma: no cover


def _get(op_name: str) -> Op:
    try:
        return _OPS[op_name]
    except KeyError:
        raise ValueError(f"unknown op {op_name!r}; registered: {sorted(_OPS)}") from None


def resolve(op_name: str, backend: str, device: torch.device | str) -> Callable:
    """The implementation of ``op_name`` to call on ``device`` for ``backend`` (or ``"auto"``)."""
    op = _get(op_name)
    device_type = torch.device(device).type
    if backend == "auto":
        for name in op.auto.get(device_type, ("torch",)):
            if status(op_name, name, device_type):
                return op.impls[name]
        return op.impls["torch"]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    st = status(op_name, backend, device_type)
    if not st:
        raise RuntimeError(f"backend {backend!r} is not available for op {op_name!r} on "
                           f"{device_type}: {st.reason}")
    return op.impls[backend]


def resolve_name(op_name: str, backend: str, device: torch.device | str) -> str:
    """Name of the backend that :func:`resolve` picks."""
    impl = resolve(op_name, backend, device)
    return next(k for k, v in _get(op_name).impls.items() if v is impl)


def backends(devices: Sequence[str] = ("cpu", "cuda")) -> Dict[str, Dict[str, Dict[str, Status]]]:
    """Per op, device type and backend: whether it is available and, if not, why.

    >>> import fastimp; fastimp.backends()["masked_sgd"]["cpu"]["cpu"].available
    """
    _load_ops()
    return {name: {dev: {b: status(name, b, dev) for b in BACKENDS} for dev in devices}
            for name in sorted(_OPS)}


def format_backends(devices: Sequence[str] = ("cpu", "cuda")) -> str:
    """A readable table of :func:`backends`, with the backend ``auto`` picks marked ``*``."""
    lines = []
    for name, per_dev in backends(devices).items():
        for dev, per_b in per_dev.items():
            try:
                picked = resolve_name(name, "auto", dev)
            except Exception:
                picked = None
            for b, st in per_b.items():
                mark = "*" if b == picked else " "
                lines.append(f"{name:<22} {dev:<5} {mark}{b:<7} {'yes' if st else 'no ':<4} {st.reason}")
    return "\n".join(lines)


def _load_ops() -> None:
    import fastimp.ops  # noqa: F401  (registers every op)
