r"""Fused masked SGD step: ``torch.optim.SGD``'s update, then the mask on the param and its buffer.

Per tensor, with the math in float32 for float32/bfloat16/float16 storage and in float64 for
float64 storage:

.. math::
    d &= \pm g \quad (- \text{ if maximize}) \\
    d &= d + \lambda p \quad \text{(coupled weight decay)} \\
    b &= d \text{ on the buffer's first step, else } \mu b + (1 - \tau) d \\
    d &= d + \mu b \text{ (nesterov) or } b \\
    p &= p - \gamma d \quad \text{or, decoupled, } p = (1 - \gamma\lambda) p - \gamma d \\
    p &= m \,?\, p : 0, \quad b = m \,?\, b : 0

For finite values the last line is ``p.mul_(m)``, ``b.mul_(m)``; it also zeroes non-finite values
at masked coordinates, so pruned weights and their momentum are exactly 0 after every step.

:func:`masked_sgd_` is the entry point (groups tensors by device and dtype, creates buffers).
Backends (``torch`` = :func:`reference`, ``cpu``, ``cuda``, ``triton``) take one group:
``impl(params, grads, bufs, masks, init, *, lr, momentum, dampening, weight_decay, nesterov,
maximize, decoupled) -> None``, updating ``params`` and the preallocated ``bufs`` in place
(``init[i]``: ``bufs[i]`` is new this step). ``lr`` is a number or a one-element float tensor;
the ``cuda`` and ``triton`` backends read a tensor on the device. They keep each group's device
table in a cache (:class:`_Tables`): a step over the same tensors makes no host-to-device copy and
no sync, so it can be captured in a CUDA graph after one warm-up step.
Bad input raises ``ValueError``/``TypeError`` naming the argument, in every backend.
Under ``torch.compile`` the step is the custom op ``torch.ops.fastimp.masked_sgd_``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastimp import _ext
from fastimp._backend import register_op, resolve
from fastimp.ops._overlap import message as overlap_message, overlap

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOW = (torch.bfloat16, torch.float16)
_MASKS = (torch.bool, torch.uint8)
_DTYPES = DTYPES  # the name optim.py used

Lr = Union[float, Tensor]


def lr_parts(lr: Lr, device: torch.device,
             on_device: bool = True) -> Tuple[float, Optional[Tensor]]:
    """(number, tensor for the kernel to read or None). A tensor on ``device`` is left for the
    kernel when ``on_device``; any other is read on the host (a CPU tensor costs no sync)."""
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lr: expected a number or a one-element float32/float64 tensor, got "
                         f"{lr.dtype} {tuple(lr.shape)}")
    if lr.device == device and on_device:
        return 0.0, lr
    if lr.device.type != "cpu" and lr.device != device:
        raise ValueError(f"lr: expected a tensor on the params' device {device} (or the CPU), "
                         f"got one on {lr.device}")
    return float(lr), None


def reference(params: Sequence[Tensor], grads: Sequence[Tensor],
              bufs: Sequence[Optional[Tensor]], masks: Sequence[Optional[Tensor]],
              init: Sequence[bool], *, lr: Lr, momentum: float, dampening: float,
              weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool) -> None:
    """The spec in plain PyTorch: ``torch.optim.SGD``'s for-loop step, then the mask.

    ``bufs[i]`` is preallocated when ``momentum != 0``; ``init[i]`` marks a buffer created this
    step (it becomes ``d``, undampened, as in torch). bfloat16/float16 tensors are upcast to
    float32; float32 and float64 are computed in their own precision.
    """
    check_group(params, grads, bufs, masks, momentum, layout=False)
    lr = float(lr)
    for p, g, b, m, first in zip(params, grads, bufs, masks, init):
        low = p.dtype in _LOW
        pf = p.float() if low else p
        d = g.float() if low else g
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


# -- argument checks (every backend) ------------------------------------------------------------
def _describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}"


def _same_layout(t: Tensor, p: Tensor) -> bool:
    return t.shape == p.shape and (t.stride() == p.stride() or
                                   (t.is_contiguous() and p.is_contiguous()))


def check_group(params: Sequence[Tensor], grads: Sequence[Tensor],
                bufs: Sequence[Optional[Tensor]], masks: Sequence[Optional[Tensor]],
                momentum: float, layout: bool = True) -> None:
    """ValueError/TypeError naming the argument unless every grad and buffer has its param's
    dtype, device and shape (and, with ``layout``, strides), every mask is bool/uint8 of its
    param's shape on its device (laid out alike with ``layout``), and no param or buffer shares
    memory with its grad, buffer or mask."""
    n = len(params)
    if not (len(grads) == len(bufs) == len(masks) == n):
        raise ValueError("params: expected lists params, grads, bufs, masks of one length")
    for i, p in enumerate(params):
        if p.dtype not in DTYPES:
            raise TypeError(f"params: expected float32, float64, bfloat16 or float16 tensors, "
                            f"got {_describe(p)} (tensor {i})")
        same = _same_layout if layout else (lambda t, q: t.shape == q.shape)
        g = grads[i]
        if g.dtype != p.dtype or g.device != p.device or not same(g, p):
            raise ValueError(f"grads: expected tensor {i} with the dtype, device and shape"
                             f"{' and strides' if layout else ''} of its param ({_describe(p)}),"
                             f" got {_describe(g)}")
        b = bufs[i]
        if momentum != 0:
            if b is None:
                raise ValueError("bufs: expected a buffer for every param when momentum != 0")
            if b.dtype != p.dtype or b.device != p.device or not same(b, p):
                raise ValueError(f"bufs: expected tensor {i} with the dtype, device and shape"
                                 f"{' and strides' if layout else ''} of its param "
                                 f"({_describe(p)}), got {_describe(b)}")
        m = masks[i]
        if m is not None and (m.dtype not in _MASKS or m.device != p.device or not same(m, p)):
            raise ValueError(f"masks: expected tensor {i} of dtype bool or uint8 with the device "
                             f"and shape{' and strides' if layout else ''} of its param "
                             f"({_describe(p)}), got {_describe(m)}")
        _check_no_overlap(i, p, g, b if momentum != 0 else None, m)


def _check_no_overlap(i: int, p: Tensor, g: Tensor, b: Optional[Tensor],
                      m: Optional[Tensor]) -> None:
    """The written p and b share no memory with each other or with the g and m they read
    (``csrc/checks.h`` ``no_overlap`` in the compiled backends)."""
    for a, x, c, y in (("params", p, "grads", g), ("params", p, "bufs", b),
                       ("params", p, "masks", m), ("grads", g, "bufs", b),
                       ("bufs", b, "masks", m)):
        if overlap(x, y):
            raise ValueError(overlap_message(a, i, c, i))


def _dense(t: Tensor) -> bool:
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


def _kernel_layout(p: Tensor, g: Tensor, b: Optional[Tensor], m: Optional[Tensor]) -> bool:
    """The compiled and Triton kernels walk the flat storage: p dense, g, b, m laid out alike."""
    if (p.is_contiguous() and g.is_contiguous() and (b is None or b.is_contiguous())
            and (m is None or m.is_contiguous())):
        return True  # the common case, checked cheaply
    return (_dense(p) and g.stride() == p.stride() and (b is None or b.stride() == p.stride())
            and (m is None or m.stride() == p.stride()))


def _pick(xs, idx):
    return [xs[i] for i in idx]


def _split_layout(params, grads, bufs, masks) -> Tuple[List[int], List[int]]:
    fast, slow = [], []
    for i, p in enumerate(params):
        (fast if _kernel_layout(p, grads[i], bufs[i], masks[i]) else slow).append(i)
    return fast, slow


# -- backends -----------------------------------------------------------------------------------
def _cpu(params, grads, bufs, masks, init, *, lr, momentum, dampening, weight_decay, nesterov,
         maximize, decoupled):
    lr_value, _ = lr_parts(lr, torch.device("cpu"), on_device=False)
    kw = dict(lr=lr_value, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, decoupled=decoupled)
    fast, slow = _split_layout(params, grads, bufs, masks)
    if slow:  # a rare tensor laid out unlike its param (e.g. a mask in another memory format)
        reference(*(_pick(x, slow) for x in (params, grads, bufs, masks, init)), **kw)
        if not fast:
            return
        params, grads, bufs, masks, init = (_pick(x, fast) for x in
                                            (params, grads, bufs, masks, init))
    _ext._C.masked_sgd_cpu(list(params), list(grads), list(bufs), list(masks),
                           [bool(x) for x in init], lr_value, None, float(momentum),
                           float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
                           bool(decoupled))


class _Key:
    """A table key: the tuple and its hash, computed once (a dict hashes its key at every
    lookup, and these tuples hold a few hundred items)."""
    __slots__ = ("items", "hash")

    def __init__(self, items: tuple):
        self.items = items
        self.hash = hash(items)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and self.hash == other.hash and self.items == other.items


class _Tables:
    """Device tables of the ``cuda`` and ``triton`` backends, cached per (backend, tensors).

    The key holds everything :func:`check_group` and the layout split read: per param its
    address, shape and strides (the group's device and dtype once), per grad, buffer and mask
    its address, dtype, device, shape and strides, and whether momentum is on. So a hit is a
    group that passed the checks before (same result now): it uploads nothing and checks
    nothing; a miss checks the whole group and builds the table. Building one during CUDA graph
    capture raises. Tables used while capturing are never evicted (the graph reads them at
    replay)."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: Dict[_Key, list] = {}  # key -> [entry, last use]
        self.pinned: Dict[_Key, tuple] = {}
        self.builds = 0
        self.clock = 0

    @staticmethod
    def key(backend, params, grads, bufs, masks, momentum) -> "_Key":
        return _Key((backend, params[0].device, params[0].dtype, momentum != 0, tuple([
            (p.data_ptr(), p.shape, p.stride(),
             g.data_ptr(), g.dtype, g.device, g.shape, g.stride(),
             None if b is None else (b.data_ptr(), b.dtype, b.device, b.shape, b.stride()),
             None if m is None else (m.data_ptr(), m.dtype, m.device, m.shape, m.stride()))
            for p, g, b, m in zip(params, grads, bufs, masks)])))

    def get(self, backend: str, build: Callable, params, grads, bufs, masks, momentum):
        """(key, (table or None, fast indices, slow indices))."""
        key = self.key(backend, params, grads, bufs, masks, momentum)
        self.clock += 1
        slot = self.entries.get(key)
        if slot is not None:
            slot[1] = self.clock
            entry = slot[0]
        else:
            entry = self.pinned.get(key) if self.pinned else None
        if entry is None:
            check_group(params, grads, bufs, masks, momentum, layout=False)
            fast, slow = _split_layout(params, grads, bufs, masks)
            table = build(*(_pick(x, fast) for x in (params, grads, bufs, masks))) if fast else None
            entry = (table, fast, slow)
            self.builds += 1
            self.entries[key] = [entry, self.clock]
            if len(self.entries) > self.size:  # evict the least recently used
                del self.entries[min(self.entries, key=lambda k: self.entries[k][1])]
        if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
            self.pinned[key] = entry
        return key, entry

    def pin(self, key, entry) -> None:
        """Keep ``entry`` while a CUDA graph that reads it may replay."""
        self.pinned[key] = entry

    def clear(self) -> None:
        """Forget every table (also those a captured graph may still read: drop the graph too)."""
        self.entries.clear()
        self.pinned.clear()


TABLES = _Tables()


def _by_init(init: Sequence[bool]) -> List[Tuple[bool, List[int]]]:
    """Index groups with one init value each (the tables hold no init flag)."""
    if all(init):
        return [(True, list(range(len(init))))]
    if not any(init):
        return [(False, list(range(len(init))))]
    return [(v, [i for i, x in enumerate(init) if bool(x) == v]) for v in (True, False)]


def _hyper(momentum, dampening, weight_decay, nesterov, maximize, decoupled) -> Dict:
    return dict(momentum=float(momentum), dampening=float(dampening),
                weight_decay=float(weight_decay), nesterov=bool(nesterov),
                maximize=bool(maximize), decoupled=bool(decoupled))


class _DeviceGroup:
    """One (device, dtype) group of the ``cuda`` or ``triton`` backend, prepared: its tables
    (from :data:`TABLES`) per init value; :meth:`run` only launches. It keeps no grads: a table
    holds their addresses, which the caller has checked (the rare tensor laid out unlike its
    param goes to the reference with the grads :meth:`run` is given)."""

    def __init__(self, name, build, launch, params, grads, bufs, masks, init, momentum):
        self.device, self.dtype = params[0].device, params[0].dtype
        for p in params:
            if p.device != self.device or p.dtype != self.dtype:
                raise ValueError(f"params: expected tensors of one device and dtype "
                                 f"({_describe(params[0])}), got {_describe(p)}")
        self.launch = launch
        self.parts = []  # (init, table key, table entry, slow: (indices, params, bufs, masks))
        for first, idx in _by_init(init):
            sub = (params, grads, bufs, masks) if len(idx) == len(init) else \
                tuple(_pick(x, idx) for x in (params, grads, bufs, masks))
            key, entry = TABLES.get(name, build, *sub, momentum)
            slow = None
            if entry[2]:
                slow = (_pick(idx, entry[2]),) + tuple(_pick(sub[k], entry[2]) for k in (0, 2, 3))
            self.parts.append((first, key, entry, slow))
        self.needs_grads = any(part[3] is not None for part in self.parts)

    def run(self, lr: Lr, kw: Dict, grads: Optional[Sequence[Tensor]] = None) -> None:
        lr_value, lr_tensor = lr_parts(lr, self.device)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        for first, key, entry, slow in self.parts:
            if capturing:
                TABLES.pin(key, entry)
            if slow is not None:  # laid out unlike their params: the reference
                idx, ps, bs, ms_ = slow
                reference(ps, _pick(grads, idx), bs, ms_, [first] * len(idx),
                          lr=lr_value if lr_tensor is None else lr_tensor, **kw)
            if entry[0] is not None:
                self.launch(entry[0], self.device, self.dtype, first, lr_value, lr_tensor, kw)


class _ListGroup:
    """One (device, dtype) group of the ``torch`` or ``cpu`` backend (lists each step)."""
    needs_grads = True

    def __init__(self, impl, params, grads, bufs, masks, init, momentum):
        self.impl, self.params, self.bufs, self.masks, self.init = impl, params, bufs, masks, init

    def run(self, lr: Lr, kw: Dict, grads: Optional[Sequence[Tensor]] = None) -> None:
        self.impl(self.params, grads, self.bufs, self.masks, self.init, lr=lr, **kw)


def _device_backend(name: str, build: Callable, launch: Callable) -> Callable:
    def impl(params, grads, bufs, masks, init, *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, decoupled):
        if params:
            _DeviceGroup(name, build, launch, params, grads, bufs, masks, init, momentum).run(
                lr, _hyper(momentum, dampening, weight_decay, nesterov, maximize, decoupled),
                grads)
    impl.__name__ = f"_{name}"
    impl.prepare = lambda *args: _DeviceGroup(name, build, launch, *args)
    return impl


def _cuda_build(params, grads, bufs, masks):
    return _ext._C.masked_sgd_cuda_table(list(params), list(grads), list(bufs), list(masks))


def _cuda_launch(table, device, dtype, first, lr_value, lr_tensor, kw):
    tab, n_tensors, n_chunks, _ = table
    like = torch.empty(0, dtype=dtype, device=device)
    _ext._C.masked_sgd_cuda_launch(tab, n_tensors, n_chunks, like, first, lr_value, lr_tensor,
                                   kw["momentum"], kw["dampening"], kw["weight_decay"],
                                   kw["nesterov"], kw["maximize"], kw["decoupled"])


def _triton_build(params, grads, bufs, masks):
    from fastimp.kernels.masked_sgd import build_table
    return build_table(params, grads, bufs, masks)


def _triton_launch(table, device, dtype, first, lr_value, lr_tensor, kw):
    from fastimp.kernels.masked_sgd import launch
    if device.type == "cuda":
        with torch.cuda.device(device):
            launch(table, dtype, init=first, lr=lr_value, lr_tensor=lr_tensor, **kw)
    else:
        launch(table, dtype, init=first, lr=lr_value, lr_tensor=lr_tensor, **kw)


_cuda = _device_backend("cuda", _cuda_build, _cuda_launch)
_triton = _device_backend("triton", _triton_build, _triton_launch)

# Order on CUDA: Triton first, then the CUDA kernel. Neither has been timed on a GPU yet, so the
# order is not a speed claim: the Triton kernel's source runs in CI (Triton interpreter) on every
# backend test, the CUDA kernel is only compiled. `python -m benchmarks.gpu_check` times both and
# prints the order its numbers support.
register_op("masked_sgd", {"torch": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton},
            auto={"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")},
            ext_symbols={"cpu": "masked_sgd_cpu", "cuda": "masked_sgd_cuda_launch"})


