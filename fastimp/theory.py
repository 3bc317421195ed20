"""The random-subspace intersection threshold (Lemma 3.1, Appendix C), the largest pruning ratio
it allows (Section 3.3, Fig. 5), ε of the train-loss sublevel set (Appendix B) and the adaptive
pruning ratio (Appendix F).

Lemma 3.1: in a quadratic well with Hessian eigenvalues λ_i over D^A dimensions, the ε-sublevel set
is an ellipsoid with radii r_i = √(2ε/λ_i), and a random affine subspace of dimension d at distance
R from the minimum intersects it (with high probability) iff d > d*, where

    d* = D^A − Σ_i r_i² / (R² + r_i²) = D^A − Σ_i 2ε / (λ_i R² + 2ε).

The lemma assumes a positive definite Hessian; at a trained solution the eigenvalues <= 0 are the
flat bulk and small negative curvature, and SLQ's nodes near 0 scatter to either side of it. What
to do with them is the named option ``nonpositive`` (``NONPOSITIVE``):

- ``"flat"`` (default): the quadratic model does not rise along such a direction, the sublevel set
  is unbounded there (r_i = ∞) and the term is 1: the direction counts as fully flat;
- ``"exclude"``: the nodes λ_i <= 0 are dropped and the remaining quadrature weights renormalized
  to sum to 1, i.e. the D^A directions are taken to follow the positive part of the spectrum.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

Spectrum = Union[Sequence[float], np.ndarray, Tuple[np.ndarray, np.ndarray]]

NONPOSITIVE = ("flat", "exclude")


def _check_nonpositive(nonpositive: str) -> str:
    if nonpositive not in NONPOSITIVE:
        raise ValueError(f"nonpositive: expected one of {NONPOSITIVE} (what Lemma 3.1 does with "
                         f"eigenvalues <= 0), got {nonpositive!r}")
    return nonpositive


def _quadrature(spectrum, D_A: Optional[float],
                nonpositive: str = "flat") -> Tuple[np.ndarray, np.ndarray, float]:
    """(eigenvalues λ_i, multiplicities c_i with Σ c_i = D^A, D^A); ``nonpositive="exclude"``
    drops λ_i <= 0 and renormalizes the rest."""
    _check_nonpositive(nonpositive)
    if hasattr(spectrum, "flat") and hasattr(spectrum, "D_A"):       # SpectralDensity
        nodes, weights = spectrum.flat()
        return _quadrature((nodes, weights), spectrum.D_A if D_A is None else D_A, nonpositive)
    if isinstance(spectrum, tuple) and len(spectrum) == 2:
        nodes = np.asarray(spectrum[0], dtype=np.float64).ravel()
        weights = np.asarray(spectrum[1], dtype=np.float64).ravel()
        if nodes.shape != weights.shape:
            raise ValueError(f"spectrum: nodes {nodes.shape} and weights {weights.shape} differ "
                             "in shape")
        if D_A is None:
            raise ValueError("D_A: required with (nodes, weights): the quadrature's weights sum "
                             "to 1 and are scaled by D_A")
        if (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError("spectrum: weights must be finite and >= 0")
        total = weights.sum()
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"spectrum: quadrature weights must sum to 1 (got {total:.6g}); "
                             "pass SpectralDensity.flat() or divide by the number of runs")
    else:
        nodes = np.asarray(spectrum, dtype=np.float64).ravel()
        if nodes.size == 0:
            raise ValueError("spectrum: no eigenvalues given")
        weights = np.full(nodes.shape, 1.0 / nodes.size)
        if D_A is None:
            D_A = nodes.size
    if not np.isfinite(nodes).all():
        raise ValueError("spectrum: eigenvalues must be finite")
    D_A = float(D_A)
    if not D_A > 0:
        raise ValueError(f"D_A: expected a positive number, got {D_A}")
    if nonpositive == "exclude":
        keep = nodes > 0
        if not (keep.any() and weights[keep].sum() > 0):
            raise ValueError("spectrum: nonpositive='exclude' leaves no positive eigenvalue")
        nodes, weights = nodes[keep], weights[keep] / weights[keep].sum()
    return nodes, weights * D_A, D_A


def nonpositive_weight(spectrum: Spectrum, D_A: Optional[float] = None) -> float:
    """The fraction of the spectrum (quadrature weight) at λ <= 0: what ``nonpositive`` decides."""
    lam, c, dA = _quadrature(spectrum, D_A)
    return float(c[lam <= 0].sum() / dA)


def _check_eps(eps) -> float:
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a positive finite loss increase, got {eps}")
    return eps


def flat_dimension(spectrum: Spectrum, eps: float, R, D_A: Optional[float] = None,
                   nonpositive: str = "flat"):
    """Σ_i r_i²/(R² + r_i²): the lower bound (C.4) on the sublevel set's local angular dimension
    seen from distance R (array R -> array); ``nonpositive``: see the module docstring."""
    lam, c, _ = _quadrature(spectrum, D_A, nonpositive)
    eps = _check_eps(eps)
    R = np.asarray(R, dtype=np.float64)
    if (R < 0).any() or not np.isfinite(R).all():
        raise ValueError("R: expected finite distances >= 0")
    R2 = (R ** 2)[..., None]
    pos = lam > 0
    term = np.where(pos, 2 * eps / (np.where(pos, lam, 1.0) * R2 + 2 * eps), 1.0)
    out = (term * c).sum(-1)
    return float(out) if out.ndim == 0 else out


def intersection_threshold(spectrum: Spectrum, eps: float, R, D_A: Optional[float] = None,
                           nonpositive: str = "flat"):
    """d* = D^A − Σ_i r_i²/(R² + r_i²), r_i = √(2ε/λ_i) (Lemma 3.1).

    ``spectrum``: the eigenvalues (each counted once; D_A defaults to their number and, when
    given, rescales them to stand for D_A directions) or SLQ quadrature ``(nodes, weights)`` with
    weights summing to 1 (``SpectralDensity.flat()``), each node then standing for
    ``weight · D_A`` eigenvalues — the quadrature, not a smoothed density, is what the sum needs
    (a ``SpectralDensity`` may be passed directly). λ_i <= 0: ``nonpositive="flat"`` counts
    them as fully flat (term 1), ``"exclude"`` drops them (see the module docstring). ``R`` may
    be an array."""
    _, _, dA = _quadrature(spectrum, D_A, nonpositive)
    return dA - flat_dimension(spectrum, eps, R, D_A, nonpositive)


def max_pruning_ratio(spectrum: Spectrum, eps: float, R: Union[float, np.ndarray, Callable],
                      D_A: Optional[float] = None, n_prunable: Optional[float] = None,
                      resolution: int = 2001, nonpositive: str = "flat"):
    """The largest pruning ratio f with d(f) > d*(R(f)), i.e. the boundary of Fig. 5.

    d(f) = (1 − f) D^A as in the paper (``n_prunable`` = number of unpruned *prunable*
    coordinates, when given, makes it d(f) = D^A − f · n_prunable: only those are pruned).
    ``R`` is a distance (float or array: returns f_max(R) = flat_dimension(R) / n_prunable,
    clipped to [0, 1]) or a callable f -> R(f) (e.g. the projection distance of magnitude
    pruning at ratio f): then the condition is checked on a grid of ``resolution`` ratios in
    [0, 1] and refined by bisection at the last ratio where it holds; returns that ratio (0.0
    if none). ``nonpositive``: what λ <= 0 means (module docstring)."""
    _, _, dA = _quadrature(spectrum, D_A, nonpositive)
    n = dA if n_prunable is None else float(n_prunable)
    if not n > 0:
        raise ValueError(f"n_prunable: expected a positive number, got {n_prunable}")
    if not callable(R):
        f = np.clip(flat_dimension(spectrum, eps, R, D_A, nonpositive) / n, 0.0, 1.0)
        return float(f) if np.ndim(f) == 0 else f
    if not (isinstance(resolution, int) and resolution >= 2):
        raise ValueError(f"resolution: expected an int >= 2, got {resolution!r}")

    def slack(f: float) -> float:   # > 0 where the subspace is predicted to intersect
        return dA - f * n - intersection_threshold(spectrum, eps, float(R(f)), D_A, nonpositive)

    fs = np.linspace(0.0, 1.0, resolution)
    ok = np.array([slack(f) > 0 for f in fs])
    if not ok.any():
        return 0.0
    i = int(np.nonzero(ok)[0][-1])
    if i == len(fs) - 1:
        return 1.0
    lo, hi = fs[i], fs[i + 1]
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slack(mid) > 0 else (lo, mid)
    return float(lo)


def train_loss_epsilon_appendix_b(train_losses: Sequence[float], test_errors: Sequence[float],
                                  dense_test_error: float, solution_train_loss: float) -> float:
    """ε^(L)_train of Appendix B ("Threshold training dimension"): fit train loss linearly
    against test error over random-pruning experiments (the paper: at level 4), read off
    L_matching = the train loss at the dense network's test error E_dense, and subtract the level-L
    solution's train loss: ε = L_matching − L_train(w^(L)).

    (Appendix F's ε — the std of the per-batch train loss over the dense run's last epoch — is
    ``fastimp.training.train_loss_epsilon_appendix_f``.)"""
    x = np.asarray(test_errors, dtype=np.float64).ravel()
    y = np.asarray(train_losses, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"test_errors: expected {y.size} values (one per train loss), got "
                         f"{x.size}")
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("test_errors: need at least two experiments with different test errors "
                         "for the linear fit")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("train_losses/test_errors: must be finite")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope * float(dense_test_error) + intercept - float(solution_train_loss))


def train_loss_epsilon(train_losses, test_errors, dense_test_error, solution_train_loss) -> float:
    """Deprecated name of :func:`train_loss_epsilon_appendix_b`."""
    import warnings
    warnings.warn("fastimp.theory.train_loss_epsilon is deprecated: call "
                  "train_loss_epsilon_appendix_b (Appendix B's eps; Appendix F's is "
                  "fastimp.training.train_loss_epsilon_appendix_f)", DeprecationWarning,
                  stacklevel=2)
    return train_loss_epsilon_appendix_b(train_losses, test_errors, dense_test_error,
                                         solution_train_loss)


DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _path_losses(model, solution, pruned, data, ts, loss_fn, device) -> np.ndarray:
    """Train loss at (1 − t)·solution + t·pruned for each t (every float entry interpolated;
    BN buffers are equal in both)."""
    import torch
    if loss_fn is None:
        from fastimp.landscape.evaluate import evaluate
        direction = {k: (pruned[k] - v) if v.is_floating_point() else v
                     for k, v in solution.items()}
        coeffs = torch.as_tensor(np.asarray(ts, dtype=np.float32)).reshape(-1, 1)
        ev = evaluate(model, solution, [direction], coeffs, data, device=device)
        return ev.loss.numpy()
    import copy
    net = copy.deepcopy(model).to(device).eval()
    out = []
    with torch.no_grad():
        for t in ts:
            state = {k: (v + t * (pruned[k] - v)) if v.is_floating_point() else v
                     for k, v in solution.items()}
            net.load_state_dict(state)
            total, n = 0.0, 0
            for x, y in data:
                x, y = x.to(device), y.to(device)
                total += float(loss_fn(net(x), y)) * x.shape[0]
                n += x.shape[0]
            if n == 0:
                raise ValueError("data: expected at least one example")
            out.append(total / n)
    return np.asarray(out)


def _state_and_device(solution, device):
    """(detached state dict, ``device`` or the state's) of a model or state dict."""
    import torch
    if isinstance(solution, torch.nn.Module):
        solution = solution.state_dict()
    solution = {k: v.detach() for k, v in solution.items()}
    return solution, next(iter(solution.values())).device if device is None else device


def adaptive_pruning_scan(model, solution, masks, data, threshold: float,
                          ratios: Sequence[float] = DEFAULT_RATIOS, *, n_points: int = 5,
                          loss_fn=None, stop_at_first_failure: bool = True, device=None,
                          include=None):
    """Appendix F, step 2: for each ratio p (ascending), magnitude-prune a fraction p of the
    level-L ``solution``'s unmasked weights and evaluate the train loss at ``n_points`` evenly
    spaced points t in (0, 1] of the linear path (1 − t)·w^(L) + t·m'⊙w^(L). Returns a list of
    dicts {ratio, max_loss, within} (within = max_loss < threshold); stops after the first ratio
    that leaves the train LCS-set when ``stop_at_first_failure``.

    ``data``: an iterable of (x, y) batches of the train set (or a random subset of it).
    ``loss_fn=None`` is mean cross-entropy, evaluated with ``fastimp.landscape.evaluate`` (all
    path points in one batched pass) when it is available."""
    import copy

    import torch

    from fastimp.pruning import prune_magnitude

    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold: expected a finite train loss, got {threshold!r}")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ValueError(f"ratios: expected pruning ratios in (0, 1), got {ratios}")
    if not (isinstance(n_points, int) and n_points >= 1):
        raise ValueError(f"n_points: expected an int >= 1, got {n_points!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    solution, device = _state_and_device(solution, device)
    data = list(data)
    net = copy.deepcopy(model).cpu()
    net.load_state_dict(solution)
    ts = np.linspace(0.0, 1.0, n_points + 1)[1:]
    out = []
    for p in sorted(ratios):
        if masks is None:
            new = prune_magnitude(net, p, include=include)
        else:
            new = prune_magnitude(net, p, masks=masks)
        pruned = dict(solution)
        for name, m in new.items():
            pruned[name] = solution[name] * m.to(solution[name].device, solution[name].dtype)
        losses = _path_losses(model, solution, pruned, data, ts, loss_fn, device)
        worst = float(np.max(losses))
        out.append({"ratio": p, "max_loss": worst, "within": bool(worst < threshold)})
        if stop_at_first_failure and not out[-1]["within"]:
            break
    return out


def train_lcs_threshold(model, dense_solution, data, eps: float, *, loss_fn=None,
                        device=None) -> float:
    """Appendix F, step 1: the threshold for leaving the train LCS-set, the dense network's train
    loss + ε (ε: the std of its per-batch train loss over the last epoch of training). The loss is
    measured exactly as :func:`adaptive_pruning_scan` measures the path it is compared with: on the
    same ``data``, by the same evaluator (BatchNorm in eval mode, unaugmented batches)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    dense_solution, device = _state_and_device(dense_solution, device)
    loss = _path_losses(model, dense_solution, dense_solution, list(data), [0.0], loss_fn, device)
    return float(loss[0]) + float(eps)


def adaptive_pruning_ratio(model, solution, masks, data, threshold: float,
                           ratios: Sequence[float] = DEFAULT_RATIOS, floor: float = 0.2,
                           **kwargs) -> float:
    """Appendix F's adaptive pruning ratio for level L: the largest p in ``ratios`` whose pruned
    projection stays in the train LCS-set (the train loss along the linear path from the level-L
    ``solution`` to its magnitude-pruned projection stays below ``threshold`` = dense train loss
    + ε, ε = ``fastimp.training.train_loss_epsilon_appendix_f``; :func:`train_lcs_threshold`
    measures it on the same data and the same way as the path), then max(p, ``floor``) (the
    paper: 0.2).
    ``masks`` = the level-L mask (what the new mask prunes further). See
    ``adaptive_pruning_scan`` for ``kwargs`` (n_points, loss_fn, device, ...)."""
    if not (isinstance(floor, (int, float)) and 0 <= floor < 1):
        raise ValueError(f"floor: expected a ratio in [0, 1), got {floor!r}")
    scan = adaptive_pruning_scan(model, solution, masks, data, threshold, ratios, **kwargs)
    ok = [s["ratio"] for s in scan if s["within"]]
    best = max(ok) if ok else 0.0
    return float(max(best, floor))
