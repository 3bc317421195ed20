"""Figs. 3 and 6 (Appendix B, "Error landscape of an IMP step", "Small weights are correlated with
flat directions"): 2-D slices of the test error through three points, per replicate and averaged.

``kind="imp"`` (Fig. 3): w^(L), its projection m^(L+1) ⊙ w^(L) and w^(L+1).
``kind="pruning"`` (Fig. 6): w^(L) and its ``ratio`` magnitude and random pruning projections.

Every replicate's plane is evaluated in one shared frame (the mean of the replicates' own frames,
``fastimp.landscape.plane.plane_frame``), so that the three points sit at the same place in every
replicate's grid — as the paper fixes their positions — and the error grids can be averaged: the
mean grid is ``analysis/plane_<kind>_tau<t>_L<L>.json``, each replicate's (with its own geometry in
``own_points``) ``analysis/replicates/plane_<kind>_tau<t>_L<L>_rep<r>.json``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fastimp.analysis import common, paths
from fastimp.landscape.plane import plane, plane_frame, project

KINDS = ("imp", "pruning")


LABELS = {"imp": ("w(L)", "m(L+1)⊙w(L)", "w(L+1)"), "pruning": ("w(L)", "magnitude", "random")}
SCALES = {"imp": "fit", "pruning": "equal"}


def _points(run, kind, level, tau, r, ratio, seed, model):
    """The three points (p0 a state dict, p1 and p2 flat vectors or state dicts) of one
    replicate's plane: w^(L), m^(L+1) ⊙ w^(L), w^(L+1) or w^(L) and its magnitude and random
    pruning projections."""
    w = run.solution(level, tau, r)
    if kind == "imp":
        return w, project(model, w, run.mask(level + 1, tau, r)), run.solution(level + 1, tau, r)
    from fastimp.pruning import prune_magnitude, prune_random
    model.load_state_dict(w)
    current = run.mask(level, tau, r)
    mag = prune_magnitude(model, ratio, masks=current)
    rnd = prune_random(model, ratio, masks=current,
                       generator=torch.Generator().manual_seed(seed))
    return w, project(model, w, mag), project(model, w, rnd)


def _point_errors(model, pts, data, ekw) -> List[float]:
    """The test error at the three points themselves."""
    from fastimp.landscape.evaluate import evaluate
    from fastimp.landscape.space import StateLayout
    layout = StateLayout(model)
    w0 = layout.flatten(pts[0])
    U = torch.stack([layout.flatten(p).to(w0.device) - w0 for p in pts[1:]])
    ev = evaluate(model, w0, U, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), data, **ekw)
    return [float(e) for e in ev.error]


def plane_analysis(run, level: int, kind: str = "imp", rewind_step: Optional[int] = None,
                   replicate=None, grid: int = 51, ratio: float = 0.2, seed: int = 0,
                   max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                   device=None, eps: Optional[float] = None, bn: str = "interpolate",
                   bn_examples: Optional[int] = 2048, chunk_size: Optional[int] = None,
                   resume: bool = False) -> Dict:
    """Fig. 3 (``kind="imp"``) or Fig. 6 (``kind="pruning"``) at ``level`` on a grid x grid slice
    for ``replicate`` (None: every replicate, then the mean grid). Returns the mean (or the one
    replicate's) result; ``resume`` skips replicate files written with the same parameters."""
    if kind not in KINDS:
        raise ValueError(f"--kind: expected 'imp' or 'pruning', got {kind!r}")
    if isinstance(level, bool) or not isinstance(level, int):
        raise ValueError(f"--level: expected an int, got {level!r}")
    device = common.default_device(device)
    tau = common.rewind_list(run, run.rewind_steps[0] if rewind_step is None else rewind_step)[0]
    reps = common.replicate_list(run, replicate)
    for r in reps:
        levels = run.levels(tau, r)
        if level not in levels:
            raise ValueError(f"--level: level {level} is not finished for rewind step {tau} "
                             f"(replicate {r}; finished: {levels})")
        if kind == "imp" and level + 1 not in levels:
            raise ValueError(f"--level: the IMP-step plane needs level {level + 1} too "
                             f"(replicate {r}; finished: {levels})")
    model = run.build_model()
    pts = {r: _points(run, kind, level, tau, r, ratio, seed, model) for r in reps}
    frames = {r: plane_frame(model, *pts[r]) for r in reps}
    frame = torch.stack([frames[r] for r in reps]).mean(0)
    params = {"kind": kind, "level": level, "rewind_step": tau, "replicates": reps, "grid": grid,
              "ratio": ratio if kind == "pruning" else None,
              "seed": seed if kind == "pruning" else None, "max_examples": max_examples,
              "bn": bn, "bn_examples": bn_examples if bn == "reset" else None, "eps": eps,
              "frame": frame.tolist()}
    mean_path = paths.plane_json(run, kind, level, tau)
    if resume:
        done = common.current(mean_path, params)
        if done is not None and all(
                common.current(paths.plane_json(run, kind, level, tau, r),
                               dict(params, replicates=[r])) is not None for r in reps):
            return done
    data = common.load_data(run, "test", max_examples, batch_size, device)
    ekw = common.eval_kwargs(run, device, bn, bn_examples, chunk_size)
    results = []
    for r in reps:
        rep_params = dict(params, replicates=[r])
        path = paths.plane_json(run, kind, level, tau, r)
        done = common.current(path, rep_params) if resume else None
        if done is None:
            me = common.matching_error(run, tau, model, data, r, eps, **ekw)
            res = plane(model, *pts[r], data, grid=grid, frame=frame, scale=SCALES[kind],
                        labels=LABELS[kind], matching_error=me["matching_error"], **ekw)
            done = common.write(path, rep_params, {
                "kind": kind, "level": level, "rewind_step": tau, "replicate": r, "grid": grid,
                "bn": bn, "matching": me, "ratio": ratio if kind == "pruning" else None,
                "point_error": _point_errors(model, pts[r], data, ekw), **res.to_dict()})
        results.append(done)
    out = mean_plane(results, reps)
    out = common.write(mean_path, params, out)
    _plot(out, mean_path.with_suffix(".png"))
    return out


def mean_plane(results: List[Dict], reps: Sequence[int]) -> Dict:
    """The mean (and std) error and loss grids of replicate planes evaluated in one frame."""
    first = results[0]
    out = {k: first[k] for k in ("kind", "level", "rewind_step", "grid", "bn", "ratio", "xs", "ys",
                                 "points", "labels")}
    out["replicates"] = list(reps)
    for key in ("error", "loss"):
        out[key], out[key + "_std"] = common.mean_std_arrays([r[key] for r in results])
    dense = common.mean_std(r["matching"]["dense_error"] for r in results)
    m0 = first["matching"]
    out["matching"] = {"dense_error": dense["mean"], "eps": m0["eps"],
                       "eps_source": m0["eps_source"],
                       "matching_error": None if dense["mean"] is None
                       else dense["mean"] + (m0["eps"] or 0.0)}
    out["matching_error"] = out["matching"]["matching_error"]
    out["own_points"] = [r["own_points"] for r in results]
    out["point_error"], out["point_error_std"] = common.mean_std_arrays(
        [r["point_error"] for r in results])
    return out


def title(res: Dict) -> Optional[str]:
    """The figure's title: the default one (``plot_plane``'s) for one replicate, else saying that
    it is the mean of several."""
    n = len(res.get("replicates", [0]))
    if n < 2:
        return None
    L, tau = res["level"], res["rewind_step"]
    if res["kind"] == "imp":
        return f"Error landscape of IMP step {L} → {L + 1} (rewind step {tau}; mean of {n})"
    return f"Magnitude vs random pruning of w({L}) (rewind step {tau}; mean of {n})"


def _plot(res: Dict, png):
    from fastimp.landscape.figures import plot_plane
    common.save_fig(plot_plane(res, res["kind"], title(res)), png)


def plot(res: Dict, png):
    _plot(res, png)
