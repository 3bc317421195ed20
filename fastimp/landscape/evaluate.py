"""Batched evaluation of K networks theta_k = origin + sum_j coeffs[k, j] * directions[j].

Per chunk of points: :func:`fastimp.ops.weight_points` writes the chunk's weight sets [k, D] in one
pass, one batched forward (``torch.func.functional_call`` + ``vmap``; convolutions become grouped
convolutions) evaluates all of them on each batch, which is read once per chunk, and the error
counts and summed losses are reduced on the device.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fastimp.landscape.space import StateLayout
from fastimp.ops.weight_points import weight_points

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Evaluation:
    """Per point: ``error`` (fraction misclassified), ``loss`` (mean cross-entropy), and ``n``."""
    error: torch.Tensor  # [K] float64, CPU
    loss: torch.Tensor   # [K] float64, CPU
    n: int


def _check_data(data, name="data") -> None:
    if data is None or isinstance(data, (torch.Tensor, str)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name}: expected an iterable of (x, y) batches, got {type(data).__name__}")


def _batches(data, device) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"data: batch {i} is not an (x, y) pair")
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


def reset_bn_(model: nn.Module, train_data, max_batches: Optional[int] = None) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` on ``train_data`` in place: the
    equal-weight average of the batch means and unbiased variances (``momentum=None``)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    saved = [(m, m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    dev = next(iter(model.parameters())).device
    with torch.no_grad():
        for i, (x, _) in enumerate(_batches(train_data, dev)):
            if max_batches is not None and i >= max_batches:
                break
            model(x)
    for m, mom, tr in saved:
        m.momentum = mom
        m.train(tr)
    model.train(was)
    return model.eval()


def _device_of(t: torch.Tensor, device):
    return torch.device(device) if device is not None else t.device


def _memory_budget(device: torch.device) -> int:
    from fastimp._memory import available_bytes
    if device.type == "cuda":
        return int(available_bytes(device) * 0.6)
    return int(min(available_bytes(device) * 0.25, 2 << 30))  # CPU: stay small for the caches


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output for one point on batch ``x``: a probe forward on two
    examples, scaled linearly to the batch."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    probe = x[:2]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hs:
            h.remove()
    return (total[0] * len(x)) // max(len(probe), 1) + x.numel() * x.element_size()


def auto_chunk_size(model: nn.Module, layout: StateLayout, x: torch.Tensor, K: int,
                    device: torch.device) -> int:
    """Points per chunk: what fits in a fraction of the free memory (weights + activations)."""
    per_point = layout.D * 4 * 2 + 3 * _activation_bytes(model, x)
    return int(max(1, min(K, _memory_budget(device) // max(per_point, 1))))


def auto_batching(model: nn.Module, device, batch_examples: int = 0) -> str:
    """``"vmap"`` on a GPU (a small network leaves most of the card idle) and on the CPU for small
    batches (<= 16 examples: per-op overhead dominates, e.g. a ResNet-20 slice on a few images);
    ``"loop"`` on the CPU for larger ones (ResNet-20 on 32 images already), compute-bound there: vmap's batched
    matmuls and grouped convolutions (the input replicated K times) are slower than K plain
    forwards (benchmarks/bench_landscape.py)."""
    if torch.device(device).type != "cpu":
        return "vmap"
    return "vmap" if batch_examples <= 16 else "loop"


class _Forward:
    """The batched forward of one architecture: f(params[k], buffers[k], x) -> logits [k, N, C]."""

    def __init__(self, model: nn.Module, layout: StateLayout, batching: str):
        self.model = model
        self.layout = layout
        self.batching = batching
        self.bns = [m for m in model.modules() if isinstance(m, _BN)]

        def f(params, buffers, x):
            return functional_call(model, (params, buffers), (x,))

        self.f = f
        self.batched = vmap(f, in_dims=(0, 0, None))

    def _over_points(self, f, batched, args, x):
        if self.batching == "vmap":
            return batched(*args, x)
        if f is self.f:
            return self._copy_loop(*args, x)
        k = next(iter(args[0].values())).shape[0] if args[0] else 1
        outs = [f(*[{n: v[i] for n, v in a.items()} for a in args], x) for i in range(k)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(t) for t in zip(*outs))
        return torch.stack(outs)

    def _copy_loop(self, params, buffers, x):
        """Per point: copy its weights into the model's own tensors (one pass over D floats) and
        call the model directly, which costs less than ``functional_call``'s swapping."""
        names = list(params) + list(buffers)
        if getattr(self, "_names", None) != names:
            own = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
            self._names, self._targets = names, [own[n] for n in names]
        sources = list(params.values()) + list(buffers.values())
        k = sources[0].shape[0] if sources else 1
        outs = []
        for i in range(k):
            if sources:
                torch._foreach_copy_(self._targets, [v[i] for v in sources])
            outs.append(self.model(x))
        return torch.stack(outs)

    def logits(self, params, buffers, x):
        return self._over_points(self.f, self.batched, (params, buffers), x)

    def bn_stats(self, params, train_batches, max_batches):
        """Per point and BN layer: running mean and variance recomputed on the training batches."""
        model, bns = self.model, self.bns
        captured: List[torch.Tensor] = []

        def pre_hook(_m, inputs):
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=n > 1)
            captured.append(torch.stack([mean, var]))

        def f(params, x):
            captured.clear()
            functional_call(model, params, (x,))
            return tuple(captured)

        batched = vmap(f, in_dims=(0, None))
        saved = [(m.track_running_stats, m.training) for m in bns]
        hs = [m.register_forward_pre_hook(pre_hook) for m in bns]
        for m in bns:
            m.track_running_stats = False
            m.train()
        sums = None
        nb = 0
        try:
            for i, (x, _) in enumerate(train_batches()):
                if max_batches is not None and i >= max_batches:
                    break
                out = self._over_points(f, batched, (params,), x)
                sums = list(out) if sums is None else [s + o for s, o in zip(sums, out)]
                nb += 1
        finally:
            for h in hs:
                h.remove()
            for m, (trs, tr) in zip(bns, saved):
                m.track_running_stats = trs
                m.train(tr)
        if nb == 0:
            raise ValueError("train_data: expected at least one batch for bn='reset'")
        names = {id(m): n for n, m in model.named_modules()}
        buffers = {}
        for m, s in zip(bns, sums):
            prefix = names[id(m)]
            buffers[f"{prefix}.running_mean" if prefix else "running_mean"] = s[:, 0] / nb
            buffers[f"{prefix}.running_var" if prefix else "running_var"] = s[:, 1] / nb
        return buffers


