"""The flat layout the landscape works in: every float parameter (in ``named_parameters()`` order,
the same order as :class:`fastimp.WeightSpace`'s ``flat()``) followed by every float buffer
(BatchNorm running statistics), with the prunable coordinates marked."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_names(model: nn.Module, include=None) -> List[str]:
    """Names of the prunable parameters: :func:`fastimp.prunable` when it is there, else the
    weights of Conv1d/2d/3d and Linear layers (paper, Appendix B "Pruning")."""
    try:
        from fastimp.masks import prunable
    except ImportError:
        prunable = None
    if prunable is not None:
        return list(prunable(model, include))
    if include is not None:
        if callable(include):
            modules = dict(model.named_modules())
            return [n for n, p in model.named_parameters()
                    if include(n, modules[n.rpartition(".")[0]], p)]
        return list(include)
    return [f"{mn}.weight" if mn else "weight" for mn, m in model.named_modules()
            if isinstance(m, _PRUNABLE_TYPES) and getattr(m, "weight", None) is not None]


class StateLayout:
    """Where each float parameter and buffer of ``model`` lives in a flat vector of length ``D``.

    ``D_params`` coordinates of parameters come first, then ``D - D_params`` of buffers.
    ``prunable`` is a bool tensor [D] (buffers are never prunable).
    """

    def __init__(self, model: nn.Module, include=None):
        self.entries: List[Tuple[str, torch.Size, int, int, bool]] = []  # name, shape, off, n, is_param
        off = 0
        for name, p in model.named_parameters():
            self.entries.append((name, p.shape, off, p.numel(), True))
            off += p.numel()
        self.D_params = off
        for name, b in model.named_buffers():
            if b.is_floating_point():
                self.entries.append((name, b.shape, off, b.numel(), False))
                off += b.numel()
        self.D = off
        names = set(prunable_names(model, include))
        self.prunable = torch.zeros(self.D, dtype=torch.bool)
        for name, _, o, n, is_param in self.entries:
            if is_param and name in names:
                self.prunable[o:o + n] = True
        self.param_names = [e[0] for e in self.entries if e[4]]
        self.buffer_names = [e[0] for e in self.entries if not e[4]]
        self._reference = model

    def flatten(self, src, dtype=torch.float32, buffers_from=None) -> torch.Tensor:
        """A flat vector [D] from a model, a state dict, or a vector of length ``D`` or
        ``D_params`` (buffers then come from ``buffers_from``, default the layout's model)."""
        if isinstance(src, nn.Module):
            src = dict(src.state_dict())
        if isinstance(src, torch.Tensor):
            if src.dim() != 1 or src.numel() not in (self.D, self.D_params):
                raise ValueError(f"expected a flat vector of length {self.D} (parameters and "
                                 f"buffers) or {self.D_params} (parameters), got "
                                 f"{tuple(src.shape)}")
            if src.numel() == self.D:
                return src.detach().to(dtype)
            bsrc = buffers_from if buffers_from is not None else self._reference
            if isinstance(bsrc, nn.Module):
                bsrc = dict(bsrc.state_dict())
            tail = [bsrc[n].detach().reshape(-1).to(dtype=dtype, device=src.device)
                    for n in self.buffer_names]
            return torch.cat([src.detach().to(dtype)] + tail)
        if isinstance(src, Mapping):
            missing = [e[0] for e in self.entries if e[0] not in src]
            if missing:
                raise ValueError(f"state dict is missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
            parts = [src[e[0]].detach().reshape(-1).to(dtype) for e in self.entries]
            dev = parts[0].device if parts else "cpu"
            return torch.cat([t.to(dev) for t in parts]) if parts else torch.zeros(0, dtype=dtype)
        raise TypeError(f"expected a model, a state dict or a flat tensor, got {type(src).__name__}")

    def views(self, W: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Parameter and buffer views [k, *shape] of a chunk of flat points W [k, D]."""
        k = W.shape[0]
        params, buffers = {}, {}
        for name, shape, o, n, is_param in self.entries:
            (params if is_param else buffers)[name] = W[:, o:o + n].view(k, *shape)
        return params, buffers

    def state_dict(self, w: torch.Tensor, like: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        """A state dict of one flat point (non-float buffers copied from ``like`` or the model)."""
        like = dict(like if like is not None else self._reference.state_dict())
        out = {k: v.clone() for k, v in like.items()}
        for name, shape, o, n, _ in self.entries:
            out[name] = w[o:o + n].view(shape).clone().to(like[name].dtype)
        return out
