"""The paper's weight space w ∈ R^D: a model's parameters as one flat vector.

Coordinates follow ``named_parameters()`` order, each tensor row-major. The prunable coordinates
(``prunable(model, include)``) are known, so a mask m ∈ {0,1} on them extends to R^D (non-prunable
coordinates are always free): the projection is m ⊙ w, the axial subspace of m is the span of the
free coordinates. Buffers (BatchNorm statistics) form a separate flat vector.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fastimp.masks import Include, check_mask, prunable


class WeightSpace:
    """Flat view of ``model``'s parameters (``.D`` coordinates) and, separately, its buffers."""

    def __init__(self, model: nn.Module, include: Include = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"WeightSpace: argument 'model': expected a torch.nn.Module, got "
                            f"{type(model).__name__}")
        self.model = model
        named = list(model.named_parameters())
        self.names: List[str] = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.shapes: Dict[str, torch.Size] = {n: p.shape for n, p in named}
        self.slices: Dict[str, Tuple[int, int]] = {}
        off = 0
        for n, p in named:
            self.slices[n] = (off, off + p.numel())
            off += p.numel()
        self.D: int = off
        self.prunable_names: List[str] = list(prunable(model, include))
        coords = torch.zeros(self.D, dtype=torch.bool)
        for n in self.prunable_names:
            a, b = self.slices[n]
            coords[a:b] = True
        self._prunable_coords = coords
        bnamed = list(model.named_buffers())
        self.buffer_names: List[str] = [n for n, _ in bnamed]
        self._buffers = [b for _, b in bnamed]
        self.buffer_slices: Dict[str, Tuple[int, int]] = {}
        off = 0
        for n, b in bnamed:
            self.buffer_slices[n] = (off, off + b.numel())
            off += b.numel()
        self.buffer_D: int = off

    # --- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self._params:
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def prunable_coords(self) -> torch.Tensor:
        """bool [D]: True on the prunable coordinates."""
        return self._prunable_coords.to(self.device)

    def _check_vec(self, w: torch.Tensor, arg: str) -> torch.Tensor:
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"WeightSpace: argument '{arg}': expected a torch.Tensor, got "
                            f"{type(w).__name__}")
        if w.shape[-1:] != (self.D,):
            raise ValueError(f"WeightSpace: argument '{arg}': expected a vector of length "
                             f"D={self.D}, got shape {tuple(w.shape)}")
        return w

    # --- parameters <-> flat ------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """The current parameters as one vector [D] (a copy)."""
        if not self._params:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    @torch.no_grad()
    def set_flat_(self, w: torch.Tensor) -> nn.Module:
        """Copy ``w`` [D] into the model's parameters in place; returns the model."""
        self._check_vec(w, "w")
        if w.dim() != 1:
            raise ValueError(f"WeightSpace.set_flat_: argument 'w': expected shape [D], got "
                             f"{tuple(w.shape)}")
        for n, p in zip(self.names, self._params):
            a, b = self.slices[n]
            p.copy_(w[a:b].view(p.shape))
        return self.model

    def unflatten(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{name: view of w shaped like the parameter}`` (``w`` [..., D] gives [..., *shape])."""
        self._check_vec(w, "w")
        lead = w.shape[:-1]
        return {n: w[..., a:b].reshape(*lead, *self.shapes[n]) for n, (a, b) in self.slices.items()}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The vector [D] of a state dict or ``{name: tensor}`` (extra keys such as buffers are
        ignored; every parameter name must be present)."""
        if isinstance(tensors, nn.Module):
            tensors = dict(tensors.named_parameters())
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"WeightSpace.flatten: argument 'tensors': missing parameters "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}")
        parts = []
        for n in self.names:
            t = tensors[n]
            if t.shape != self.shapes[n]:
                raise ValueError(f"WeightSpace.flatten: {n!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(self.shapes[n])}")
            parts.append(t.detach().reshape(-1))
        if not parts:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat(parts)

    # --- masks --------------------------------------------------------------------------------
    def mask_vector(self, masks: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """bool [D]: True where a coordinate is free (every non-prunable coordinate and the
        unpruned prunable ones). ``masks=None`` means nothing pruned."""
        v = torch.ones(self.D, dtype=torch.bool, device=self.device)
        if masks is None:
            return v
        for n, m in masks.items():
            if n not in self.slices:
                raise ValueError(f"WeightSpace.mask_vector: argument 'masks': the model has no "
                                 f"parameter named {n!r}")
            m = check_mask(m, f"WeightSpace.mask_vector: mask {n!r}", self.shapes[n])
            a, b = self.slices[n]
            v[a:b] = m.reshape(-1).to(device=v.device)
        return v

    def project(self, w: torch.Tensor, masks: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """m ⊙ w: the pruning projection onto the axial subspace of ``masks``."""
        self._check_vec(w, "w")
        return w * self.mask_vector(masks).to(w.device)

    # --- geometry -----------------------------------------------------------------------------
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """R = ‖a − b‖₂ (accumulated in float64)."""
        self._check_vec(a, "a")
        self._check_vec(b, "b")
        return float(torch.linalg.vector_norm(a.double() - b.to(a.device).double()))

    def interpolate(self, a: torch.Tensor, b: torch.Tensor,
                    t: Union[float, torch.Tensor]) -> torch.Tensor:
        """(1 − t)·a + t·b; a 1-D tensor ``t`` of K values gives [K, D]."""
        self._check_vec(a, "a")
        self._check_vec(b, "b")
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            t = t.to(a.device, a.dtype)[:, None]
            return a[None] + t * (b - a)[None]
        return torch.lerp(a, b.to(a.device), float(t) if not isinstance(t, torch.Tensor) else t)

    def random_direction(self, norm: float = 1.0,
                         masks: Optional[Mapping[str, torch.Tensor]] = None,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A Gaussian direction of length ``norm`` lying in the axial subspace of ``masks``
        (zero on pruned coordinates), [D] on the parameters' device and dtype."""
        if not (float(norm) >= 0.0) or norm == float("inf"):
            raise ValueError(f"WeightSpace.random_direction: argument 'norm': expected a finite "
                             f"number >= 0, got {norm}")
        gdev = generator.device if generator is not None else self.device
        u = torch.randn(self.D, generator=generator, device=gdev, dtype=torch.float64)
        u = u.to(self.device) * self.mask_vector(masks)
        nrm = torch.linalg.vector_norm(u)
        if float(nrm) == 0.0:
            raise ValueError("WeightSpace.random_direction: the mask leaves no free coordinate")
        return (u * (float(norm) / nrm)).to(self.dtype)

    # --- buffers ------------------------------------------------------------------------------
    def buffers_flat(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """All buffers as one vector (cast to ``dtype``, default the parameters' dtype)."""
        dtype = dtype or self.dtype
        if not self._buffers:
            return torch.zeros(0, dtype=dtype, device=self.device)
        return torch.cat([b.detach().reshape(-1).to(dtype) for b in self._buffers])

    @torch.no_grad()
    def set_buffers_flat_(self, b: torch.Tensor) -> nn.Module:
        """Copy ``b`` into the buffers in place (integer buffers are rounded); returns the model."""
        if not isinstance(b, torch.Tensor) or b.shape != (self.buffer_D,):
            raise ValueError(f"WeightSpace.set_buffers_flat_: argument 'b': expected shape "
                             f"[{self.buffer_D}], got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b)}")
        for n, buf in zip(self.buffer_names, self._buffers):
            x, y = self.buffer_slices[n]
            part = b[x:y].view(buf.shape)
            if not buf.is_floating_point():
                part = part.round()
            buf.copy_(part)
        return self.model
