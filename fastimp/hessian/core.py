"""``Hessian``: top eigenvalues, trace and spectral density of the train loss's Hessian,
shaped like PyHessian's ``hessian`` class (Yao et al. 2020) and restricted to a mask's axial
subspace."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fastimp.hessian.density import SpectralDensity
from fastimp.hessian.hvp import HVPOperator
from fastimp.hessian.lanczos import _random_unit, lanczos


class _NoTF32:
    """TF32 off for the duration (products feeding Lanczos must be fp32-accurate)."""

    def __enter__(self):
        self.state = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.state


class Hessian:
    """The Hessian H_A of the train loss of ``model`` on ``data``, restricted to the free
    coordinates of ``masks`` (D_A of them; see ``HVPOperator`` for the loss, weighting,
    BatchNorm mode (eval by default), weight decay (off by default) and data options, which are
    passed through ``**kwargs``).

    PyHessian users: ``hessian(model, criterion, dataloader=...)`` → ``Hessian(model, criterion,
    data)``; ``eigenvalues(top_n=)``, ``trace()`` and ``density()`` return the same shapes
    (``density()`` returns a ``SpectralDensity`` that unpacks to PyHessian's two lists). The
    differences: ``eigenvalues`` uses Lanczos (with full reorthogonalization) instead of power
    iteration with deflation — the Krylov space of m products yields all top eigenvalues at
    once, so it needs far fewer passes over the data; ``trace`` and ``density`` push
    ``probes_per_pass`` probe vectors through one pass over the data.

    Randomness (start vectors, probes) comes from ``torch.Generator().manual_seed(seed)`` on the
    CPU, so the same seed gives the same result on the same device; each method takes its own
    ``seed`` (default: the next draw from the object's generator).

    ``distributed=True`` (every rank of the torch.distributed group builds it alike and calls the
    same methods): ``trace`` splits its probes and ``density`` its SLQ runs over the ranks (every
    rank draws every probe as one process would, computes its share, and the results are
    gathered in order); ``eigenvalues`` (one Krylov chain) splits the data of every product over
    the ranks and sums them. The results equal one process's to float rounding.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, data=None,
                 masks: Optional[Mapping[str, torch.Tensor]] = None, *, seed: int = 0,
                 distributed: bool = False, **kwargs):
        self.op = HVPOperator(model, loss_fn, data, masks, seed=seed, **kwargs)
        self._generator = torch.Generator().manual_seed(seed + 1)
        self.distributed = bool(distributed)

    def _rows(self, n: int) -> range:
        """The items of ``n`` this rank computes (all of them in one process)."""
        if not self.distributed:
            return range(n)
        from fastimp.distributed import shard
        return shard(n)

    def _gather(self, local: list) -> list:
        if not self.distributed:
            return local
        from fastimp.distributed import gather_parts
        return gather_parts(local)

    def _data_parallel_matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H_A V with this rank's share of the batches, summed over the ranks."""
        import torch.distributed as dist

        from fastimp.distributed import shard
        op = self.op
        single = V.dim() == 1
        V = (V.unsqueeze(0) if single else V).to(device=op.device, dtype=op.dtype)
        part = shard(len(op.batches))
        mine = op.batches[part.start:part.stop]
        acc = torch.cat([op._matvec(V[i:i + op.probes_per_pass], batches=mine, decay=False)
                         for i in range(0, V.shape[0], op.probes_per_pass)])
        dist.all_reduce(acc)
        if op.weight_decay:
            acc.add_(V, alpha=op.weight_decay)
        return acc[0] if single else acc

    @property
    def D_A(self) -> int:
        """Dimension of the axial subspace the Hessian acts on."""
        return self.op.D_A

    def _gen(self, seed: Optional[int]) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self._generator))
        return torch.Generator().manual_seed(seed)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H_A v for v of shape [D_A] (or [k, D_A])."""
        with _NoTF32():
            return self.op.matvec(v)

    def eigenvalues(self, top_n: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    seed: Optional[int] = None
                    ) -> Tuple[List[float], List[Dict[str, torch.Tensor]]]:
        """The ``top_n`` largest (algebraic) eigenvalues, descending, and their eigenvectors
        (dicts name -> tensor shaped like the parameter, zero on pruned coordinates), by Lanczos
        with full reorthogonalization from a random start, at most ``max_iter`` steps (one pass
        over the data each). Stops when every top Ritz value θ_i has the a-posteriori error bound
        min(ρ_i, ρ_i²/gap_i) <= tol·|θ_i| (ρ_i = β_m |s_{m,i}|, the residual norm; gap_i = the
        distance to the nearest other Ritz value)."""
        if not (isinstance(top_n, int) and 1 <= top_n <= self.D_A):
            raise ValueError(f"top_n: expected an int in [1, D_A={self.D_A}], got {top_n!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol: expected a positive float, got {tol!r}")
        gen = self._gen(seed)
        like = torch.empty(0, device=self.op.device, dtype=self.op.dtype)
        v0 = _random_unit(1, self.D_A, gen, like, rademacher=False)
        steps = max(max_iter, top_n)

        def converged(j, alphas, betas):
            if j < top_n:
                return False
            if j == self.D_A:
                return True
            T = np.diag(alphas[0]) + np.diag(betas[0, :j - 1], 1) + np.diag(betas[0, :j - 1], -1)
            theta, S = np.linalg.eigh(T)
            rho = np.abs(betas[0, j - 1] * S[-1, :])
            for i in range(j - 1, j - 1 - top_n, -1):
                others = np.delete(theta, i)
                gap = np.min(np.abs(others - theta[i])) if others.size else np.inf
                err = min(rho[i], rho[i] ** 2 / gap if gap > 0 else np.inf)
                if err > tol * max(abs(theta[i]), 1e-30):
                    return False
            return True

        matvec = self._data_parallel_matvec if self.distributed else self.op.matvec
        with _NoTF32():
            res = lanczos(matvec, v0, steps, gen, callback=converged)
        theta, S = res.ritz(0)
        order = np.argsort(theta)[::-1][:top_n]
        vals = [float(theta[i]) for i in order]
        Sk = torch.as_tensor(S[:, order].copy(), dtype=res.basis.dtype, device=res.basis.device)
        vecs = (Sk.T @ res.basis[0])                                   # [top_n, D_A]
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
        params = self.op.to_params(vecs)
        eigenvectors = [{n: params[n][i] for n in self.op.names} for i in range(top_n)]
        self.last_steps = res.steps
        return vals, eigenvectors

    def trace(self, n_samples: int = 100, seed: Optional[int] = None) -> List[float]:
        """Hutchinson's estimator: ``n_samples`` values v^T H_A v with Rademacher v in the axial
        subspace (so tr H_A = their mean; PyHessian's ``trace()`` returns the same list).
        ``probes_per_pass`` of them share one pass over the data."""
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"n_samples: expected an int >= 1, got {n_samples!r}")
        gen = self._gen(seed)
        mine = self._rows(n_samples)
        out: List[float] = []
        with _NoTF32():
            for i in range(0, n_samples, self.op.probes_per_pass):
                k = min(self.op.probes_per_pass, n_samples - i)
                v = torch.randint(0, 2, (k, self.D_A), generator=gen)  # every rank draws all
                lo, hi = max(mine.start, i) - i, min(mine.stop, i + k) - i
                if lo >= hi:
                    continue
                v = v[lo:hi].to(device=self.op.device, dtype=self.op.dtype).mul_(2).sub_(1)
                hv = self.op.matvec(v)
                out.extend((hv * v).sum(1).double().cpu().tolist())
        return self._gather(out)

    def density(self, iterations: int = 100, n_runs: int = 1,
                seed: Optional[int] = None) -> SpectralDensity:
        """Stochastic Lanczos quadrature: ``n_runs`` Lanczos runs of ``iterations`` steps (the
        paper: 512 on CIFAR-10, 128 on ImageNet) from independent Rademacher starts, with full
        reorthogonalization, up to ``probes_per_pass`` runs in lock step (one data pass per step
        for all of them; memory: runs x iterations x D_A values for the bases). Each T_m is
        solved in float64; nodes = its eigenvalues, weights = squared first components of its
        eigenvectors. ``iterations`` is capped at D_A. Each run restarts an exhausted Krylov space
        from its own generator (seeded with its start vector), so a run's result does not depend
        on which runs share its lock step (or its rank)."""
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
        if not (isinstance(n_runs, int) and n_runs >= 1):
            raise ValueError(f"n_runs: expected an int >= 1, got {n_runs!r}")
        gen = self._gen(seed)
        like = torch.empty(0, device=self.op.device, dtype=self.op.dtype)
        mine = self._rows(n_runs)
        nodes, weights = [], []
        with _NoTF32():
            for i in range(0, n_runs, self.op.probes_per_pass):
                k = min(self.op.probes_per_pass, n_runs - i)
                v0 = _random_unit(k, self.D_A, gen, like, rademacher=True)  # every rank draws all
                seeds = torch.randint(0, 2 ** 62, (k,), generator=gen).tolist()
                lo, hi = max(mine.start, i) - i, min(mine.stop, i + k) - i
                if lo >= hi:
                    continue
                restarts = [torch.Generator().manual_seed(s) for s in seeds[lo:hi]]
                res = lanczos(self.op.matvec, v0[lo:hi], iterations, restarts)
                for r in range(hi - lo):
                    theta, S = res.ritz(r)
                    nodes.append(theta)
                    weights.append(S[0, :] ** 2)
                del res
        if self.distributed:
            pairs = self._gather(list(zip(nodes, weights)))
            nodes, weights = [p[0] for p in pairs], [p[1] for p in pairs]
        m = min(iterations, self.D_A)
        meta = {"iterations": m, "n_runs": n_runs, "num_examples": self.op.num_examples,
                "weight_decay": self.op.weight_decay, "batchnorm": self.op.batchnorm,
                "method": self.op.method, "dtype": str(self.op.dtype).replace("torch.", "")}
        return SpectralDensity(np.stack(nodes), np.stack(weights), self.D_A, meta)
