"""The landscape analyses on an IMP run folder (``fastimp barrier``, ``fastimp plane``): they read
solutions and masks through :func:`fastimp.imp.load_run` and write JSON and PNG into
``run.analysis_dir``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from fastimp.landscape.barrier import barrier_matrix, path_through
from fastimp.landscape.evaluate import evaluate
from fastimp.landscape.figures import plot_barrier_matrix, plot_paths, plot_plane
from fastimp.landscape.plane import imp_step_plane, pruning_plane
from fastimp.landscape.space import StateLayout

BARRIER_JSON = "barrier.json"


def save_json_atomic(obj, path) -> Path:
    from fastimp._io import save_json
    return save_json(obj, path)


def plane_json(kind: str, level: int, rewind_step: int) -> str:
    return f"plane_{kind}_tau{rewind_step}_L{level}.json"


def load_data(run, split: str = "test", max_examples: Optional[int] = None,
              batch_size: Optional[int] = None, device="cpu") -> List:
    """The split as a list of (x, y) batches on ``device`` (read once, reused by every chunk)."""
    it = run.test_data(batch_size, device="cpu") if split == "test" else \
        run.train_data(batch_size, device="cpu")
    out, n = [], 0
    for x, y in it:
        if max_examples is not None:
            x, y = x[:max_examples - n], y[:max_examples - n]
        if len(y) == 0:
            break
        out.append((x.to(device), y.to(device)))
        n += len(y)
        if max_examples is not None and n >= max_examples:
            break
    if not out:
        raise ValueError(f"the run's {split} set is empty")
    return out


def matching_error(run, rewind_step: int, model, data, replicate: int = 0,
                   eps: Optional[float] = None, **ekw) -> Dict:
    """E(w_T) + eps (Definition 2.2) for the contours, with E(w_T) the dense (level 0) solution's
    error on the same examples the landscape is evaluated on; eps: given, else the run's (std of
    the dense replicates' test errors), else 0 with one replicate."""
    if 0 not in run.levels(rewind_step, replicate):
        return {"matching_error": None, "dense_error": None, "eps": eps,
                "eps_source": "no dense level"}
    ev = evaluate(model, run.solution(0, rewind_step, replicate),
                  torch.zeros(0, StateLayout(model).D), torch.zeros(1, 0), data, **ekw)
    dense = float(ev.error[0])
    source = "given"
    if eps is None:
        try:
            summ = [s for s in run.summary() if s["rewind_step"] == rewind_step and s["level"] == 0]
            eps, source = (summ[0]["eps"], summ[0]["eps_source"]) if summ else (None, "none")
        except Exception:  # pragma: no cover - the summary is the IMP module's
            eps = None
        if eps is None:
            eps, source = 0.0, "one replicate: eps = 0 (pass --eps)"
    return {"matching_error": dense + eps, "dense_error": dense, "eps": eps, "eps_source": source}


def _eval_kw(args_kw: Dict, run, device) -> Dict:
    kw = {k: v for k, v in args_kw.items() if v is not None}
    if kw.get("bn") == "reset":
        kw["train_data"] = load_data(run, "train", kw.pop("bn_examples", None), device=device)
    kw.pop("bn_examples", None)
    return kw


