"""Fig. 5's theory (Section 3.3, Lemma 3.1, Appendix B "Threshold training dimension"): the Hessian
of the train loss at the level-L solution, restricted to its mask (top eigenvalues, trace, SLQ
density), and Lemma 3.1's intersection threshold d*(R) and largest pruning ratio f_max(R).

Per replicate: ``analysis/hessian/level_<L>_rewind_<t>_rep_<r>/{hessian.json, density.npz,
density.png, threshold.png}``; over replicates: ``analysis/hessian/level_<L>_rewind_<t>.json``
(mean ± std of the top eigenvalue, the trace, ε and f_max on a common R grid).

What Lemma 3.1 does with eigenvalues <= 0 is the named option ``nonpositive`` ("flat": fully flat,
the default; "exclude": dropped, see ``fastimp.theory``), recorded in hessian.json with the
spectral weight it concerns; ε is recorded with its source. Both only enter the threshold part:
a rerun that changes only them keeps the spectrum (density.npz, eigenvalues, trace) and
recomputes the threshold part from it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from fastimp.analysis import common, paths

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def projection_distances(model_state, masks, ratios, method="magnitude", seed=0) -> List[float]:
    """R(f) = ||w^(L) − m'⊙w^(L)||_2 of pruning a further fraction f of the unmasked weights."""
    import torch

    from fastimp.pruning import prune_magnitude, prune_random
    weights = {n: model_state[n].float() for n in masks}
    out = []
    for f in ratios:
        if method == "magnitude":
            new = prune_magnitude(weights, f, masks=masks)
        else:
            new = prune_random(weights, f, masks=masks,
                               generator=torch.Generator().manual_seed(seed))
        sq = sum(float((w * (~new[n].to(w.device))).pow(2).sum()) for n, w in weights.items())
        out.append(sq ** 0.5)
    return out


def epsilon(run, level: int, rewind_step: int, replicate: int, eps: Optional[float] = None):
    """(ε, source) of the train-loss sublevel set: given; else Appendix B's estimate from the
    pruning-ratio scan at this level (``fastimp prune-scan``) if present; else the std of the dense
    run's per-batch train loss over its last epoch (Appendix F)."""
    if eps is not None:
        return float(eps), "given (--eps)"
    path = paths.prune_scan_json(run, level, rewind_step, replicate)
    if path.exists():
        e = common.read_output(path, "fastimp prune-scan DIR --level L").get("eps_train")
        if e is not None and e > 0:
            return float(e), "Appendix B (fit of train loss vs test error, prune-scan)"
    stats = run.stats(0, rewind_step=rewind_step, replicate=replicate)
    e = stats.get("train_loss_epsilon")
    if e is None or not e > 0:
        raise ValueError("--eps: not given and the dense level recorded no train_loss_epsilon")
    return float(e), "Appendix F (std of the dense run's per-batch train loss, last epoch)"


# what only the threshold part depends on: a change of these keeps the spectrum
THRESHOLD_PARAMS = ("eps", "nonpositive")


def hessian_analysis(run, level: int, rewind_step: Optional[int] = None, replicate=None, *,
                     top_n: int = 5, tol: float = 1e-4, iterations: int = 128, runs: int = 4,
                     trace_samples: int = 100, subset: Optional[int] = None,
                     batch_size: Optional[int] = None, probes_per_pass: int = 16,
                     weight_decay: float = 0.0, eps: Optional[float] = None,
                     nonpositive: str = "flat", sigma: Optional[float] = None, seed: int = 0,
                     device=None, resume: bool = False, log=print) -> Dict:
    """Fig. 5's theory at ``level`` for ``replicate`` (None: every replicate, then the summary);
    returns the summary (or the one replicate's hessian.json). ``resume`` skips replicates whose
    hessian.json was written with the same parameters. A replicate whose spectrum was computed
    with the same parameters but another ε or ``nonpositive`` keeps its spectrum (density.npz):
    only the threshold part is recomputed."""
    from fastimp import theory
    theory._check_nonpositive(nonpositive)
    tau = common.rewind_list(run, run.rewind_steps[0] if rewind_step is None else rewind_step)[0]
    reps = common.replicate_list(run, replicate)
    device = common.default_device(device)
    results = []
    for r in reps:
        params = {"level": level, "rewind_step": tau, "replicate": r, "top_n": top_n, "tol": tol,
                  "iterations": iterations, "runs": runs, "trace_samples": trace_samples,
                  "subset": subset, "probes_per_pass": probes_per_pass,
                  "weight_decay": weight_decay, "seed": seed, "nonpositive": nonpositive,
                  "eps": list(epsilon(run, level, tau, r, eps))}
        path = paths.hessian_json(run, level, tau, r)
        done = common.current(path, params) if resume else None
        if done is None:
            spectrum = _same_spectrum(run, path, params)
            if spectrum is not None:
                log(f"hessian: level {level}, replicate {r}: the spectrum is there, recomputing "
                    f"the threshold only (eps {params['eps'][0]:.4g}, nonpositive "
                    f"{nonpositive!r})")
                done = _threshold(run, level, tau, r, params, *spectrum, log)
            else:
                done = _one(run, level, tau, r, params, batch_size, sigma, device, log)
        results.append(done)
    if replicate is not None and len(reps) == 1:
        return results[0]
    return summarize(run, level, tau, results, nonpositive)


