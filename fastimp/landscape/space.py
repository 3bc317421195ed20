"""The flat layout the landscape works in: :class:`fastimp.WeightSpace`'s coordinates (every
parameter in ``named_parameters()`` order, the paper's w in R^D, with its prunable coordinates)
followed by every float buffer (BatchNorm running statistics), which move with the weights."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from fastimp.weight_space import WeightSpace


class StateLayout:
    """Where each float parameter and buffer of ``model`` lives in a flat vector of length ``D``.

    ``D_params`` coordinates of parameters come first (``.space``, a :class:`WeightSpace`: the
    same order, prunable coordinates and masks), then ``D - D_params`` of buffers.
    ``prunable`` is a bool tensor [D] (buffers are never prunable).
    """

    def __init__(self, model: nn.Module, include=None):
        self.space = WeightSpace(model, include)
        self.entries: List[Tuple[str, torch.Size, int, int, bool]] = []  # name, shape, off, n, is_param
        for name in self.space.names:
            a, b = self.space.slices[name]
            self.entries.append((name, self.space.shapes[name], a, b - a, True))
        self.D_params = off = self.space.D
        for name, b in model.named_buffers():
            if b.is_floating_point():
                self.entries.append((name, b.shape, off, b.numel(), False))
                off += b.numel()
        self.D = off
        self.prunable = torch.cat([self.space.prunable_coords.cpu(),
                                   torch.zeros(self.D - self.D_params, dtype=torch.bool)])
        self.param_names = list(self.space.names)
        self.buffer_names = [e[0] for e in self.entries if not e[4]]
        self._reference = model

    def mask_vector(self, masks: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """bool [D] (CPU): False on the pruned coordinates of ``masks``
        (:meth:`WeightSpace.mask_vector`; buffers are always free)."""
        return torch.cat([self.space.mask_vector(masks).cpu(),
                          torch.ones(self.D - self.D_params, dtype=torch.bool)])

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
            w = self.space.flatten(src).to(dtype)
            tail = [src[n].detach().reshape(-1).to(dtype=dtype, device=w.device)
                    for n in self.buffer_names]
            return torch.cat([w] + tail) if tail else w
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
