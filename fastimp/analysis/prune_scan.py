"""Fig. 5's experiment (Appendix B, "Threshold training dimension"): at level L, prune a further
fraction f = 0.1 ... 0.9 of w^(L)'s weights with magnitude and with random pruning, retrain each
mask with the run's strategy (``Run.retrain``, every missing (replicate, method, ratio) as one
list, each written as soon as it is trained), and record whether the result is matching
(Definition 2.2, with the tolerance of the current call: the flags are derived from the stored
errors on every call, so a new tolerance retrains nothing) and the distances R (the
projection's ||w^(L) − m'⊙w^(L)|| and Appendix B's ||w^(L+1) − w^(L)||). The random results also
give Appendix B's ε_train (train loss fitted against test error, read at the dense error, minus
w^(L)'s train loss). Plotted against the theory curve of :mod:`fastimp.analysis.hessian` at this
level (earlier levels in gray).

Per replicate ``analysis/prune-scan/level_<L>_rewind_<t>_rep_<r>.{json,png}`` (written after every
training, so a rerun retrains only what is missing); over replicates
``analysis/prune-scan/level_<L>_rewind_<t>.{json,png}`` (mean ± std per method and ratio).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from fastimp.analysis import common, paths

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("magnitude", "random")


def dense_and_eps(run, tau, eps_matching=None):
    """(mean dense test error, matching tolerance) of rewind step ``tau``."""
    rows = [s for s in run.summary(eps=eps_matching) if s["rewind_step"] == tau]
    dense = [s for s in rows if s["level"] == 0]
    if not dense:
        raise ValueError(f"{run.dir}: no dense level (0) for rewind step {tau}")
    dense_error, eps = dense[0]["dense_error"], dense[0]["eps"]
    if eps is None:
        raise ValueError("--eps-matching: the run has one replicate, so its matching tolerance "
                         "is unknown; pass --eps-matching")
    return float(dense_error), float(eps)


def _distance(a, b, params) -> float:
    return float(sum((a[k].float() - b[k].float()).pow(2).sum() for k in params) ** 0.5)


def _mask(weights, masks, method, f, seed):
    import torch

    from fastimp.pruning import prune_magnitude, prune_random
    if method == "magnitude":
        return prune_magnitude(weights, f, masks=masks)
    g = torch.Generator().manual_seed(seed * 1009 + int(round(f * 1000)))
    return prune_random(weights, f, masks=masks, generator=g)


def prune_scan_analysis(run, level: int, rewind_step: Optional[int] = None, replicate=None,
                        ratios: Sequence[float] = DEFAULT_RATIOS,
                        methods: Sequence[str] = METHODS, eps_matching: Optional[float] = None,
                        distance: str = "projection", seed: int = 0, device=None,
                        log=print) -> Dict:
    """The scan at ``level`` for ``replicate`` (None: every replicate, then their mean); returns
    the mean (or the one replicate's result). Finished (method, ratio) pairs are read back."""
    ratios = [float(f) for f in ratios]
    if not ratios or any(not 0 < f < 1 for f in ratios):
        raise ValueError(f"--ratios: expected ratios in (0, 1), got {ratios!r}")
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"--methods: expected magnitude and/or random, got {methods!r}")
    if distance not in ("projection", "retrained"):
        raise ValueError(f"--distance: expected 'projection' or 'retrained', got {distance!r}")
    tau = common.rewind_list(run, run.rewind_steps[0] if rewind_step is None else rewind_step)[0]
    reps = common.replicate_list(run, replicate)
    dense_error, eps_match = dense_and_eps(run, tau, eps_matching)
    params = {n for n, _ in run.build_model().named_parameters()}
    states, todo = {}, []
    for r in reps:
        path = paths.prune_scan_json(run, level, tau, r)
        state = common.read(path) or {}  # a corrupt one is recomputed
        same = state.get("seed", seed) == seed
        done = {(e["method"], e["ratio"]): e for e in state.get("results", []) if same}
        states[r] = done
        solution = run.solution(level, rewind_step=tau, replicate=r)
        masks = run.mask(level, rewind_step=tau, replicate=r)
        weights = {n: solution[n].float() for n in masks}
        for method in methods:
            for f in ratios:
                if (method, f) not in done:
                    new = _mask(weights, masks, method, f, seed)
                    R = float(sum(float((w * (~new[n])).pow(2).sum())
                                  for n, w in weights.items()) ** 0.5)
                    todo.append((r, method, f, new, R))
    if todo:
        written = set()

        def finished(i, sd, stats):
            r, method, f, _, R = todo[i]
            solution = run.solution(level, rewind_step=tau, replicate=r)
            entry = {"method": method, "ratio": f, "R_projection": R,
                     "R_retrained": _distance(sd, solution, params),
                     "test_error": stats["test_error"], "train_loss": stats.get("train_loss")}
            states[r][(method, f)] = entry
            matching = entry["test_error"] <= dense_error + eps_match
            log(f"replicate {r} {method:9s} f={f:.2f}: R={R:.4g}, test error "
                f"{entry['test_error']:.4f} -> {'matching' if matching else 'not matching'}")
            _write_replicate(run, level, tau, r, states[r], dense_error, eps_match, distance,
                             seed, draw=False)
            written.add(i)
        trained = run.retrain([t[3] for t in todo], rewind_step=tau,
                              replicate=[t[0] for t in todo], level=level, device=device,
                              on_result=finished)
        for i, (sd, stats) in enumerate(trained):
            if i not in written:  # under torchrun: trained by another rank
                finished(i, sd, stats)
    results = [_write_replicate(run, level, tau, r, states[r], dense_error, eps_match, distance,
                                seed, draw=len(reps) == 1) for r in reps]
    if replicate is not None and len(reps) == 1:
        return results[0]
    return _write_mean(run, level, tau, results, dense_error, eps_match, distance)


