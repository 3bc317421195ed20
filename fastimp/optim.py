r"""``MaskedSGD``: ``torch.optim.SGD`` that keeps pruned weights (and their momentum) at exactly 0.

After every step the result equals ``torch.optim.SGD.step()`` followed by ``p.mul_(m)`` and
``momentum_buffer.mul_(m)`` for every masked parameter, computed in one fused pass per device
and dtype (see :mod:`fastimp.ops.masked_sgd` for the formula and the backends).

``lr`` may be a one-element float tensor on the parameters' device (as ``torch.optim.SGD``
accepts): the ``cuda`` and ``triton`` backends read it on the device, so with the tensor tables
cached (same params, grads, buffers and masks as the step before) a step makes no host-to-device
copy and no sync and can be captured in a CUDA graph after one warm-up step. Under
``torch.compile`` the step is one custom op per param group (no graph break).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch.optim import Optimizer

from fastimp.masks import check_mask
from fastimp.ops.masked_sgd import DTYPES, Plan, call_op, masked_sgd_


def _lr(value: Any) -> float | torch.Tensor:
    """A group's lr as the op takes it: a tensor is passed through (read on the device)."""
    return value if isinstance(value, torch.Tensor) else float(value)


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None


class MaskedSGD(Optimizer):
    r"""SGD with momentum, dampening, weight decay, Nesterov and maximize, exactly as
    ``torch.optim.SGD`` (same arguments, param groups, closures, ``state_dict``, lr schedulers,
    ``torch.amp.GradScaler``), plus masks.

    Args:
        params: iterable of parameters or of param-group dicts (as for ``torch.optim.SGD``).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        masks: mapping ``Parameter -> mask`` of the parameter's shape and device, dtype bool,
            uint8 or floating with values in {0, 1} (e.g. ``fastimp.Masks.for_params(model)``);
            keys may also be parameter names when the optimizer was given ``named_parameters()``.
            After each step ``p = m ? p : 0`` and ``buf = m ? buf : 0``. Parameters without a
            mask are plain SGD.
        decoupled_weight_decay: Loshchilov & Hutter's decoupled decay (the paper's ImageNet
            runs): ``p <- (1 - lr * weight_decay) * p - lr * d`` where ``d`` is the momentum
            update computed from the gradient alone; coupled (the default, as torch) adds
            ``weight_decay * p`` to the gradient instead. (Composer's ``DecoupledSGDW`` scales
            the decay by ``lr / initial_lr`` rather than ``lr``: pass
            ``weight_decay = wd / initial_lr`` to reproduce it.)
        lr: a number, or a one-element float32/float64 tensor (read on the device by the
            ``cuda`` and ``triton`` backends; lr schedulers update it in place).
        backend: ``"auto"`` (the first available in the device's order) or ``"torch"``,
            ``"cpu"``, ``"cuda"``, ``"triton"`` (see ``fastimp.backends()``).
        foreach, fused: accepted and ignored (torch.optim.SGD's; every step here is fused).
        differentiable: only False.

    Masks live in the optimizer state (``state[p]["mask"]``, bool), so ``state_dict()`` /
    ``load_state_dict()`` round-trip them. ``set_masks`` does not touch the weights: the next
    step zeroes the masked ones (``fastimp.Masks.apply_`` zeroes them at once). Parameters whose
    grad is None are skipped entirely, as in torch (neither updated nor masked).
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, masks: Optional[Mapping] = None,
                 decoupled_weight_decay: bool = False, backend: str = "auto",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None,
                 differentiable: bool = False) -> None:
        _check_hparams(lr, momentum, dampening, weight_decay, nesterov)
        if differentiable:
            raise ValueError("differentiable: MaskedSGD steps are not differentiable; use "
                             "torch.optim.SGD(differentiable=True)")
        del foreach, fused  # accepted for drop-in compatibility: every step is one fused pass
        from fastimp._backend import BACKENDS
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        if masks is not None:
            self.set_masks(masks)

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "backend": self.backend}  # torch's keeps 3 keys only

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plans = {}
        g = self.param_groups[-1]
        _check_hparams(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"])
        for p in g["params"]:
            if p.dtype not in DTYPES:
                raise TypeError(f"params: expected float32, float64, bfloat16 or float16 "
                                f"parameters, got {p.dtype} (complex and integer parameters are "
                                "not supported)")

    # masks ------------------------------------------------------------------------------------
    def set_masks(self, masks: Optional[Mapping]) -> None:
        """Replace every mask: ``masks`` maps a parameter (or its name) to a 0/1 tensor of its
        shape and device; parameters left out (or ``masks=None``) become unmasked."""
        self._plans = {}
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = {id(p): p for p in params}
        names = {n: p for g in self.param_groups
                 for n, p in zip(g.get("param_names", ()), g["params"])}
        new: Dict[int, torch.Tensor] = {}
        for key, m in (masks or {}).items():
            if isinstance(key, str):
                if key not in names:
                    raise ValueError(f"masks: no parameter named {key!r} in this optimizer "
                                     "(name keys need params given as named_parameters(); else "
                                     "key by Parameter, e.g. Masks.for_params(model))")
                p = names[key]
            elif isinstance(key, torch.Tensor):
                if id(key) not in by_id:
                    raise ValueError(f"masks: a key (shape {tuple(key.shape)}) is not a parameter "
                                     "of this optimizer")
                p = key
            else:
                raise TypeError(f"masks: expected keys that are Parameters or names, got "
                                f"{type(key).__name__}")
            new[id(p)] = _check_mask(m, p)
        for p in params:
            st = self.state[p]
            if id(p) in new:
                st["mask"] = new[id(p)]
            else:
                st.pop("mask", None)
                if not st:
                    del self.state[p]

    @property
    def masks(self) -> Dict[torch.nn.Parameter, torch.Tensor]:
        """The current masks, ``Parameter -> bool tensor``."""
        return {p: self.state[p]["mask"] for g in self.param_groups for p in g["params"]
                if p in self.state and "mask" in self.state[p]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._plans = {}
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            if "mask" in st:
                st["mask"] = _check_mask(st["mask"], p)

    # the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step (the formula in :mod:`fastimp.ops.masked_sgd`); returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        for gi, group in enumerate(self.param_groups):
            momentum = _to_float(group["momentum"], "momentum")
            kw = dict(lr=_lr(group["lr"]), momentum=momentum,
                      dampening=_to_float(group["dampening"], "dampening"),
                      weight_decay=_to_float(group["weight_decay"], "weight_decay"),
                      nesterov=bool(group["nesterov"]),
                      maximize=bool(group["maximize"]),
                      decoupled=bool(group["decoupled_weight_decay"]))
            if not compiling:
                cached = self.__dict__.setdefault("_plans", {}).get(gi)
                if cached is not None:
                    grads = cached.grads_if_valid(self, group["params"], momentum != 0)
                    if grads is not None:
                        cached.plan.run(grads, **kw)
                        continue
            params, grads, bufs, masks = self._group_lists(group, momentum != 0)
            if not params:
                continue
            if compiling:
                self._step_traced(params, grads, bufs, masks, kw)
                continue
            new_bufs = masked_sgd_(params, grads, bufs, masks, backend=self.backend, **kw)
            if momentum != 0:
                for p, b, old in zip(params, new_bufs, bufs):
                    if old is None:
                        self.state[p]["momentum_buffer"] = b
            # the next step over the same tensors reuses the groups and device tables
            self._plans[gi] = _CachedStep(self, group["params"], params, grads, new_bufs,
                                          masks, momentum)
        return loss

    def _group_lists(self, group, has_mom: bool):
        """Params with a grad, their grads, buffers (None: new) and masks."""
        params, grads, bufs, masks = [], [], [], []
        state = self.state
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("MaskedSGD does not support sparse gradients (use dense "
                                   "grads, e.g. nn.Embedding(sparse=False))")
            if g.dtype is not p.dtype:
                raise ValueError(f"grad: expected the param's dtype {p.dtype}, got {g.dtype}")
            params.append(p)
            grads.append(g)
            st = state.get(p)
            if st:
                bufs.append(st.get("momentum_buffer") if has_mom else None)
                masks.append(st.get("mask"))
            else:
                bufs.append(None)
                masks.append(None)
        return params, grads, bufs, masks

    def _step_traced(self, params, grads, bufs, masks, kw) -> None:
        """The step as torch.compile traces it: buffers created with torch ops, then one call of
        the custom op ``fastimp::masked_sgd_``."""
        init = [False] * len(params)
        if kw["momentum"] != 0:
            for i, p in enumerate(params):
                if bufs[i] is None:
                    bufs[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                    self.state[p]["momentum_buffer"] = bufs[i]
                    init[i] = True
        call_op(params, grads, bufs, masks, init, backend=self.backend, **kw)


_DTYPE = operator.attrgetter("dtype")
_STRIDE = operator.methodcaller("stride")
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


class _CachedStep:
    """A param group's prepared step (:class:`fastimp.ops.masked_sgd.Plan`) and what it was
    prepared for: the addresses of every param and grad, the grads' dtypes and strides (torch
    checks a new grad's shape and device, not its strides), the state objects, buffers and
    masks. A step first checks them all (about 0.5 us per parameter), then runs the plan; the
    op's argument checks ran when the plan was made and hold while all these do."""

    def __init__(self, opt, group_params, params, grads, bufs, masks, momentum):
        self.plan = Plan(params, grads, bufs, masks, [False] * len(params), opt.backend, momentum)
        self.backend = opt.backend
        self.has_mom = momentum != 0
        self.state, self.nstate = opt.state, len(opt.state)
        self.pptrs = tuple([p.data_ptr() for p in group_params])
        self.gptrs = tuple([0 if p.grad is None else p.grad.data_ptr() for p in group_params])
        self.params = params
        self.dtypes = [g.dtype for g in grads]
        # the grads' layouts: all contiguous (the usual case, checked cheaply), else the strides
        contiguous = all(map(_IS_CONTIGUOUS, grads))
        self.gstrides = None if contiguous else list(map(_STRIDE, grads))
        self.sts = [opt.state.get(p) for p in params]
        self.bufs = list(bufs)
        self.masks = list(masks)

    def grads_if_valid(self, opt, group_params, has_mom: bool) -> Optional[List[torch.Tensor]]:
        """The grads of the params the plan covers, or None when anything changed."""
        state = opt.state
        if (state is not self.state or len(state) != self.nstate or has_mom != self.has_mom
                or opt.backend != self.backend):
            return None
        try:
            all_grads = [p.grad for p in group_params]
            if tuple([0 if g is None else g.data_ptr() for g in all_grads]) != self.gptrs:
                return None
        except RuntimeError:  # e.g. a sparse grad: the full path says what is wrong
            return None
        if tuple([p.data_ptr() for p in group_params]) != self.pptrs:
            return None
        sts = self.sts
        if not all(map(operator.is_, map(state.get, self.params), sts)):
            return None
        if has_mom and not all(map(operator.is_, [st.get("momentum_buffer") for st in sts],
                                   self.bufs)):
            return None
        if not all(map(operator.is_, [st.get("mask") if st else None for st in sts],
                       self.masks)):
            return None
        grads = [g for g in all_grads if g is not None]
        if not all(map(operator.is_, map(_DTYPE, grads), self.dtypes)):
            return None
        if not (all(map(_IS_CONTIGUOUS, grads)) if self.gstrides is None
                else list(map(_STRIDE, grads)) == self.gstrides):
            return None
        return grads


