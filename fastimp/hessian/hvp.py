"""Hessian-vector products of the train loss, restricted to the free coordinates of a mask.

The operator is H_A = P^T H P, where H is the Hessian of the data-set loss with respect to all
trainable parameters and P embeds the free coordinates (every parameter not named in the mask, and
the unpruned entries of the masked ones) into R^D. Probe vectors therefore live in the axial
subspace of dimension D^A: pruned coordinates add no spurious zero eigenvalues.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from fastimp.masks import check_mask

Batch = Tuple[torch.Tensor, torch.Tensor]

METHODS = ("auto", "forward-over-reverse", "double-backward")
BATCHNORM_MODES = ("eval", "train")


def _as_batches(data, batch_size: Optional[int]) -> List[Batch]:
    """``data`` = an (x, y) pair of tensors (split into ``batch_size`` chunks, default: one batch)
    or any iterable of (x, y) batches (a DataLoader, a list, ``run.train_data()``)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x has {x.shape[0]} examples but y has {y.shape[0]}")
        bs = batch_size or max(int(x.shape[0]), 1)
        return [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]
    try:
        batches = [(b[0], b[1]) for b in data]
    except TypeError:
        raise TypeError("data: expected an (x, y) pair of tensors or an iterable of (x, y) "
                        f"batches, got {type(data).__name__}") from None
    if batch_size is not None and batches:
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        batches = _as_batches((x, y), batch_size)
    return batches


def _random_subset(batches: List[Batch], n: int, generator: torch.Generator,
                   batch_size: Optional[int]) -> List[Batch]:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if not 0 < n <= x.shape[0]:
        raise ValueError(f"subset: expected an int in [1, {x.shape[0]}] (the data set's size), "
                         f"got {n}")
    idx = torch.randperm(x.shape[0], generator=generator)[:n].sort().values
    bs = batch_size or (batches[0][0].shape[0] if batches else n)
    return _as_batches((x[idx.to(x.device)], y[idx.to(y.device)]), bs)


