"""Branches: level L of a run retrained with another strategy (Section 2), and the distribution of
the weights it ends with (Figs. 7, 8, 9).

A branch (rewind step tau, level L >= 1, replicate, strategy) is the level-L mask m^(L) of the run
trained as ``strategy`` would train it:

- ``"projection"``: no training, the level-L projection m^(L) ⊙ w^(L−1);
- ``"wr"``:  A_tau(m^(L) ⊙ w_tau, T − tau)    (on an LRR run: Appendix D's LRR masks rewound);
- ``"lrr"``: A_0(m^(L) ⊙ w^(L−1), T);
- ``"ft"``:  A_T(m^(L) ⊙ w^(L−1), T) at the config's ``finetune_lr`` / ``finetune_weight_decay``;

with w^(L−1) the run's own solution. The run's own strategy is its w^(L) (nothing is trained).
Missing branches are trained with ``Run.retrain``, every one of a strategy as one list, and each is
written as soon as its training ends (so a killed list keeps what it finished) to
``analysis/branches/tau<t>_L<L>_rep<r>_<strategy>.json`` with its test error and the
statistics of u = |w| / mean|w| over the unpruned prunable weights of m^(L): the CDF on
``CDF_GRID``, quantiles and the 20th percentile (Fig. 9).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from fastimp.analysis import common, paths

STRATEGIES = ("projection", "wr", "lrr", "ft")
CDF_GRID = np.round(np.linspace(0.0, 6.0, 601), 6)          # u = |w| / mean|w|
QUANTILES = np.round(np.arange(0.05, 1.0, 0.05), 2)

Key = Tuple[int, int, int, str]   # (rewind step, level, replicate, strategy)


def normalized_magnitudes(state: Mapping[str, torch.Tensor], masks) -> np.ndarray:
    """u = |w| / mean|w| over the unpruned prunable coordinates of ``masks`` (all tensors)."""
    vals = [state[name].detach().double().abs()[m.bool()].reshape(-1) for name, m in masks.items()]
    v = torch.cat(vals).numpy() if vals else np.zeros(0)
    mean = v.mean() if v.size else 0.0
    if not mean > 0:
        raise ValueError("masks: no nonzero unpruned prunable weight to normalize by")
    return v / mean


def weight_stats(state: Mapping[str, torch.Tensor], masks) -> Dict:
    """CDF of u on ``CDF_GRID`` (F(x) = fraction of u <= x), quantiles of u, its 20th percentile
    and mean|w|."""
    v = np.sort(normalized_magnitudes(state, masks))
    cdf = np.searchsorted(v, CDF_GRID, side="right") / v.size
    q = np.quantile(v, QUANTILES)
    mean_abs = float(np.mean(np.concatenate(
        [state[n].detach().double().abs()[m.bool()].reshape(-1).numpy() for n, m in masks.items()])))
    return {"n": int(v.size), "mean_abs": mean_abs, "cdf": cdf.tolist(),
            "quantiles": dict(zip([f"{x:.2f}" for x in QUANTILES], q.tolist())),
            "q20": float(np.quantile(v, 0.2))}


def branch_params(run, strategy: str) -> Dict:
    c = run.config
    p = {"strategy": strategy, "own": strategy == c.strategy}
    if strategy == "ft":
        p.update(finetune_lr=c.finetune_lr, finetune_weight_decay=c.finetune_weight_decay)
    return p


def ensure(run, keys: Iterable[Key], device=None, progress: bool = False,
           log=print) -> Dict[Key, Dict]:
    """The branches ``keys``, read back when written with the same parameters, else computed
    (missing trainings of one strategy as one ``Run.retrain`` list)."""
    device = common.default_device(device)
    out: Dict[Key, Dict] = {}
    todo: Dict[str, List[Key]] = {}
    for key in keys:
        tau, L, r, s = key
        if s not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {s!r}")
        if L < 1:
            raise ValueError(f"level: branches start at level 1 (level 0 is dense), got {L}")
        done = common.current(paths.branch_json(run, tau, L, r, s), branch_params(run, s))
        if done is not None:
            out[key] = done
        elif s == "projection" or s == run.config.strategy:
            out[key] = _record(run, key, _untrained(run, key), None)
        else:
            todo.setdefault(s, []).append(key)
    for s, ks in todo.items():
        log(f"branches: training {len(ks)} level(s) as IMP-{s.upper()}")
        masks = [run.mask(L, tau, r) for tau, L, r, _ in ks]

        def record(i, sd, stats, ks=ks):
            out[ks[i]] = _record(run, ks[i], sd, stats)
        trained = run.retrain(masks, rewind_step=[k[0] for k in ks], replicate=[k[2] for k in ks],
                              level=[k[1] - 1 for k in ks], strategy=s, device=device,
                              progress=progress, on_result=record)
        for key, (sd, stats) in zip(ks, trained):
            if key not in out:  # under torchrun: trained by another rank
                out[key] = _record(run, key, sd, stats)
    return out


def stored(run, strategy: str, rewind_step: Optional[int] = None) -> Dict[Key, Dict]:
    """Every branch of ``strategy`` on disk (at ``rewind_step``, default all) that was written
    with the current parameters and belongs to this run's rewind steps and replicates."""
    out: Dict[Key, Dict] = {}
    for (tau, L, r), p in paths.branch_jsons(run, strategy).items():
        if (rewind_step is not None and tau != rewind_step) or tau not in run.rewind_steps \
                or r not in run.replicates or L < 1:
            continue
        done = common.current(p, branch_params(run, strategy))
        if done is not None:
            out[(tau, L, r, strategy)] = done
    return out


def _untrained(run, key: Key) -> Dict[str, torch.Tensor]:
    tau, L, r, s = key
    if s == "projection":
        prev = run.solution(L - 1, tau, r)
        m = run.mask(L, tau, r)
        return {k: (v * m[k].to(v.dtype)) if k in m else v for k, v in prev.items()}
    return run.solution(L, tau, r)


def _record(run, key: Key, state, stats: Optional[Dict]) -> Dict:
    tau, L, r, s = key
    masks = run.mask(L, tau, r)
    if stats is None:
        own = run.stats(L, tau, r) if s != "projection" else None
        test_error = None if own is None else own["test_error"]
        source = "projection" if s == "projection" else "run"
    else:
        test_error, source = stats["test_error"], "retrained"
    result = {"rewind_step": tau, "level": L, "replicate": r, "strategy": s, "source": source,
              "weights_remaining": float(masks.density()), "test_error": test_error,
              **weight_stats(state, masks)}
    return common.write(paths.branch_json(run, tau, L, r, s), branch_params(run, s), result)


def aggregate(branches: Dict[Key, Dict], tau: int, level: int, strategy: str,
              replicates: List[int]) -> Optional[Dict]:
    """Mean ± std over replicates of one (rewind step, level, strategy): CDF, q20, test error."""
    rows = [branches[(tau, level, r, strategy)] for r in replicates
            if (tau, level, r, strategy) in branches]
    if not rows:
        return None
    cdf, cdf_std = common.mean_std_arrays([b["cdf"] for b in rows])
    return {"strategy": strategy, "level": level, "replicates": [b["replicate"] for b in rows],
            "source": rows[0]["source"],
            "weights_remaining": common.mean_std(b["weights_remaining"] for b in rows)["mean"],
            "cdf": cdf, "cdf_std": cdf_std, "q20": common.mean_std(b["q20"] for b in rows),
            "test_error": common.mean_std(b["test_error"] for b in rows)}
