"""Matching (Definition 2.2): m . w is eps-matching if E(m . w) <= E(w_T) + eps, with E(w_T) the
dense (level 0) test error and eps the standard deviation of the dense replicates' test errors."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional


def _mean_std(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def dense_epsilon(dense_errors: Iterable[float]) -> float:
    """eps = std (unbiased) of the dense replicates' test errors; needs >= 2 replicates."""
    errors = [float(e) for e in dense_errors]
    if len(errors) < 2:
        raise ValueError(f"matching: eps is the std of the dense replicates' test errors and needs "
                         f"at least 2 replicates, got {len(errors)}; pass eps explicitly")
    return _mean_std(errors)[1]


def check_eps(eps: Optional[float]) -> Optional[float]:
    """``eps`` (None: the std of the dense replicates) checked: a number >= 0."""
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not eps >= 0):
        raise ValueError(f"eps (--eps): expected a number >= 0, got {eps!r}")
    return eps


def is_matching(error: float, dense_error: float, eps: float) -> bool:
    """Definition 2.2: E(m . w) <= E(w_T) + eps."""
    return float(error) <= float(dense_error) + float(eps)


def summarize(results: List[Dict[str, Any]], eps: Optional[float] = None) -> List[Dict[str, Any]]:
    """Per (rewind_step, level): mean and std over replicates of test error, weights remaining and
    ``matching`` (the mean error against the mean dense error + eps). ``eps=None``: the std of the
    dense replicates of that rewind step; with one replicate ``matching`` is None (pass eps)."""
    check_eps(eps)
    groups: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["rewind_step"], r["level"])].append(r)
    out = []
    for tau in sorted({k[0] for k in groups}):
        dense = groups.get((tau, 0), [])
        dense_err = [r["test_error"] for r in dense]
        if eps is not None:
            tau_eps, source = float(eps), "given"
        elif len(dense_err) >= 2:
            tau_eps, source = dense_epsilon(dense_err), "std of dense replicates"
        else:
            tau_eps, source = None, ("one replicate: pass eps" if dense_err else "no dense level")
        dense_mean = _mean_std(dense_err)[0] if dense_err else None
        for level in sorted(L for (t, L) in groups if t == tau):
            rows = groups[(tau, level)]
            err_mean, err_std = _mean_std([r["test_error"] for r in rows])
            wr_mean = sum(r["weights_remaining"] for r in rows) / len(rows)
            matching = (is_matching(err_mean, dense_mean, tau_eps)
                        if tau_eps is not None and dense_mean is not None else None)
            out.append({"rewind_step": tau, "level": level, "weights_remaining": wr_mean,
                        "test_error": err_mean, "test_error_std": err_std,
                        "replicates": len(rows), "dense_error": dense_mean, "eps": tau_eps,
                        "eps_source": source, "matching": matching})
    return out