def _groups(params, backend: str) -> List[Tuple[Callable, List[int]]]:
    """(backend implementation, indices) per (device, dtype) group."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    out = []
    for (device, dtype), idx in groups.items():
        if dtype not in DTYPES:
            what = "complex" if dtype.is_complex else str(dtype)
            raise TypeError(f"params: expected float32, float64, bfloat16 or float16 tensors, "
                            f"got {what} (complex and integer params are not supported)")
        out.append((resolve("masked_sgd", backend, device), idx))
    return out


def _run(params, grads, bufs, masks, init, backend: str, **kw) -> None:
    """Group by (device, dtype) and run each group's backend."""
    for impl, idx in _groups(params, backend):
        if len(idx) == len(params):
            impl(params, grads, bufs, masks, init, **kw)
        else:
            impl(*(_pick(x, idx) for x in (params, grads, bufs, masks, init)), **kw)


class Plan:
    """One step over fixed tensors, prepared: the (device, dtype) groups, their backends and
    device tables. ``run(grads, lr, **hyper)`` repeats the step with no per-tensor Python work
    for the ``cuda`` and ``triton`` backends (what ``MaskedSGD`` caches between steps; with a
    tensor ``lr`` it is CUDA-graph capturable). ``grads`` must be the grads it was prepared with
    or new tensors at the same addresses (the caller checks); the plan keeps no grad."""

    def __init__(self, params, grads, bufs, masks, init, backend: str, momentum: float):
        self.groups = []
        for impl, idx in _groups(params, backend):
            whole = len(idx) == len(params)
            lists = (params, grads, bufs, masks, init) if whole else \
                tuple(_pick(x, idx) for x in (params, grads, bufs, masks, init))
            prepare = getattr(impl, "prepare", _partial_list_group(impl))
            self.groups.append((None if whole else idx, prepare(*lists, momentum)))

    def run(self, grads: Sequence[Tensor], lr: Lr, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool) -> None:
        kw = _hyper(momentum, dampening, weight_decay, nesterov, maximize, decoupled)
        for idx, group in self.groups:
            g = None
            if group.needs_grads:
                g = grads if idx is None else _pick(grads, idx)
            group.run(lr, kw, g)


