"""The Hessian's spectral density from stochastic Lanczos quadrature (SLQ).

For a unit start vector v, m Lanczos steps give T_m = S Θ S^T; the Gauss quadrature
Σ_j w_j f(θ_j) with nodes θ_j and weights w_j = S_{0j}^2 equals v^T f(H) v exactly for polynomials
f of degree < 2m. Averaging over n_runs random v estimates tr f(H) / D^A, i.e. the spectral density
φ(λ) = (1/D^A) Σ_i δ(λ - λ_i) (Ghorbani et al. 2019; Yao et al. 2020, PyHessian).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np


@dataclass
class SpectralDensity:
    """Raw SLQ output: ``nodes`` and ``weights`` [n_runs, m] (float64; each run's weights sum to
    1), ``D_A`` the dimension of the (axial) space the Hessian acts on, and ``meta`` (settings).

    ``eigen_list, weight_list = density`` unpacks like PyHessian's ``density()`` return value.
    """
    nodes: np.ndarray
    weights: np.ndarray
    D_A: int
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.nodes = np.atleast_2d(np.asarray(self.nodes, dtype=np.float64))
        self.weights = np.atleast_2d(np.asarray(self.weights, dtype=np.float64))
        if self.nodes.shape != self.weights.shape:
            raise ValueError(f"weights: expected shape {self.nodes.shape} (as nodes), got "
                             f"{self.weights.shape}")
        self.D_A = int(self.D_A)

    def __iter__(self):
        yield self.nodes.tolist()
        yield self.weights.tolist()

    @property
    def n_runs(self) -> int:
        return self.nodes.shape[0]

    def flat(self) -> Tuple[np.ndarray, np.ndarray]:
        """All runs' nodes and weights / n_runs (a quadrature whose weights sum to 1): what
        ``fastimp.theory.intersection_threshold`` takes."""
        return self.nodes.ravel().copy(), (self.weights / self.n_runs).ravel()

    def moment(self, k: int) -> float:
        """Σ_j w_j θ_j^k, the SLQ estimate of tr(H^k) / D^A (exact in expectation for k < 2m)."""
        nodes, weights = self.flat()
        return float(np.sum(weights * nodes ** k))

    def smoothed(self, sigma: float, grid: Optional[np.ndarray] = None, num: int = 1000,
                 pad: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
        """(grid, φ_σ(grid)) with φ_σ(x) = Σ_j w_j N(x; θ_j, σ²), a density in 1/λ units that
        integrates to 1. ``sigma`` (the kernel's standard deviation, in eigenvalue units) is
        explicit because it sets what the picture shows; the default grid spans the nodes
        ± ``pad`` of their range ± 3σ."""
        if not (isinstance(sigma, (int, float)) and sigma > 0 and np.isfinite(sigma)):
            raise ValueError(f"sigma: expected a positive float, got {sigma!r}")
        nodes, weights = self.flat()
        if grid is None:
            lo, hi = float(nodes.min()), float(nodes.max())
            margin = pad * (hi - lo) + 3 * sigma
            grid = np.linspace(lo - margin, hi + margin, num)
        grid = np.asarray(grid, dtype=np.float64)
        z = (grid[:, None] - nodes[None, :]) / sigma
        phi = (np.exp(-0.5 * z * z) * weights[None, :]).sum(1) / (sigma * np.sqrt(2 * np.pi))
        return grid, phi

    def to_dict(self) -> Dict[str, Any]:
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "D_A": self.D_A,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SpectralDensity":
        return cls(np.asarray(d["nodes"]), np.asarray(d["weights"]), d["D_A"], d.get("meta", {}))

    def save(self, path) -> Path:
        """Atomically write ``.npz`` (arrays + JSON meta) or ``.json``, by the suffix."""
        from fastimp._io import atomic_write
        path = Path(path)

        def write(tmp):
            if path.suffix == ".json":
                with open(tmp, "w") as f:
                    json.dump(self.to_dict(), f)
            else:
                with open(tmp, "wb") as f:
                    np.savez(f, nodes=self.nodes, weights=self.weights,
                             D_A=np.int64(self.D_A), meta=np.asarray(json.dumps(self.meta)))
        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> "SpectralDensity":
        path = Path(path)
        if path.suffix == ".json":
            with open(path) as f:
                return cls.from_dict(json.load(f))
        with np.load(path, allow_pickle=False) as z:
            return cls(z["nodes"], z["weights"], int(z["D_A"]), json.loads(str(z["meta"])))

    def plot(self, path=None, sigma: Optional[float] = None, ax=None, log: bool = True,
             title: Optional[str] = None):
        """Plot φ_σ (log scale by default, as PyHessian's figures) with the raw nodes as a rug;
        ``sigma`` defaults to 1% of the node range. Writes a PNG when ``path`` is given."""
        import matplotlib
        if ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        nodes, weights = self.flat()
        if sigma is None:
            sigma = max(0.01 * float(nodes.max() - nodes.min()), 1e-12)
        grid, phi = self.smoothed(sigma)
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(grid, np.maximum(phi, 1e-300) if log else phi, lw=1.2)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(phi.max() * 1e-8, 1e-300))
        ax.plot(nodes, np.full_like(nodes, ax.get_ylim()[0]), "|", color="k", alpha=0.3)
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel(f"density (σ = {sigma:.3g})")
        ax.set_title(title or f"Hessian spectral density (D_A = {self.D_A}, "
                              f"{self.n_runs} runs x {self.nodes.shape[1]} steps)")
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                _save_fig(fig, path)
            plt.close(fig)
        return ax


def _save_fig(fig, path) -> Path:
    from fastimp._io import atomic_write
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
