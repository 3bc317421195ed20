"""Packing N runs of one architecture into one wide module (HFTA, Wang et al., MLSys'21).

Run ``r``'s input ``[B, C, ...]`` becomes channels ``r*C .. (r+1)*C - 1`` of the packed input
``[B, N*C, ...]``; every layer keeps the runs apart along its channel axis:

- ``Conv{1,2,3}d(C_in, C_out, groups=g)`` -> ``groups = N*g`` (each run convolves its own channels),
- ``BatchNorm{1,2,3}d(C)`` -> ``BatchNorm(N*C)``: statistics per channel, hence per run,
- ``GroupNorm(G, C)`` -> ``GroupNorm(N*G, N*C)``,
- ``Linear(in, out)`` -> :class:`PackedLinear`, one batched matmul ``[N, B, in] @ [N, in, out]``,
- modules without parameters (ReLU, pooling, containers, residual additions) are kept as they
  are: they act per channel or elementwise.

Every packed parameter and buffer is the N runs' tensors concatenated along dim 0 (run ``r`` =
``t.unflatten(0, (N, -1))[r]``), so masks and momentum buffers are packed the same way and the
masked SGD step of all N runs is one fused launch per tensor list. A module with parameters of
its own and no packer (``register_packer``) cannot be packed (:class:`CannotPack`); forwards that
mix channels across runs are caught by :func:`verify` (a probe forward against the N models).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CannotPack", "PackedLinear", "register_packer", "pack", "unpack_", "run_slice",
           "pack_tensors", "verify", "pad_channels", "shell"]


class CannotPack(ValueError):
    """The models cannot be packed; the message says why (they are trained one after another)."""


_PACKERS: Dict[type, Callable[[List[nn.Module], int], nn.Module]] = {}


def register_packer(*types: type) -> Callable:
    """Decorator: ``@register_packer(MyLayer)`` on ``fn(modules, n) -> nn.Module``, the packed
    form of N modules of that exact type (its tensors concatenated along dim 0, same names)."""
    def deco(fn):
        for t in types:
            _PACKERS[t] = fn
        return fn
    return deco


def pack_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """N runs' tensors of one parameter -> the packed tensor (concatenated along dim 0)."""
    return torch.cat([t.detach() for t in tensors], 0)