def _partial_list_group(impl):
    return lambda *args: _ListGroup(impl, *args)


@torch.library.custom_op("fastimp::masked_sgd_", mutates_args=("params", "bufs"))
def _masked_sgd_op(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor],
                   masks: List[Optional[Tensor]], init: List[bool], lr: float,
                   lr_tensor: Optional[Tensor], momentum: float, dampening: float,
                   weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool,
                   backend: str) -> None:
    """``masked_sgd_`` as a torch custom op (``bufs`` empty when momentum is 0)."""
    b = list(bufs) if momentum != 0 else [None] * len(params)
    _run(params, grads, b, masks, init, backend, lr=lr if lr_tensor is None else lr_tensor,
         momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
         maximize=maximize, decoupled=decoupled)


@_masked_sgd_op.register_fake
def _(params, grads, bufs, masks, init, lr, lr_tensor, momentum, dampening, weight_decay,
      nesterov, maximize, decoupled, backend):
    return None


def call_op(params, grads, bufs, masks, init, *, lr: Lr, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, decoupled: bool,
            backend: str) -> None:
    """The step through ``torch.ops.fastimp.masked_sgd_`` (what ``torch.compile`` traces)."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    torch.ops.fastimp.masked_sgd_(
        list(params), list(grads), list(bufs) if momentum != 0 else [], list(masks),
        [bool(x) for x in init], 0.0 if lr_tensor is not None else float(lr), lr_tensor,
        float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
        bool(decoupled), backend)


@torch.no_grad()
def masked_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor],
                momentum_buffers: Optional[Sequence[Optional[Tensor]]] = None,
                masks: Optional[Sequence[Optional[Tensor]]] = None, *, lr: Lr,
                momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                nesterov: bool = False, maximize: bool = False, decoupled: bool = False,
                backend: str = "auto") -> List[Optional[Tensor]]:
    """One masked SGD step over ``params`` in place (the formula in this module's docstring).

    ``momentum_buffers[i]`` None creates the buffer (``b = d``); masks are bool/uint8 tensors
    laid out like their param, or None. ``lr``: a number or a one-element float tensor (read on
    the device by the ``cuda`` and ``triton`` backends). Returns the momentum buffers (all None
    without momentum). One kernel launch per (device, dtype) group for the kernel backends.
    """
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"grads: expected {n} tensors (one per param), got {len(grads)}")
    bufs: List[Optional[Tensor]] = (list(momentum_buffers) if momentum_buffers is not None
                                    else [None] * n)
    mks = list(masks) if masks is not None else [None] * n
    if len(bufs) != n or len(mks) != n:
        raise ValueError("momentum_buffers and masks: expected one entry (or None) per param")
    init = [False] * n
    if momentum != 0:
        for i in range(n):
            if bufs[i] is None:
                bufs[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                init[i] = True
    else:
        bufs = [None] * n
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, decoupled=decoupled)
    if torch.compiler.is_compiling():
        call_op(params, grads, bufs, mks, init, backend=backend, **kw)
    else:  # eager: no dispatcher (it costs ~1.5 us per tensor in these lists)
        _run(params, grads, bufs, mks, init, backend, **kw)
    return bufs
