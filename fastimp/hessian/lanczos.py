"""Lanczos with full reorthogonalization, for k independent start vectors in lock step.

The Krylov bases are kept (k x m x n) and every new vector is orthogonalized against the whole
basis twice (classical Gram-Schmidt, twice is enough: Giraud et al. 2005), so no spurious copies
of converged eigenvalues ("ghosts") appear. The tridiagonal T_m is solved in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch


@dataclass
class LanczosResult:
    alphas: np.ndarray   # [k, m] float64, diagonal of T
    betas: np.ndarray    # [k, m-1] float64, off-diagonal (0 where the run restarted)
    basis: torch.Tensor  # [k, m, n] orthonormal Lanczos vectors
    steps: int
    residual: np.ndarray  # [k] norm of the last (unnormalized) Lanczos vector

    def tridiagonal(self, run: int = 0, steps: Optional[int] = None) -> np.ndarray:
        m = self.steps if steps is None else steps
        a = self.alphas[run, :m]
        b = self.betas[run, :m - 1]
        return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)

    def ritz(self, run: int = 0, steps: Optional[int] = None):
        """(nodes ascending, eigenvectors of T) in float64."""
        return np.linalg.eigh(self.tridiagonal(run, steps))


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """w [k, n] minus its projection on the rows of Q [k, j, n], twice."""
    for _ in range(2):
        c = torch.bmm(Q, w.unsqueeze(-1))                      # [k, j, 1]
        w = w - torch.bmm(Q.transpose(1, 2), c).squeeze(-1)
    return w


def _random_unit(k: int, n: int, generator: torch.Generator, like: torch.Tensor,
                 rademacher: bool = True) -> torch.Tensor:
    if rademacher:
        v = torch.randint(0, 2, (k, n), generator=generator).to(torch.float64).mul_(2).sub_(1)
    else:
        v = torch.randn(k, n, generator=generator, dtype=torch.float64)
    v = v.to(device=like.device, dtype=like.dtype)
    return v / v.norm(dim=1, keepdim=True)


def _fresh(k: int, n: int, generator, like: torch.Tensor) -> torch.Tensor:
    """k random unit rows: from one generator, or row i from ``generator[i]`` (one per run, so a
    run's restarts do not depend on which other runs share its lock step)."""
    if isinstance(generator, torch.Generator):
        return _random_unit(k, n, generator, like, rademacher=False)
    return torch.cat([_random_unit(1, n, g, like, rademacher=False) for g in generator])


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int,
            generator: Union[torch.Generator, Sequence[torch.Generator]],
            callback: Optional[Callable[[int, np.ndarray, np.ndarray], bool]] = None
            ) -> LanczosResult:
    """Run ``steps`` Lanczos steps from each row of ``v0`` [k, n] (normalized here), with one
    ``matvec`` of all k vectors per step. ``callback(j, alphas [k, j], betas [k, j])`` after step
    j (1-based; ``betas[:, j-1]`` is the residual norm); returning True stops early. When a run's
    Krylov space is exhausted (beta ≈ 0) it continues from a fresh random vector orthogonal to its
    basis with beta = 0, so T decouples into blocks and the start vector's quadrature weights on
    the new block are exactly 0. ``generator``: one for every run, or one per run (row)."""
    k, n = v0.shape
    steps = int(min(steps, n))
    Q = v0.new_empty(k, steps, n)
    alphas = np.zeros((k, steps))
    betas = np.zeros((k, steps))  # betas[:, j] couples q_j and q_{j+1}; the last is the residual
    q = v0 / v0.norm(dim=1, keepdim=True)
    Q[:, 0] = q
    scale = np.zeros(k)
    rel_tiny = 1e-10 if v0.dtype == torch.float64 else 1e-5
    done = 0
    for j in range(steps):
        w = matvec(q)
        alphas[:, j] = (w * q).sum(1).double().cpu().numpy()
        w = _orthogonalize(w, Q[:, :j + 1])
        b = w.norm(dim=1)
        bn = b.double().cpu().numpy()
        betas[:, j] = bn
        done = j + 1
        if callback is not None and callback(done, alphas[:, :done], betas[:, :done]):
            break
        if done == steps:
            break
        scale = np.maximum(scale, np.abs(alphas[:, j]) + bn)
        tiny = bn <= rel_tiny * np.maximum(scale, 1e-300)
        if tiny.any():
            fresh = _orthogonalize(_fresh(k, n, generator, w), Q[:, :j + 1])
            rows = torch.as_tensor(np.nonzero(tiny)[0], device=w.device)
            w[rows] = fresh[rows]
            betas[tiny, j] = 0.0
            b = w.norm(dim=1)
        q = w / b.unsqueeze(1)
        Q[:, j + 1] = q
    return LanczosResult(alphas[:, :done], betas[:, :done - 1], Q[:, :done], done,
                         betas[:, done - 1].copy())
