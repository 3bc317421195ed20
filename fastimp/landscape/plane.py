"""2-D slices of the error landscape through three points (Appendix B: "Error landscape of an IMP
step", Fig. 3, and "Small weights are correlated with flat directions", Fig. 6).

The plane through p0, p1, p2 gets the Gram-Schmidt basis e1 = (p1 - p0)/|p1 - p0|,
e2 ∝ (p2 - p0) - ((p2 - p0)·e1) e1 (in parameter space, the paper's w in R^D). A grid point
(x, y) is theta = p0 + a1 (p1 - p0) + a2 (p2 - p0) with a solving x e1 + y e2 = a1 d1 + a2 d2, so the
non-prunable coordinates (and BN statistics) are clipped to the convex hull through the
coefficients: for Fig. 3 the coefficient of w^(L+1) - w^(L) is clamped to [0, 1] there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from fastimp.landscape.evaluate import evaluate
from fastimp.landscape.space import StateLayout


@dataclass
class PlaneResult:
    """Errors and losses on a grid over the plane through three points."""
    xs: torch.Tensor         # [nx] coordinates along e1
    ys: torch.Tensor         # [ny] coordinates along e2
    error: torch.Tensor      # [ny, nx]
    loss: torch.Tensor       # [ny, nx]
    points: torch.Tensor     # [3, 2]: coordinates of p0, p1, p2
    labels: Tuple[str, str, str]
    basis_gram: torch.Tensor  # [2, 2] e_i·e_j (identity up to rounding)
    matching_error: Optional[float] = None
    own_points: Optional[torch.Tensor] = None  # [3, 2] in the plane's own orthonormal basis

    def to_dict(self) -> Dict:
        own = self.points if self.own_points is None else self.own_points
        return {"xs": self.xs.tolist(), "ys": self.ys.tolist(), "error": self.error.tolist(),
                "loss": self.loss.tolist(), "points": self.points.tolist(),
                "own_points": own.tolist(), "labels": list(self.labels),
                "matching_error": self.matching_error}


def gram_schmidt(d1: torch.Tensor, d2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal e1, e2 spanning d1, d2 (float64)."""
    d1, d2 = d1.double(), d2.double()
    n1 = d1.norm()
    if n1 == 0:
        raise ValueError("points: p1 equals p0, the plane is not defined")
    e1 = d1 / n1
    r = d2 - (d2 @ e1) * e1
    n2 = r.norm()
    if n2 <= 1e-6 * max(float(d2.norm()), 1e-30):  # float32 points: relative rounding ~1e-7
        raise ValueError("points: the three points are collinear, the plane is not defined")
    return e1, r / n2


def plane_frame(model: nn.Module, p0, p1, p2, include=None) -> torch.Tensor:
    """The 2x2 matrix A with (x, y) = A (a1, a2): the coordinates, in the plane's Gram-Schmidt
    basis, of p0 + a1 (p1 - p0) + a2 (p2 - p0); p1 is at (A00, 0), p2 at (A01, A11 > 0)."""
    layout = StateLayout(model, include)
    w0 = layout.flatten(p0)
    w1, w2 = layout.flatten(p1).to(w0.device), layout.flatten(p2).to(w0.device)
    return _frame(layout, w1 - w0, w2 - w0)


def _frame(layout, d1, d2) -> torch.Tensor:
    P = layout.D_params
    e1, e2 = gram_schmidt(d1[:P], d2[:P])
    return torch.tensor([[float(d1[:P].double() @ e1), float(d2[:P].double() @ e1)],
                         [float(d1[:P].double() @ e2), float(d2[:P].double() @ e2)]],
                        dtype=torch.float64)