def _same_spectrum(run, path, params):
    """(hessian.json without its threshold part, the saved density) when ``path`` was written
    with ``params`` but for ``THRESHOLD_PARAMS`` (which differ), else None."""
    from fastimp.hessian import SpectralDensity
    old = common.read(path)
    if old is None:
        return None
    want, have = common.normalized(params), old.get("params") or {}

    def spectrum_params(p):
        return {k: v for k, v in p.items() if k not in THRESHOLD_PARAMS}
    if have == want or spectrum_params(have) != spectrum_params(want):
        return None
    npz = path.parent / old.get("density", paths.DENSITY_NPZ)
    if not npz.exists():
        return None
    try:
        density = SpectralDensity.load(npz)
    except (OSError, ValueError, KeyError):
        return None
    keep = {k: v for k, v in old.items() if k not in ("params",) + THRESHOLD_KEYS}
    return keep, density


# the keys of hessian.json that _threshold writes
THRESHOLD_KEYS = ("eps", "eps_source", "nonpositive", "nonpositive_weight", "curve",
                  "magnitude_projection", "f_max_magnitude_projection")


def _one(run, level, tau, r, params, batch_size, sigma, device, log) -> Dict:
    """The spectrum (top eigenvalues, trace, SLQ density) and then the threshold part."""
    import torch.nn.functional as F

    from fastimp.hessian import Hessian
    model = run.build_model()
    solution = run.solution(level, rewind_step=tau, replicate=r)
    model.load_state_dict(solution)
    model.to(device)
    masks = run.mask(level, rewind_step=tau, replicate=r)
    data = run.train_data(batch_size=batch_size, device=device)
    hess = Hessian(model, F.cross_entropy, data, dict(masks), seed=params["seed"],
                   subset=params["subset"], probes_per_pass=params["probes_per_pass"],
                   weight_decay=params["weight_decay"], distributed=common.split_over_ranks())
    log(f"hessian: level {level}, replicate {r}, D_A = {hess.D_A}, "
        f"{hess.op.num_examples} examples, device {device}")
    top_n = params["top_n"]
    eigenvalues, _ = hess.eigenvalues(top_n=min(top_n, hess.D_A), tol=params["tol"],
                                      max_iter=max(100, 4 * top_n))
    log("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in eigenvalues))
    samples = hess.trace(n_samples=params["trace_samples"])
    tr = float(np.mean(samples))
    tr_err = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 \
        else float("nan")
    log(f"trace: {tr:.5g} ± {tr_err:.2g}")
    density = hess.density(iterations=params["iterations"], n_runs=params["runs"])
    density.meta.update({"level": level, "rewind_step": tau, "replicate": r})
    density.save(paths.hessian_density(run, level, tau, r))
    density.plot(paths.hessian_pngs(run, level, tau, r)[0], sigma=sigma,
                 title=f"Hessian spectrum, level {level} (D_A = {hess.D_A})")
    spectrum = {
        "level": level, "rewind_step": tau, "replicate": r,
        "D_A": hess.D_A, "n_prunable_remaining": int(masks.remaining()),
        "num_examples": hess.op.num_examples, "weight_decay": params["weight_decay"],
        "batchnorm": "eval", "eigenvalues": eigenvalues, "trace": tr, "trace_stderr": tr_err,
        "trace_samples": len(samples), "density": paths.DENSITY_NPZ,
        "density_iterations": density.meta["iterations"], "density_runs": params["runs"]}
    return _threshold(run, level, tau, r, params, spectrum, density, log)


def _threshold(run, level, tau, r, params, spectrum: Dict, density, log) -> Dict:
    """Lemma 3.1 from the spectrum: d*(R), f_max(R) and f_max at magnitude pruning's projection
    distances, with ε and the choice for λ <= 0 of ``params``; writes hessian.json and
    threshold.png."""
    from fastimp import theory
    solution = run.solution(level, rewind_step=tau, replicate=r)
    masks = run.mask(level, rewind_step=tau, replicate=r)
    eps, eps_source = params["eps"]
    neg = params["nonpositive"]
    ratios = list(DEFAULT_RATIOS)
    R_mag = projection_distances(solution, masks, ratios)
    R_grid = np.linspace(0.0, 1.5 * max(R_mag + [1e-12]), 101)
    d_star = theory.intersection_threshold(density, eps, R_grid, nonpositive=neg)
    f_max = theory.max_pruning_ratio(density, eps, R_grid, n_prunable=masks.remaining(),
                                     nonpositive=neg)
    f_mag = theory.max_pruning_ratio(density, eps,
                                     lambda f: float(np.interp(f, [0] + ratios, [0] + R_mag)),
                                     n_prunable=masks.remaining(), nonpositive=neg)
    result = dict(spectrum, **{
        "eps": eps, "eps_source": eps_source,
        "nonpositive": neg, "nonpositive_weight": theory.nonpositive_weight(density),
        "curve": {"R": R_grid.tolist(), "d_star": np.asarray(d_star).tolist(),
                  "f_max": np.asarray(f_max).tolist()},
        "magnitude_projection": {"ratio": ratios, "R": R_mag},
        "f_max_magnitude_projection": f_mag,
    })
    result = common.write(paths.hessian_json(run, level, tau, r), params, result)
    plot_threshold(result, paths.hessian_pngs(run, level, tau, r)[1])
    log(f"eps = {eps:.4g} ({eps_source}); largest pruning ratio with magnitude pruning's "
        f"projection distance: {f_mag:.3f}")
    return result


def f_max_curve(run, h: Dict, R, eps: Optional[float] = None, nonpositive: Optional[str] = None):
    """f_max(R) of one replicate's hessian.json at the distances ``R`` (its own ε and choice for
    λ <= 0 unless given), from its saved density."""
    from fastimp import theory
    from fastimp.hessian import SpectralDensity
    d = paths.hessian_dir(run, h["level"], h["rewind_step"], h["replicate"])
    dens = SpectralDensity.load(d / h.get("density", paths.DENSITY_NPZ))
    return np.asarray(theory.max_pruning_ratio(
        dens, h["eps"] if eps is None else eps, np.asarray(R), n_prunable=h["n_prunable_remaining"],
        nonpositive=nonpositive or h.get("nonpositive", "flat")))


def summarize(run, level: int, tau: int, results: Sequence[Dict], nonpositive: str) -> Dict:
    """Mean ± std over replicates, with f_max on one R grid (up to the largest replicate's)."""
    from fastimp.distributed import barrier
    barrier()  # under torchrun: rank 0 has written the densities read here
    R = np.linspace(0.0, max(max(h["curve"]["R"]) for h in results), 101)
    curves = [f_max_curve(run, h, R) for h in results]
    f_mean, f_std = common.mean_std_arrays(curves)
    top = [h["eigenvalues"][0] for h in results if h["eigenvalues"]]
    out = {"level": level, "rewind_step": tau, "replicates": [h["replicate"] for h in results],
           "D_A": common.mean_std(h["D_A"] for h in results),
           "top_eigenvalue": common.mean_std(top),
           "trace": common.mean_std(h["trace"] for h in results),
           "eps": common.mean_std(h["eps"] for h in results),
           "eps_source": sorted({h["eps_source"] for h in results}),
           "nonpositive": nonpositive,
           "nonpositive_weight": common.mean_std(h.get("nonpositive_weight") for h in results),
           "f_max_magnitude_projection": common.mean_std(h["f_max_magnitude_projection"]
                                                         for h in results),
           "magnitude_projection": {
               "ratio": results[0]["magnitude_projection"]["ratio"],
               "R": common.mean_std_arrays([h["magnitude_projection"]["R"] for h in results])[0]},
           "curve": {"R": R.tolist(), "f_max": f_mean, "f_max_std": f_std}}
    from fastimp._io import save_json
    path = paths.hessian_summary_json(run, level, tau)
    save_json(out, path)
    plot_threshold(out, path.with_suffix(".png"))
    return out


def caption(h: Dict) -> str:
    """What Fig. 5's theory curve assumed: ε with its source and the choice for λ <= 0."""
    eps = h["eps"]["mean"] if isinstance(h["eps"], dict) else h["eps"]
    src = h["eps_source"] if isinstance(h["eps_source"], str) else "; ".join(h["eps_source"])
    neg = h.get("nonpositive", "flat")
    w = h.get("nonpositive_weight")
    w = w["mean"] if isinstance(w, dict) else w
    what = ("counted as fully flat (r = ∞)" if neg == "flat"
            else "dropped, the rest of the spectrum renormalized")
    share = f" ({100 * w:.1f}% of the spectral weight)" if w is not None else ""
    return f"ε = {eps:.3g} ({src}); eigenvalues λ ≤ 0{share}: \"{neg}\", {what}"


def plot_threshold(result, path):
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    c = result["curve"]
    ax.plot(c["R"], c["f_max"], "k-", label="theory: max pruning ratio (Lemma 3.1)")
    if "f_max_std" in c:
        lo = np.asarray(c["f_max"]) - np.asarray(c["f_max_std"])
        hi = np.asarray(c["f_max"]) + np.asarray(c["f_max_std"])
        ax.fill_between(c["R"], lo, hi, color="k", alpha=0.15, lw=0)
    mp = result["magnitude_projection"]
    ax.plot(mp["R"], mp["ratio"], "b.--", alpha=0.6, label="magnitude pruning: R(f)")
    ax.set_xlabel("projection distance R")
    ax.set_ylabel("pruning ratio f")
    ax.set_ylim(0, 1)
    eps = result["eps"]["mean"] if isinstance(result["eps"], dict) else result["eps"]
    ax.set_title(f"level {result['level']}: ε = {eps:.3g}, λ ≤ 0 "
                 f"{result.get('nonpositive', 'flat')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, path)