_COPIES: "weakref.WeakKeyDictionary[nn.Module, Dict[torch.device, nn.Module]]" = \
    weakref.WeakKeyDictionary()


def _working_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    """A private eval-mode copy of ``model`` on ``dev`` whose tensors evaluate() overwrites; kept
    per (model, device) so repeated calls skip the deep copy (the user's model is never touched)."""
    per_dev = _COPIES.setdefault(model, {})
    net = per_dev.get(dev)
    if net is None or len(list(net.parameters())) != len(list(model.parameters())):
        net = copy.deepcopy(model).to(dev)
        for p in net.parameters():
            p.requires_grad_(False)
        per_dev[dev] = net
    return net.eval()


@dataclass
class _Plan:
    """What every chunk of points shares: the batched forward, the layout, the points' origin
    [D], directions U [J, D] and clipping (non-prunable coordinates ``clip`` [D] and the
    coefficient bounds ``lo``/``hi`` [J]), the data and the BatchNorm mode."""
    fwd: _Forward
    layout: StateLayout
    origin: torch.Tensor
    U: torch.Tensor
    clip: torch.Tensor
    lo: Optional[torch.Tensor]
    hi: Optional[torch.Tensor]
    data: Sequence
    bn: str
    train_data: Optional[Sequence]
    bn_batches: Optional[int]
    backend: str
    device: torch.device