def _check_hparams(lr, momentum, dampening, weight_decay, nesterov) -> None:
    lr_f = _to_float(lr, "lr")
    if not lr_f >= 0.0:
        raise ValueError(f"lr: expected >= 0, got {lr_f}")
    if not _to_float(momentum, "momentum") >= 0.0:
        raise ValueError(f"momentum: expected >= 0, got {momentum}")
    _to_float(dampening, "dampening")
    if not _to_float(weight_decay, "weight_decay") >= 0.0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    if nesterov and (_to_float(momentum, "momentum") <= 0 or _to_float(dampening, "dampening") != 0):
        raise ValueError("nesterov: Nesterov momentum requires a momentum and zero dampening")


def _check_mask(m: Any, p: torch.Tensor) -> torch.Tensor:
    """The mask as a bool tensor laid out like ``p`` (1 byte/param), after
    :func:`fastimp.masks.check_mask` and a device check."""
    if isinstance(m, torch.Tensor) and m.device != p.device:
        raise ValueError(f"masks: expected a mask on the parameter's device {p.device}, got "
                         f"{m.device}")
    m = check_mask(m, "masks: a mask", p.shape)
    if m.stride() == p.stride():
        return m
    out = torch.empty_like(p, dtype=torch.bool)
    out.copy_(m)
    return out