class HVPOperator:
    """v ↦ H_A v for the train loss ``L(w) = Σ_b (n_b / N) loss_fn(model(x_b; w), y_b)`` over a
    fixed list of batches (``loss_fn`` returns the batch *mean*, so batches are weighted by their
    size n_b), plus ``weight_decay / 2 · ||w||²`` over every trainable parameter when
    ``weight_decay`` > 0 (default 0: the Hessian of the data loss alone, as PyHessian and the
    paper's Fig. 5 use), which adds ``weight_decay · v``.

    BatchNorm: ``batchnorm="eval"`` (default) uses the running statistics, so the loss is a fixed
    function of the weights — the network that is evaluated and pruned, independent of how the
    data are batched — and no buffer changes (PyHessian also calls ``model.eval()``).
    ``"train"`` uses batch statistics (without updating the running ones) and differentiates
    through them; the loss then depends on the batching. Dropout is always off.

    ``matvec(V)`` takes k probe vectors ``V`` [k, D_A] and returns ``H_A V^T`` as [k, D_A] with one
    pass over the data: ``method="forward-over-reverse"`` (``torch.func.jvp`` of
    ``torch.func.grad``, as curvlinops; vmapped over the k probes so the primal forward/backward
    is computed once for all of them) or ``"double-backward"`` (``autograd.grad`` of the gradient,
    ``is_grads_batched`` for k > 1). ``"auto"`` (default) takes double backward for a single
    probe (Lanczos; less functorch overhead, measured faster on the CPU) and forward-over-reverse
    for several (Hutchinson, lock-step SLQ).
    ``probes_per_pass`` caps k per pass (memory); larger k takes several passes.

    The data are read once at construction and kept (on ``device``) so every product sees the same
    examples (augmentation draws included); ``subset=n`` keeps a random subset of n examples
    (seeded by ``generator``/``seed``).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, data=None,
                 masks: Optional[Mapping[str, torch.Tensor]] = None, *,
                 weight_decay: float = 0.0, batchnorm: str = "eval",
                 method: str = "auto", subset: Optional[int] = None,
                 batch_size: Optional[int] = None, probes_per_pass: int = 16,
                 device=None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if loss_fn is None:
            loss_fn = F.cross_entropy
        if not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable loss_fn(output, target) -> mean loss")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm: expected one of {BATCHNORM_MODES}, got {batchnorm!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0
                and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay: expected a finite float >= 0, got {weight_decay!r}")
        if not (isinstance(probes_per_pass, int) and probes_per_pass >= 1):
            raise ValueError(f"probes_per_pass: expected an int >= 1, got {probes_per_pass!r}")
        if data is None:
            raise ValueError("data: expected an (x, y) pair or an iterable of (x, y) batches")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")

        self.loss_fn = loss_fn
        self.method = method
        self.batchnorm = batchnorm
        self.weight_decay = float(weight_decay)
        self.probes_per_pass = probes_per_pass
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no parameters with requires_grad=True")
        self.device = torch.device(device) if device is not None else named[0][1].device
        self.dtype = named[0][1].dtype

        if batchnorm == "train":
            # Batch statistics without touching the caller's running statistics.
            model = copy.deepcopy(model)
            torch.func.replace_all_batch_norm_modules_(model)
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        self.model = model
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.params = {n: p.detach().to(self.device) for n, p in named}
        self.buffers = {n: b.to(self.device) for n, b in model.named_buffers()}

        self.index: List[Optional[torch.Tensor]] = []  # flat indices of free coordinates
        masks = dict(masks) if masks is not None else {}
        unknown = sorted(set(masks) - set(self.params))
        if unknown:
            raise ValueError(f"masks: names {unknown[:5]} are not trainable parameters of model")
        for n, shape in zip(self.names, self.shapes):
            if n not in masks:
                self.index.append(None)
                continue
            m = check_mask(torch.as_tensor(masks[n]), f"masks[{n!r}]", shape)
            self.index.append(m.reshape(-1).nonzero().squeeze(1).to(self.device))
        self.sizes = [math.prod(s) if i is None else int(i.numel())
                      for s, i in zip(self.shapes, self.index)]
        self.D_A = int(sum(self.sizes))
        if self.D_A == 0:
            raise ValueError("masks: every coordinate is pruned (D_A = 0)")

        gen = torch.Generator().manual_seed(seed)
        batches = _as_batches(data, batch_size)
        if subset is not None:
            batches = _random_subset(batches, subset, gen, batch_size)
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in batches
                        if x.shape[0] > 0]
        self.num_examples = int(sum(x.shape[0] for x, _ in self.batches))
        if self.num_examples == 0:
            raise ValueError("data: is empty")
        self.passes = 0  # passes over the data so far (one per matvec chunk)

    # -- free coordinates <-> parameter tensors ---------------------------------------------
    def to_params(self, V: torch.Tensor) -> Dict[str, torch.Tensor]:
        """[k, D_A] -> {name: [k, *shape]} with zeros on pruned coordinates."""
        k = V.shape[0]
        out, off = {}, 0
        for n, shape, idx, size in zip(self.names, self.shapes, self.index, self.sizes):
            chunk = V[:, off:off + size]
            off += size
            if idx is None:
                out[n] = chunk.reshape(k, *shape)
            else:
                full = V.new_zeros(k, math.prod(shape))
                full[:, idx] = chunk
                out[n] = full.reshape(k, *shape)
        return out

    def from_params(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: [k, *shape]} -> [k, D_A] (the free coordinates)."""
        parts = []
        for n, idx in zip(self.names, self.index):
            t = tensors[n]
            t = t.reshape(t.shape[0], -1)
            parts.append(t if idx is None else t[:, idx])
        return torch.cat(parts, dim=1)

    def flat_params(self) -> torch.Tensor:
        """The current weights' free coordinates, [D_A]."""
        return self.from_params({n: p.unsqueeze(0) for n, p in self.params.items()})[0]

    # -- the product ----------------------------------------------------------------------------
    def _loss(self, params, x, y):
        out = functional_call(self.model, {**params, **self.buffers}, (x,))
        return self.loss_fn(out, y)

    def _batch_hvp(self, x, y, tangents: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        k = next(iter(tangents.values())).shape[0]
        method = self.method
        if method == "auto":
            method = "double-backward" if k == 1 else "forward-over-reverse"
        if method == "forward-over-reverse":
            g = grad(lambda p: self._loss(p, x, y))

            def one(t):
                return jvp(g, (self.params,), (t,))[1]
            with warnings.catch_warnings():
                # torch's first forward-mode call scripts its decompositions with the deprecated
                # torch.jit.script: a FutureWarning about torch's internals, not about fastimp
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                        category=FutureWarning)
                if k == 1:
                    return {n: h.unsqueeze(0) for n, h in one({n: t[0] for n, t in
                                                               tangents.items()}).items()}
                return vmap(one)(tangents)
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
            loss = self._loss(params, x, y)
            ps = [params[n] for n in self.names]
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            # gradient entries that do not depend on the weights contribute nothing
            pairs = [(g, tangents[n]) for g, n in zip(gs, self.names) if g.requires_grad]
            if not pairs:
                return {n: torch.zeros_like(t) for n, t in tangents.items()}
            outs, ts = [g for g, _ in pairs], [t for _, t in pairs]
            if k == 1:
                hv = [h.unsqueeze(0) for h in torch.autograd.grad(
                    outs, ps, [t[0] for t in ts], allow_unused=True, materialize_grads=True)]
            else:
                hv = torch.autograd.grad(outs, ps, grad_outputs=ts, is_grads_batched=True,
                                         allow_unused=True, materialize_grads=True)
        return {n: h.detach() for n, h in zip(self.names, hv)}

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H_A applied to each row of ``V`` ([k, D_A] or [D_A]); one data pass per
        ``probes_per_pass`` rows."""
        single = V.dim() == 1
        if single:
            V = V.unsqueeze(0)
        if V.dim() != 2 or V.shape[1] != self.D_A:
            raise ValueError(f"V: expected shape [k, {self.D_A}], got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        outs = [self._matvec(V[i:i + self.probes_per_pass])
                for i in range(0, V.shape[0], self.probes_per_pass)]
        out = torch.cat(outs) if outs else V.clone()
        return out[0] if single else out

    def _matvec(self, V: torch.Tensor, batches=None, decay: bool = True) -> torch.Tensor:
        """The data term over ``batches`` (default: all; each weighted n_b / N), plus the weight
        decay's ``weight_decay · V`` when ``decay``."""
        tangents = self.to_params(V)
        acc = torch.zeros_like(V)
        was_training = self.model.training
        if self.batchnorm == "eval":
            self.model.eval()
        try:
            for x, y in (self.batches if batches is None else batches):
                hv = self._batch_hvp(x, y, tangents)
                acc.add_(self.from_params(hv), alpha=x.shape[0] / self.num_examples)
        finally:
            self.model.train(was_training)
        self.passes += 1
        if self.weight_decay and decay:
            acc.add_(V, alpha=self.weight_decay)
        return acc

    def dense(self) -> torch.Tensor:
        """The full [D_A, D_A] matrix (D_A products; for tests and tiny models only)."""
        eye = torch.eye(self.D_A, device=self.device, dtype=self.dtype)
        return self.matvec(eye)