def evaluate(model: nn.Module, origin, directions, coeffs, data, *, bn: str = "interpolate",
             train_data=None, bn_batches: Optional[int] = None, clip: Optional[Tuple] = None,
             chunk_size: Optional[int] = None, backend: str = "auto", device=None,
             include=None, batching: str = "auto", progress: bool = False,
             distributed: bool = False) -> Evaluation:
    """Error and loss of each ``theta_k = origin + sum_j coeffs[k, j] * directions[j]`` on ``data``.

    - ``model``: the architecture (its own weights are not used, except non-float buffers).
    - ``origin``: model, state dict or flat vector; ``directions``: tensor [J, D] in the layout of
      :class:`StateLayout` (or [J, D_params]: buffers then do not move) or a list of state dicts
      / flat vectors; ``coeffs``: [K, J].
    - ``clip=(lo, hi)`` (sequences [J]): coefficients of the non-prunable coordinates (parameters
      and BN buffers) are clamped to [lo_j, hi_j] (Appendix B: with directions w_j - origin and
      (0, 1) they stay in the convex hull and are projected onto its nearest boundary outside it).
    - ``bn="interpolate"``: BN running statistics move with the weights; ``bn="reset"``: they are
      recomputed per point on ``train_data`` (first ``bn_batches`` batches), batched as well.
    - ``batching``: ``"vmap"`` (one forward for the chunk's points), ``"loop"`` (per point, its
      row of the chunk copied into a cached working model, then a plain forward) or ``"auto"``
      (:func:`auto_batching`). The caller's ``model`` is never modified.
    - ``distributed=True`` (every rank of the torch.distributed group calls it with the same
      arguments): each rank evaluates a contiguous share of the K points and every rank gets all
      of them back, in order — the one-process result (each point is evaluated alone, so its
      numbers do not depend on which rank computed it, up to the chunking of ``"vmap"``).
    """
    plan, C, first = _prepare(model, origin, directions, coeffs, data, bn, train_data,
                              bn_batches, clip, backend, device, include, batching)
    K = C.shape[0]
    rows = range(K)
    if distributed:
        from fastimp.distributed import is_main, shard
        rows = shard(K)
        progress = progress and is_main()
    Cr = C[rows.start:rows.stop]
    k = Cr.shape[0]
    chunk_size = _chunk_size(plan, chunk_size, max(k, 1), first)
    errors = torch.zeros(k, dtype=torch.float64, device=plan.device)
    losses = torch.zeros(k, dtype=torch.float64, device=plan.device)
    n_total = _run_chunks(plan, Cr, chunk_size, errors, losses, progress) if k or not distributed \
        else None
    if distributed:
        from fastimp.distributed import all_gather_objects
        parts = all_gather_objects((errors.cpu(), losses.cpu(), n_total))
        errors = torch.cat([p[0] for p in parts])
        losses = torch.cat([p[1] for p in parts])
        seen = [p[2] for p in parts if p[2] is not None and p[0].numel()]
        n_total = seen[0] if seen else 1
    if n_total == 0:
        raise ValueError("data: expected at least one example")
    denom = max(n_total, 1)
    return Evaluation(error=(errors / denom).cpu(), loss=(losses / denom).cpu(),
                      n=n_total if K else 0)