def _write_replicate(run, level, tau, r, done, dense_error, eps_match, distance, seed,
                     draw=True) -> Dict:
    from fastimp import theory
    from fastimp._io import save_json
    results = sorted(done.values(), key=lambda e: (e["method"], e["ratio"]))
    for e in results:   # Definition 2.2 with this call's tolerance
        e["matching"] = bool(e["test_error"] <= dense_error + eps_match)
    stats = run.stats(level, rewind_step=tau, replicate=r)
    rand = [e for e in results if e["method"] == "random" and e.get("train_loss") is not None]
    eps_train = None
    if len(rand) >= 2 and len({e["test_error"] for e in rand}) >= 2 and \
            stats.get("train_loss") is not None:
        eps_train = theory.train_loss_epsilon_appendix_b([e["train_loss"] for e in rand],
                                                         [e["test_error"] for e in rand],
                                                         dense_error, stats["train_loss"])
    state = {"level": level, "rewind_step": tau, "replicate": r, "seed": seed,
             "dense_error": dense_error, "eps_matching": eps_match, "eps_train": eps_train,
             "distance": distance, "results": results}
    path = paths.prune_scan_json(run, level, tau, r)
    save_json(state, path)
    if draw:
        plot_scan(run, state, path.with_suffix(".png"), distance)
    return state


def _write_mean(run, level, tau, states: List[Dict], dense_error, eps_match, distance) -> Dict:
    from fastimp._io import save_json
    keys = sorted({(e["method"], e["ratio"]) for s in states for e in s["results"]})
    rows = []
    for method, f in keys:
        es = [e for s in states for e in s["results"] if (e["method"], e["ratio"]) == (method, f)]
        row = {"method": method, "ratio": f, "replicates": len(es)}
        for k in ("test_error", "R_projection", "R_retrained", "train_loss"):
            ms = common.mean_std(e.get(k) for e in es)
            row[k], row[k + "_std"] = ms["mean"], ms["std"]
        row["matching"] = bool(row["test_error"] <= dense_error + eps_match)
        row["matching_replicates"] = sum(bool(e["matching"]) for e in es)
        rows.append(row)
    eps_train = common.mean_std(s.get("eps_train") for s in states)
    out = {"level": level, "rewind_step": tau, "replicates": [s["replicate"] for s in states],
           "dense_error": dense_error, "eps_matching": eps_match,
           "eps_train": eps_train["mean"], "eps_train_std": eps_train["std"],
           "distance": distance, "results": rows}
    path = paths.prune_scan_json(run, level, tau)
    save_json(out, path)
    plot_scan(run, out, path.with_suffix(".png"), distance)
    return out


def theory_curve(run, level, tau, replicate=None, eps=None):
    """(R, f_max) of level ``level`` from :mod:`fastimp.analysis.hessian`'s output (the mean over
    replicates when ``replicate`` is None), at ``eps`` when given, else None."""
    from fastimp.analysis.hessian import f_max_curve

    def read(path):
        return common.read_output(path, "fastimp hessian DIR --level L")
    if replicate is None:
        p = paths.hessian_summary_json(run, level, tau)
        if not p.exists():
            return None
        h = read(p)
        hs = [read(paths.hessian_json(run, level, tau, r)) for r in h["replicates"]
              if paths.hessian_json(run, level, tau, r).exists()]
    else:
        p = paths.hessian_json(run, level, tau, replicate)
        if not p.exists():
            return None
        h = read(p)
        hs = [h]
    R = np.asarray(h["curve"]["R"])
    if eps is None or not eps > 0 or not hs:
        return R, np.asarray(h["curve"]["f_max"])
    return R, np.mean([f_max_curve(run, x, R, eps=eps) for x in hs], axis=0)


def plot_scan(run, state, path, distance="projection"):
    plt = common.plt()
    level, tau, rep = state["level"], state["rewind_step"], state.get("replicate")
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for prev in range(level):
        c = theory_curve(run, prev, tau, rep)
        if c is not None:
            ax.plot(c[0], c[1], color="0.8", lw=1)
    c = theory_curve(run, level, tau, rep, state.get("eps_train"))
    if c is not None:
        ax.plot(c[0], c[1], "k-", lw=1.5, label="theory (Lemma 3.1)")
    key = "R_projection" if distance == "projection" else "R_retrained"
    styles = {("random", True): ("o", "tab:green", "random, matching"),
              ("random", False): ("x", "tab:red", "random, not matching"),
              ("magnitude", True): ("o", "tab:blue", "magnitude, matching"),
              ("magnitude", False): ("x", "tab:orange", "magnitude, not matching")}
    for (method, match), (marker, color, label) in styles.items():
        pts = [e for e in state["results"] if e["method"] == method and e["matching"] == match]
        if not pts:
            continue
        x = [e[key] for e in pts]
        xerr = [e.get(key + "_std") or 0.0 for e in pts]
        ax.errorbar(x, [e["ratio"] for e in pts], xerr=xerr if any(xerr) else None,
                    fmt=marker, color=color, label=label, mfc="none" if marker == "o" else None,
                    capsize=2)
    ax.set_xlabel("R = ||w(L) - m'⊙w(L)||" if distance == "projection"
                  else "R = ||w(L+1) - w(L)||")
    ax.set_ylabel("pruning ratio f")
    ax.set_ylim(0, 1)
    n = len(state.get("replicates", [0])) if rep is None else 1
    ax.set_title(f"level {level}: pruning-ratio scan" + (f" (mean of {n})" if n > 1 else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, path)
