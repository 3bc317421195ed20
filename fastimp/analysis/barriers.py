"""Fig. 2 (Appendix B, "Error Connectivity of IMP Solutions"): the test error along the piecewise
linear path w^(0) -> w^(1) -> ... for every rewind step, and the matrix of
max_beta E((1 - beta) w^(i) + beta w^(j)) over all pairs of levels, each computed per replicate and
shown as the mean (± std) over replicates ("the mean and standard deviation of 4 independent
runs"). Writes ``analysis/barrier.json`` and its two PNGs."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fastimp.analysis import common, paths
from fastimp.landscape.barrier import barrier_matrix, path_through

SEGMENT_KEYS = ("barrier", "loss_barrier", "max_error", "midpoint_error")
MATRIX_KEYS = ("max_error", "barrier", "midpoint_error")


def mean_paths(per_replicate: List[Dict]) -> Dict[str, Dict]:
    """Per rewind step, the path over the levels every replicate has: error (and loss) per beta
    and the segment quantities, mean over replicates with their std (``*_std``)."""
    out = {}
    taus = set.intersection(*[set(p["paths"]) for p in per_replicate]) if per_replicate else set()
    for tau in sorted(taus, key=int):
        paths_r = [p["paths"][tau] for p in per_replicate]
        n = min(len(p["levels"]) for p in paths_r)
        levels = paths_r[0]["levels"][:n]
        segments = []
        for s in range(n - 1):
            segs = [p["segments"][s] for p in paths_r]
            seg = {"betas": segs[0]["betas"]}
            for key in ("error", "loss"):
                seg[key], seg[key + "_std"] = common.mean_std_arrays([g[key] for g in segs])
            for key in SEGMENT_KEYS:
                ms = common.mean_std(g[key] for g in segs)
                seg[key], seg[key + "_std"] = ms["mean"], ms["std"]
            segments.append(seg)
        out[tau] = {"levels": levels, "segments": segments, "replicates": len(paths_r)}
    return out


def mean_matrix(matrices: List[Dict]) -> Optional[Dict]:
    if not matrices:
        return None
    n = min(len(m["levels"]) for m in matrices)
    out = {"rewind_step": matrices[0]["rewind_step"], "levels": matrices[0]["levels"][:n],
           "replicates": len(matrices)}
    for key in MATRIX_KEYS:
        out[key], out[key + "_std"] = common.mean_std_arrays(
            [[row[:n] for row in m[key][:n]] for m in matrices])
    return out


def barrier_analysis(run, rewind_steps: Optional[Sequence[int]] = None, replicate=None,
                     betas=None, matrix_rewind_step: Optional[int] = None, matrix: bool = True,
                     max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                     device=None, eps: Optional[float] = None, bn: str = "interpolate",
                     bn_examples: Optional[int] = 2048, chunk_size: Optional[int] = None,
                     resume: bool = False) -> Dict:
    """Fig. 2 for ``replicate`` (None: every replicate, then their mean): the path through every
    level per rewind step and the barrier matrix of one rewind step (default: the last, the
    paper's matching rewind step). ``resume``: return ``barrier.json`` untouched when it was
    written with the same parameters and the same finished levels."""
    device = common.default_device(device)
    taus = common.rewind_list(run, rewind_steps)
    reps = common.replicate_list(run, replicate)
    mtau = taus[-1] if matrix_rewind_step is None else int(matrix_rewind_step)
    if not any(run.levels(t, r) for t in set(taus) | {mtau} for r in reps):
        raise ValueError(f"{run.dir}: nothing to compute yet, no level has finished; run (or "
                         "resume) `fastimp imp` with the same arguments first")
    params = {"rewind_steps": taus, "replicates": reps, "betas": betas, "matrix": matrix,
              "matrix_rewind_step": mtau, "max_examples": max_examples, "bn": bn,
              "bn_examples": bn_examples if bn == "reset" else None, "eps": eps,
              "levels": {f"{t}/{r}": run.levels(t, r) for t in sorted(set(taus) | {mtau})
                         for r in reps}}
    if resume:
        done = common.current(paths.barrier_json(run), params)
        if done is not None:
            return done
    model = run.build_model()
    data = common.load_data(run, "test", max_examples, batch_size, device)
    ekw = common.eval_kwargs(run, device, bn, bn_examples, chunk_size)
    per_rep = []
    for r in reps:
        entry = {"replicate": r, "paths": {}}
        for tau in taus:
            levels = run.levels(tau, r)
            if len(levels) < 2:
                continue
            sols = [run.solution(L, tau, r) for L in levels]
            entry["paths"][str(tau)] = path_through(model, sols, data, betas=betas, levels=levels,
                                                    **ekw).to_dict()
        if matrix:
            levels = run.levels(mtau, r)
            if levels:
                sols = [run.solution(L, mtau, r) for L in levels]
                res = barrier_matrix(model, sols, data, betas=betas, levels=levels, **ekw)
                entry["matrix"] = {"rewind_step": mtau, **res.to_dict()}
        per_rep.append(entry)
    out = {"bn": bn, "replicates": reps, "n_examples": sum(len(y) for _, y in data),
           "paths": mean_paths(per_rep),
           "matching": common.matching_error(run, mtau, model, data, reps, eps, **ekw)}
    m = mean_matrix([e["matrix"] for e in per_rep if "matrix" in e])
    if m is not None:
        out["matrix"] = m
    out["per_replicate"] = per_rep
    out = common.write(paths.barrier_json(run), params, out)
    plot(out, *paths.barrier_pngs(run))
    return out


def plot(result: Dict, path_png, matrix_png):
    """Fig. 2's two panels from ``barrier.json``: the mean paths (± std band) and the mean matrix."""
    if result.get("paths"):
        plot_path(result, path_png)
    if result.get("matrix"):
        plot_matrix(result, matrix_png)


def plot_path(result: Dict, png):
    from fastimp.landscape.figures import plot_paths
    fig = plot_paths(result["paths"], result["matching"]["matching_error"])
    _std_bands(fig.axes[0], result["paths"])
    common.save_fig(fig, png)


def plot_matrix(result: Dict, png):
    from fastimp.landscape.figures import plot_barrier_matrix
    common.save_fig(plot_barrier_matrix(result["matrix"], result["matching"]["matching_error"]),
                    png)


def _std_bands(ax, mean_paths_: Dict):
    from fastimp.landscape.figures import _TAU_COLORS
    for i, (tau, p) in enumerate(sorted(mean_paths_.items(), key=lambda kv: int(kv[0]))):
        if p.get("replicates", 1) < 2:
            continue
        for s, seg in enumerate(p["segments"]):
            x0, x1 = p["levels"][s], p["levels"][s + 1]
            xs = [x0 + b * (x1 - x0) for b in seg["betas"]]
            lo = [100 * (e - d) for e, d in zip(seg["error"], seg["error_std"])]
            hi = [100 * (e + d) for e, d in zip(seg["error"], seg["error_std"])]
            ax.fill_between(xs, lo, hi, color=_TAU_COLORS[i % len(_TAU_COLORS)], alpha=0.2, lw=0)