def barrier_analysis(run, rewind_steps: Optional[Sequence[int]] = None, replicate: int = 0,
                     betas=None, matrix_rewind_step: Optional[int] = None, matrix: bool = True,
                     max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                     device="cpu", eps: Optional[float] = None, **kw) -> Dict:
    """Fig. 2: the path through every level per rewind step, and the barrier matrix of one rewind
    step (default: the last one, the paper's matching rewind step)."""
    taus = list(run.rewind_steps if rewind_steps is None else rewind_steps)
    model = run.build_model()
    data = load_data(run, "test", max_examples, batch_size, device)
    ekw = _eval_kw(kw, run, device)
    out = {"bn": ekw.get("bn", "interpolate"), "replicate": replicate, "paths": {},
           "n_examples": sum(len(y) for _, y in data)}
    for tau in taus:
        levels = run.levels(tau, replicate)
        if len(levels) < 2:
            continue
        sols = [run.solution(L, tau, replicate) for L in levels]
        out["paths"][str(tau)] = path_through(model, sols, data, betas=betas, levels=levels,
                                              device=device, **ekw).to_dict()
    mtau = taus[-1] if matrix_rewind_step is None else matrix_rewind_step
    out["matching"] = matching_error(run, mtau, model, data, replicate, eps, device=device, **ekw)
    if matrix:
        levels = run.levels(mtau, replicate)
        if levels:
            sols = [run.solution(L, mtau, replicate) for L in levels]
            res = barrier_matrix(model, sols, data, betas=betas, levels=levels, device=device, **ekw)
            out["matrix"] = {"rewind_step": mtau, **res.to_dict()}
    d = run.analysis_dir
    save_json_atomic(out, d / BARRIER_JSON)
    me = out["matching"]["matching_error"]
    if out["paths"]:
        plot_paths(out["paths"], me, str(d / "barrier_path.png"))
    if "matrix" in out:
        plot_barrier_matrix(out["matrix"], me, str(d / "barrier_matrix.png"))
    return out


def plane_analysis(run, level: int, kind: str = "imp", rewind_step: Optional[int] = None,
                   replicate: int = 0, grid: int = 51, ratio: float = 0.2, seed: int = 0,
                   max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                   device="cpu", eps: Optional[float] = None, **kw) -> Dict:
    """Fig. 3 (``kind="imp"``: w^(L), m^(L+1) ⊙ w^(L), w^(L+1)) or Fig. 6 (``kind="pruning"``:
    w^(L) and its ``ratio`` magnitude and random pruning projections) on a grid x grid slice."""
    tau = run.rewind_steps[0] if rewind_step is None else int(rewind_step)
    levels = run.levels(tau, replicate)
    if level not in levels:
        raise ValueError(f"--level: level {level} is not finished for rewind step {tau} "
                         f"(finished: {levels})")
    model = run.build_model()
    data = load_data(run, "test", max_examples, batch_size, device)
    ekw = _eval_kw(kw, run, device)
    w = run.solution(level, tau, replicate)
    me = matching_error(run, tau, model, data, replicate, eps, device=device, **ekw)
    if kind == "imp":
        if level + 1 not in levels:
            raise ValueError(f"--level: the IMP-step plane needs level {level + 1} too "
                             f"(finished: {levels})")
        res = imp_step_plane(model, w, run.mask(level + 1, tau, replicate),
                             run.solution(level + 1, tau, replicate), data, grid=grid,
                             device=device, matching_error=me["matching_error"], **ekw)
    elif kind == "pruning":
        from fastimp.pruning import prune_magnitude, prune_random
        model.load_state_dict(w)
        current = run.mask(level, tau, replicate)
        mag = prune_magnitude(model, ratio, masks=current)
        rnd = prune_random(model, ratio, masks=current,
                           generator=torch.Generator().manual_seed(seed))
        res = pruning_plane(model, w, mag, rnd, data, grid=grid, device=device,
                            matching_error=me["matching_error"], **ekw)
    else:
        raise ValueError(f"--kind: expected 'imp' or 'pruning', got {kind!r}")
    out = {"kind": kind, "level": level, "rewind_step": tau, "replicate": replicate,
           "grid": grid, "bn": ekw.get("bn", "interpolate"), "matching": me, **res.to_dict()}
    if kind == "pruning":
        out["ratio"] = ratio
    d = run.analysis_dir
    name = plane_json(kind, level, tau)
    save_json_atomic(out, d / name)
    title = (f"level {level} -> {level + 1}" if kind == "imp" else
             f"level {level}: magnitude vs random {ratio:g}") + f" (rewind step {tau})"
    plot_plane(out, kind, title, str(d / name.replace(".json", ".png")))
    return out