def _prepare(model, origin, directions, coeffs, data, bn, train_data, bn_batches, clip, backend,
             device, include, batching):
    """Check the arguments of :func:`evaluate` -> (its :class:`_Plan`, coeffs [K, J] on the
    device, the first batch of ``data`` or None when no default needed it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if bn not in ("interpolate", "reset"):
        raise ValueError(f"bn: expected 'interpolate' or 'reset', got {bn!r}")
    _check_data(data)
    if iter(data) is data:  # a one-pass iterator: every chunk reads the data again
        data = list(data)
    if bn == "reset":
        _check_data(train_data, "train_data")
        if iter(train_data) is train_data:
            train_data = list(train_data)
    layout = StateLayout(model, include)
    o = layout.flatten(origin)
    dev = _device_of(o, device)
    o = o.to(dev)
    U = _directions(layout, directions, o)
    if not isinstance(coeffs, torch.Tensor):
        coeffs = torch.as_tensor(coeffs, dtype=torch.float32)
    if coeffs.dim() != 2 or coeffs.shape[1] != U.shape[0]:
        raise ValueError(f"coeffs: expected a tensor [K, {U.shape[0]}], got {tuple(coeffs.shape)}")
    if not torch.isfinite(coeffs).all():
        raise ValueError("coeffs: expected finite values")
    C = coeffs.to(dev, torch.float32)
    J = C.shape[1]
    lo = hi = None
    if clip is not None:
        lo, hi = clip
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).to(dev)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).to(dev)
        if lo.numel() != J or hi.numel() != J:
            raise ValueError(f"clip: expected (lo, hi) with {J} entries each")
    net = _working_copy(model, dev)
    first = None  # the first batch, read only when a default needs it
    if batching == "auto":
        first = next(iter(data))
        batching = auto_batching(net, dev, len(first[1]))
    elif batching not in ("vmap", "loop"):
        raise ValueError(f"batching: expected 'auto', 'vmap' or 'loop', got {batching!r}")
    plan = _Plan(_Forward(net, layout, batching), layout, o, U, layout.prunable.logical_not().to(dev),
                 lo, hi, data, bn, train_data, bn_batches, backend, dev)
    return plan, C, first


def _chunk_size(plan: _Plan, chunk_size, K: int, first) -> int:
    """Points per chunk: ``chunk_size``, or what fits in memory (:func:`auto_chunk_size`)."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        return chunk_size
    if plan.fwd.batching == "vmap":
        first = first if first is not None else next(iter(plan.data))
        return auto_chunk_size(plan.fwd.model, plan.layout, first[0].to(plan.device), K,
                               plan.device)
    return int(max(1, min(K, _memory_budget(plan.device) // (plan.layout.D * 4))))


def _run_chunks(plan: _Plan, C: torch.Tensor, chunk_size: int, errors: torch.Tensor,
                losses: torch.Tensor, progress: bool) -> int:
    """Every chunk of points into ``errors``/``losses`` [K]; a CUDA out-of-memory error halves
    the chunk and redoes it. Returns the examples seen per point."""
    K = C.shape[0]
    n_total = 0 if K else 1
    W = torch.empty(min(chunk_size, max(K, 1)), plan.layout.D, dtype=torch.float32,
                    device=plan.device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=K, desc="landscape", unit="point")
    s = 0
    with torch.no_grad():
        while s < K:
            e = min(K, s + chunk_size)
            try:
                n_total = _chunk(plan, C[s:e], W[:e - s], errors[s:e], losses[s:e])
            except torch.cuda.OutOfMemoryError:
                if chunk_size == 1:
                    raise
                errors[s:e] = 0
                losses[s:e] = 0
                chunk_size = max(1, chunk_size // 2)  # the probe underestimated: halve, redo
                torch.cuda.empty_cache()
                continue
            if bar is not None:
                bar.update(e - s)
            s = e
    if bar is not None:
        bar.close()
    return n_total


def _chunk(plan: _Plan, C: torch.Tensor, Wk: torch.Tensor, errors: torch.Tensor,
           losses: torch.Tensor) -> int:
    """Evaluate one chunk of points into ``errors``/``losses`` (views); returns the examples seen."""
    weight_points(plan.origin, plan.U, C, clip=plan.clip, lo=plan.lo, hi=plan.hi, out=Wk,
                  backend=plan.backend)
    params, buffers = plan.layout.views(Wk)
    fwd = plan.fwd
    if plan.bn == "reset" and fwd.bns:
        buffers = {**buffers, **fwd.bn_stats(params, lambda: _batches(plan.train_data,
                                                                      plan.device),
                                             plan.bn_batches)}
    n = 0
    for x, y in _batches(plan.data, plan.device):
        logits = fwd.logits(params, buffers, x)  # [k, N, C]
        k, N, nc = logits.shape
        ce = F.cross_entropy(logits.reshape(k * N, nc), y.repeat(k), reduction="none")
        losses += ce.view(k, N).sum(1, dtype=torch.float64)
        errors += (logits.argmax(-1) != y).sum(1, dtype=torch.float64)
        n += N
    return n


def _directions(layout: StateLayout, directions, o: torch.Tensor) -> torch.Tensor:
    if isinstance(directions, torch.Tensor):
        if directions.dim() == 1:
            directions = directions[None]
        if directions.dim() != 2 or directions.shape[1] not in (layout.D, layout.D_params):
            raise ValueError(f"directions: expected a tensor [J, {layout.D}] (or [J, "
                             f"{layout.D_params}] for parameters only), got {tuple(directions.shape)}")
        U = directions.detach().to(o.device, torch.float32)
        if U.shape[1] == layout.D_params and layout.D != layout.D_params:
            U = torch.cat([U, U.new_zeros(U.shape[0], layout.D - layout.D_params)], 1)
        return U.contiguous()
    if isinstance(directions, (list, tuple)):
        if not directions:
            return o.new_zeros(0, layout.D)
        return torch.stack([_directions(layout, d, o)[0] if isinstance(d, torch.Tensor)
                            else layout.flatten(d).to(o.device) for d in directions])
    raise TypeError(f"directions: expected a tensor [J, D] or a list, got {type(directions).__name__}")


def evaluate_loop(model: nn.Module, states: Sequence, data, *, bn: str = "interpolate",
                  train_data=None, bn_batches: Optional[int] = None, device="cpu") -> Evaluation:
    """The one-model-at-a-time reference: ``load_state_dict`` + evaluate, per state dict."""
    net = copy.deepcopy(model).to(device).eval()
    errs, losses = [], []
    n = 0
    for sd in states:
        net.load_state_dict(sd)
        if bn == "reset":
            reset_bn_(net, train_data, bn_batches)
        net.eval()
        e = l = 0.0
        n = 0
        with torch.no_grad():
            for x, y in _batches(data, device):
                out = net(x)
                l += F.cross_entropy(out, y, reduction="sum").item()
                e += (out.argmax(-1) != y).sum().item()
                n += y.numel()
        errs.append(e / n)
        losses.append(l / n)
    return Evaluation(torch.tensor(errs, dtype=torch.float64),
                      torch.tensor(losses, dtype=torch.float64), n)