def run_slice(packed: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """Run ``r``'s view of a packed tensor of ``n`` runs."""
    return packed.unflatten(0, (n, -1))[r]


def shell(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with empty parameter, buffer and child tables."""
    new = copy.copy(module)
    new._parameters = OrderedDict()
    new._buffers = OrderedDict()
    new._non_persistent_buffers_set = set()
    new._modules = OrderedDict()
    return new


def _same(mods: Sequence[nn.Module], names: Sequence[str]) -> None:
    for name in names:
        values = {repr(getattr(m, name)) for m in mods}
        if len(values) > 1:
            raise CannotPack(f"{type(mods[0]).__name__}.{name} differs between the runs "
                             f"({sorted(values)})")


def _param(mods, name):
    ts = [getattr(m, name) for m in mods]
    if ts[0] is None:
        return None
    return nn.Parameter(pack_tensors(ts), requires_grad=ts[0].requires_grad)


# ------------------------------------------------------------------------------------- packers
@register_packer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _pack_conv(mods, n):
    _same(mods, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"))
    new = shell(mods[0])
    new.in_channels *= n
    new.out_channels *= n
    new.groups *= n
    new.register_parameter("weight", _param(mods, "weight"))
    new.register_parameter("bias", _param(mods, "bias"))
    return new


class PackedLinear(nn.Module):
    """N ``nn.Linear(in, out)`` on ``[..., N*in]`` -> ``[..., N*out]``: ``weight`` [N*out, in],
    ``bias`` [N*out]; ``y[..., r] = x[..., r] @ W_r^T + b_r`` as one ``baddbmm``."""

    def __init__(self, n: int, in_features: int, out_features: int, weight: torch.Tensor,
                 bias=None):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, i, o = self.n, self.in_features, self.out_features
        lead = x.shape[:-1]
        xs = x.reshape(-1, n, i).transpose(0, 1)                    # [N, M, in]
        w = self.weight.view(n, o, i).transpose(1, 2)               # [N, in, out]
        if self.bias is None:
            y = torch.bmm(xs, w)
        else:
            y = torch.baddbmm(self.bias.view(n, 1, o), xs, w)
        return y.transpose(0, 1).reshape(*lead, n * o)

    def extra_repr(self) -> str:
        return (f"runs={self.n}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


@register_packer(nn.Linear)
def _pack_linear(mods, n):
    _same(mods, ("in_features", "out_features"))
    m0 = mods[0]
    weight = _param(mods, "weight")
    bias = _param(mods, "bias")
    return PackedLinear(n, m0.in_features, m0.out_features, weight.data,
                        None if bias is None else bias.data)


@register_packer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _pack_batchnorm(mods, n):
    _same(mods, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
    new = shell(mods[0])
    new.num_features *= n
    new.register_parameter("weight", _param(mods, "weight"))
    new.register_parameter("bias", _param(mods, "bias"))
    for name in ("running_mean", "running_var"):
        ts = [getattr(m, name) for m in mods]
        new.register_buffer(name, None if ts[0] is None else pack_tensors(ts))
    nbt = [m.num_batches_tracked for m in mods]
    if nbt[0] is None:
        new.register_buffer("num_batches_tracked", None)
    else:
        counts = {int(t) for t in nbt}
        if mods[0].momentum is None and len(counts) > 1:
            raise CannotPack("BatchNorm with momentum=None (a cumulative average) and runs at "
                             f"different batch counts {sorted(counts)}")
        # the count the runs share, else a count from 0 that unpack_ adds to each run's
        start = counts.pop() if len(counts) == 1 else 0
        new.register_buffer("num_batches_tracked", torch.tensor(start, dtype=torch.long,
                                                                device=nbt[0].device))
        new._packed_nbt_start = start
    return new


@register_packer(nn.GroupNorm)
def _pack_groupnorm(mods, n):
    _same(mods, ("num_groups", "num_channels", "eps", "affine"))
    new = shell(mods[0])
    new.num_groups *= n
    new.num_channels *= n
    new.register_parameter("weight", _param(mods, "weight"))
    new.register_parameter("bias", _param(mods, "bias"))
    return new


# ---------------------------------------------------------------------------------- pack/unpack
def _signature(model: nn.Module) -> Tuple:
    return (tuple((name, type(m)) for name, m in model.named_modules()),
            tuple((name, tuple(t.shape), t.dtype) for name, t in model.named_parameters()),
            tuple((name, tuple(t.shape), t.dtype) for name, t in model.named_buffers()))


def pack(models: Sequence[nn.Module]) -> nn.Module:
    """One module computing the N models side by side on channel-packed inputs (see the module
    docstring); its state-dict names are the models'. Raises :class:`CannotPack` with the
    reason when the models differ in architecture or hold a layer without a packed form."""
    models = list(models)
    if not models:
        raise ValueError("pack: expected at least one model")
    sig = _signature(models[0])
    for m in models[1:]:
        if _signature(m) != sig:
            raise CannotPack("the models differ in architecture (module types, parameter or "
                             "buffer shapes)")
    return _pack(models, len(models), "")


def _pack(mods: List[nn.Module], n: int, path: str) -> nn.Module:
    m0 = mods[0]
    fn = _PACKERS.get(type(m0))
    where = f"{path or 'the model'} ({type(m0).__name__})"
    if fn is not None:
        try:
            return fn(mods, n)
        except CannotPack as exc:
            raise CannotPack(f"{where}: {exc}") from None
    own = [k for k, v in m0._parameters.items() if v is not None] + \
          [k for k, v in m0._buffers.items() if v is not None]
    if own:
        raise CannotPack(f"{where} holds {', '.join(own)} and has no packed form "
                         "(fastimp.batched.register_packer adds one)")
    new = shell(m0)
    for name, child in m0._modules.items():
        if child is None:
            new._modules[name] = None
        else:
            new._modules[name] = _pack([m._modules[name] for m in mods], n,
                                       f"{path}.{name}" if path else name)
    return new


@torch.no_grad()
def unpack_(packed: nn.Module, models: Sequence[nn.Module]) -> None:
    """Copy every run's parameters and buffers out of ``packed`` into ``models`` (in place). A
    BatchNorm's ``num_batches_tracked`` grows by the batches the packed module counted since it
    was packed or last unpacked."""
    n = len(models)
    mods = [dict(m.named_modules()) for m in models]
    for mname, pm in packed.named_modules():
        for kind in ("_parameters", "_buffers"):
            for tname, t in getattr(pm, kind).items():
                if t is None:
                    continue
                targets = [getattr(mods[r][mname], tname) for r in range(n)]
                if t.dim() == 0:  # num_batches_tracked
                    delta = int(t) - pm._packed_nbt_start
                    for target in targets:
                        target.add_(delta)
                    pm._packed_nbt_start = int(t)
                    continue
                parts = t.unflatten(0, (n, -1))
                for r in range(n):
                    targets[r].copy_(parts[r])


@torch.no_grad()
def verify(packed: nn.Module, models: Sequence[nn.Module], x: torch.Tensor,
           rtol: float = 1e-3) -> None:
    """Raise :class:`CannotPack` unless ``packed(x packed)`` equals the N models' outputs on
    ``x`` [b, N, ...] (eval mode, no state changes): catches forwards that mix runs (a reshape
    or a pad across channels)."""
    n = len(models)
    b = x.shape[0]
    was = [m.training for m in models], packed.training
    try:
        for m in models:
            m.eval()
        packed.eval()
        want = torch.stack([m(x[:, r]) for r, m in enumerate(models)], 1)
        got = packed(x.reshape(b, n * x.shape[2], *x.shape[3:]))
    except Exception as exc:  # noqa: BLE001 - any failure of the packed forward means "cannot"
        raise CannotPack(f"the packed forward fails ({type(exc).__name__}: {exc})") from None
    finally:
        for m, t in zip(models, was[0]):
            m.train(t)
        packed.train(was[1])
    if got.shape[0] != b or got.numel() != want.numel():
        raise CannotPack(f"the packed forward gives shape {tuple(got.shape)}, expected "
                         f"{(b, n * want.shape[2], *want.shape[3:])}")
    got = got.reshape(want.shape)
    scale = float(want.abs().max()) + 1e-6
    err = float((got - want).abs().max())
    if not err <= rtol * scale:
        raise CannotPack(f"the packed forward differs from the runs' own (max |diff| {err:.3g} "
                         f"for outputs up to {scale:.3g}): some layer mixes channels across runs")


def pad_channels(x: torch.Tensor, n: int, lo: int, hi: int) -> torch.Tensor:
    """Zero-pad every run's channels of a packed ``[B, N*C, ...]`` by ``lo`` / ``hi``."""
    b = x.shape[0]
    parts = x.reshape(b, n, x.shape[1] // n, *x.shape[2:])
    pad = [0, 0] * (x.dim() - 2) + [lo, hi]
    return F.pad(parts, pad).reshape(b, -1, *x.shape[2:])