def plane(model: nn.Module, p0, p1, p2, data, *, grid: int = 51,
          extent: Optional[Sequence[float]] = None, scale: str = "fit",
          labels=("p0", "p1", "p2"), matching_error: Optional[float] = None,
          frame: Optional[torch.Tensor] = None, **kw) -> PlaneResult:
    """Error and loss on a ``grid`` x ``grid`` slice through ``p0``, ``p1``, ``p2`` (state dicts,
    models or flat vectors).

    ``extent=(xmin, xmax, ymin, ymax)`` in basis coordinates, else ``scale``: ``"fit"`` (Fig. 3:
    the three points' x-range widened by half its span on both sides, y from -2|y2| to 2|y2|) or
    ``"equal"`` (Fig. 6: a square of half-width 1.5 max(|p1 - p0|, |p2 - p0|) around p0).
    ``frame``: a 2x2 matrix (as :func:`plane_frame` returns) that places the points instead of the
    plane's own one: grid point (x, y) is p0 + a1 (p1 - p0) + a2 (p2 - p0) with
    (a1, a2) = frame^-1 (x, y). Planes of several replicates evaluated in one shared frame (e.g.
    the mean of theirs) have their points at the same places, so their error grids can be
    averaged. ``kw`` goes to :func:`evaluate` (bn, train_data, chunk_size, backend, ...).
    """
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid: expected an int >= 2, got {grid!r}")
    layout = StateLayout(model, kw.get("include"))
    w0 = layout.flatten(p0)
    w1, w2 = layout.flatten(p1).to(w0.device), layout.flatten(p2).to(w0.device)
    P = layout.D_params
    d1, d2 = w1 - w0, w2 - w0
    e1, e2 = gram_schmidt(d1[:P], d2[:P])
    # coordinates of the three points; A maps raw coefficients (a1, a2) to (x, y)
    own = _frame(layout, d1, d2)
    A = own
    if frame is not None:
        A = torch.as_tensor(frame, dtype=torch.float64).reshape(2, 2)
        if not torch.isfinite(A).all() or abs(float(torch.linalg.det(A))) < 1e-300:
            raise ValueError(f"frame: expected an invertible 2x2 matrix, got {A.tolist()}")
    pts = torch.tensor([[0.0, 0.0], [A[0, 0], A[1, 0]], [A[0, 1], A[1, 1]]], dtype=torch.float64)
    own_pts = torch.tensor([[0.0, 0.0], [own[0, 0], own[1, 0]], [own[0, 1], own[1, 1]]],
                           dtype=torch.float64)
    if extent is None:
        if scale == "fit":
            lo_x, hi_x = float(pts[:, 0].min()), float(pts[:, 0].max())
            span = hi_x - lo_x
            ymax = float(pts[:, 1].abs().max()) or span
            extent = (lo_x - 0.5 * span, hi_x + 0.5 * span, -2 * ymax, 2 * ymax)
        elif scale == "equal":
            r = 1.5 * float(max(pts[1].norm(), pts[2].norm()))
            extent = (-r, r, -r, r)
        else:
            raise ValueError(f"scale: expected 'fit' or 'equal', got {scale!r}")
    if len(extent) != 4 or not all(math.isfinite(v) for v in extent):
        raise ValueError(f"extent: expected four finite numbers, got {extent!r}")
    xs = torch.linspace(extent[0], extent[1], grid, dtype=torch.float64)
    ys = torch.linspace(extent[2], extent[3], grid, dtype=torch.float64)
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)  # [G, 2] (x, y), row-major over y
    coeffs = torch.linalg.solve(A, coords.T).T  # [G, 2] raw coefficients (a1, a2)
    ev = evaluate(model, w0, torch.stack([d1, d2]), coeffs.float(), data,
                  clip=([0.0, 0.0], [1.0, 1.0]), **kw)
    gram = torch.stack([e1, e2]) @ torch.stack([e1, e2]).T
    return PlaneResult(xs, ys, ev.error.view(grid, grid), ev.loss.view(grid, grid), pts,
                       tuple(labels), gram, matching_error, own_pts)


def project(model: nn.Module, w, masks: Mapping[str, torch.Tensor], include=None) -> torch.Tensor:
    """m ⊙ w as a flat vector of the landscape layout (non-prunable coordinates unchanged)."""
    layout = StateLayout(model, include)
    flat = layout.flatten(w)
    return flat * layout.mask_vector(masks).to(flat.device)


def imp_step_plane(model: nn.Module, w_L, mask_next: Mapping[str, torch.Tensor], w_next, data,
                   **kw) -> PlaneResult:
    """Fig. 3: the plane through w^(L), its projection m^(L+1) ⊙ w^(L) and w^(L+1)."""
    proj = project(model, w_L, mask_next, kw.get("include"))
    kw.setdefault("labels", ("w(L)", "m(L+1)⊙w(L)", "w(L+1)"))
    return plane(model, w_L, proj, w_next, data, **kw)


def pruning_plane(model: nn.Module, w_L, magnitude_mask: Mapping[str, torch.Tensor],
                  random_mask: Mapping[str, torch.Tensor], data, **kw) -> PlaneResult:
    """Fig. 6: the plane through w^(L) spanned by its magnitude and random pruning projections."""
    mag = project(model, w_L, magnitude_mask, kw.get("include"))
    rnd = project(model, w_L, random_mask, kw.get("include"))
    kw.setdefault("labels", ("w(L)", "magnitude", "random"))
    kw.setdefault("scale", "equal")
    return plane(model, w_L, mag, rnd, data, **kw)
