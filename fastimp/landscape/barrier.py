"""Error barriers along linear paths (Definition 2.1; Appendix B "Error Connectivity of IMP
Solutions"): a single pair, the piecewise linear path through a run's solutions (Fig. 2 left and
middle) and the matrix of barriers between every pair of levels (Fig. 2 right)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from fastimp.landscape.evaluate import evaluate
from fastimp.landscape.space import StateLayout

DEFAULT_BETAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1 (Appendix B)


@dataclass
class BarrierCurve:
    """Error and loss along ``(1 - beta) * a + beta * b``; barrier quantities over beta in [0, 1]."""
    betas: torch.Tensor   # [K], sorted
    error: torch.Tensor   # [K]
    loss: torch.Tensor    # [K]

    def _inside(self):
        m = (self.betas >= 0) & (self.betas <= 1)
        return self.betas[m].double(), self.error[m].double(), self.loss[m].double()

    def _ends(self, values):
        b = self.betas.double()
        i0 = torch.nonzero(b == 0)
        i1 = torch.nonzero(b == 1)
        if not len(i0) or not len(i1):
            raise ValueError("betas: the barrier needs both end points, beta = 0 and beta = 1")
        return values[i0[0, 0]].double(), values[i1[0, 0]].double()

    def _barrier(self, values_all, inside_values) -> float:
        e0, e1 = self._ends(values_all)
        b, _, _ = self._inside()
        return float((inside_values - ((1 - b) * e0 + b * e1)).max())

    @property
    def barrier(self) -> float:
        """max_beta E(beta) - ((1 - beta) E(0) + beta E(1)): the smallest eps of Definition 2.1."""
        return self._barrier(self.error, self._inside()[1])

    @property
    def loss_barrier(self) -> float:
        return self._barrier(self.loss, self._inside()[2])

    @property
    def max_error(self) -> float:
        """max_beta E(beta) over beta in [0, 1] (the quantity of Fig. 2's heatmap)."""
        return float(self._inside()[1].max())

    @property
    def midpoint_error(self) -> float:
        """E(beta = 1/2) (Fig. 4), linearly interpolated when 0.5 is not among the betas."""
        b, e, _ = self._inside()
        return float(np.interp(0.5, b.numpy(), e.numpy()))

    def to_dict(self) -> Dict:
        return {"betas": self.betas.tolist(), "error": self.error.tolist(), "loss": self.loss.tolist(),
                "barrier": self.barrier, "loss_barrier": self.loss_barrier,
                "max_error": self.max_error, "midpoint_error": self.midpoint_error}


def _betas(betas) -> torch.Tensor:
    b = torch.as_tensor(DEFAULT_BETAS if betas is None else betas, dtype=torch.float64).reshape(-1)
    if b.numel() == 0 or not torch.isfinite(b).all():
        raise ValueError("betas: expected a non-empty sequence of finite numbers")
    return torch.unique(torch.cat([b, torch.tensor([0.0, 1.0], dtype=torch.float64)]))  # sorted


def error_barrier(model: nn.Module, a, b, data, betas: Optional[Sequence[float]] = None,
                  **kw) -> BarrierCurve:
    """Error and loss along the line from ``a`` to ``b`` (state dicts, models or flat vectors) at
    ``betas`` (default 0, 0.1, ..., 1; 0 and 1 always added; values outside [0, 1] extrapolate the
    prunable parameters only, Appendix B). ``kw`` goes to :func:`evaluate` (bn, train_data, ...)."""
    layout = StateLayout(model, kw.get("include"))
    wa, wb = layout.flatten(a), layout.flatten(b)
    bs = _betas(betas)
    ev = evaluate(model, wa, (wb.to(wa.device) - wa)[None], bs.float()[:, None], data,
                  clip=([0.0], [1.0]), **kw)
    return BarrierCurve(bs, ev.error, ev.loss)


def _flat_points(model, points, include) -> Tuple[StateLayout, List[torch.Tensor]]:
    layout = StateLayout(model, include)
    flat = [layout.flatten(p) for p in points]
    return layout, [f.to(flat[0].device) for f in flat]


def _pairs_curves(model, points, pairs, betas, data, **kw) -> Dict[Tuple[int, int], BarrierCurve]:
    """Curves between ``points[i]`` and ``points[j]`` for each pair, in one batched evaluation:
    theta = w_0 + sum_i c_i (w_i - w_0); each solution is evaluated once."""
    layout, flat = _flat_points(model, points, kw.get("include"))
    n = len(flat)
    bs = _betas(betas)
    inner = bs[(bs != 0) & (bs != 1)]
    if bool(((inner < 0) | (inner > 1)).any()):
        raise ValueError("betas: paths between solutions take betas in [0, 1]")
    U = torch.stack([f - flat[0] for f in flat[1:]]) if n > 1 else flat[0].new_zeros(0, layout.D)
    rows = []

    def row(c: Dict[int, float]):
        r = torch.zeros(max(n - 1, 0), dtype=torch.float64)
        for i, v in c.items():
            if i > 0:
                r[i - 1] += v
        rows.append(r)
        return len(rows) - 1

    solo = [row({i: 1.0}) for i in range(n)]
    idx = {}
    for (i, j) in pairs:
        idx[(i, j)] = [row({i: 1 - float(b), j: float(b)}) for b in inner]
    C = torch.stack(rows).float() if rows else torch.zeros(0, max(n - 1, 0))
    if n == 1:
        C = C.new_zeros(len(rows), 0)
        U = flat[0].new_zeros(0, layout.D)
    ev = evaluate(model, flat[0], U, C, data, **kw)
    out = {}
    for (i, j), ks in idx.items():
        order = [solo[i]] + ks + [solo[j]]
        out[(i, j)] = BarrierCurve(torch.cat([bs[:1], inner, bs[-1:]]), ev.error[order], ev.loss[order])
    return out


@dataclass
class PathResult:
    """The piecewise linear path w^(0) -> w^(1) -> ... (Fig. 2 left): one curve per segment."""
    levels: List[int]
    segments: List[BarrierCurve]

    def positions(self) -> torch.Tensor:
        """x-axis of Fig. 2: level + beta along each segment."""
        return torch.cat([self.levels[i] + s.betas * (self.levels[i + 1] - self.levels[i])
                          for i, s in enumerate(self.segments)])

    def errors(self) -> torch.Tensor:
        return torch.cat([s.error for s in self.segments])

    def to_dict(self) -> Dict:
        return {"levels": self.levels, "segments": [s.to_dict() for s in self.segments]}


def path_through(model: nn.Module, solutions: Sequence, data, betas=None,
                 levels: Optional[Sequence[int]] = None, **kw) -> PathResult:
    """Error along the piecewise linear path through ``solutions`` (w^(0), w^(1), ...)."""
    if len(solutions) < 2:
        raise ValueError("solutions: expected at least two points for a path")
    levels = list(range(len(solutions))) if levels is None else list(levels)
    pairs = [(i, i + 1) for i in range(len(solutions) - 1)]
    curves = _pairs_curves(model, solutions, pairs, betas, data, **kw)
    return PathResult(levels, [curves[p] for p in pairs])


@dataclass
class BarrierMatrix:
    """Barrier quantities between every pair of solutions (Fig. 2 right); symmetric [n, n]."""
    levels: List[int]
    max_error: torch.Tensor
    barrier: torch.Tensor
    midpoint_error: torch.Tensor
    curves: Dict[Tuple[int, int], BarrierCurve] = field(repr=False, default_factory=dict)

    def to_dict(self) -> Dict:
        return {"levels": self.levels, "max_error": self.max_error.tolist(),
                "barrier": self.barrier.tolist(), "midpoint_error": self.midpoint_error.tolist()}


def barrier_matrix(model: nn.Module, solutions: Sequence, data, betas=None,
                   levels: Optional[Sequence[int]] = None, **kw) -> BarrierMatrix:
    """max_beta E((1 - beta) w^(i) + beta w^(j)) (and the barrier, midpoint error) for all i < j."""
    n = len(solutions)
    if n < 1:
        raise ValueError("solutions: expected at least one point")
    levels = list(range(n)) if levels is None else list(levels)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    curves = _pairs_curves(model, solutions, pairs, betas, data, **kw) if pairs else {}
    M = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    P = torch.zeros(n, n, dtype=torch.float64)
    if not pairs:
        ev = evaluate(model, solutions[0], torch.zeros(0, StateLayout(model).D), torch.zeros(1, 0),
                      data, **kw)
        M[0, 0] = P[0, 0] = ev.error[0]
    for (i, j), c in curves.items():
        M[i, j] = M[j, i] = c.max_error
        B[i, j] = B[j, i] = c.barrier
        P[i, j] = P[j, i] = c.midpoint_error
        M[i, i] = P[i, i] = c.error[0]
        M[j, j] = P[j, j] = c.error[-1]
    return BarrierMatrix(levels, M, B, P, curves)
