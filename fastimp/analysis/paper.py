"""``fastimp paper DIR``: every analysis of the paper that applies to a run folder, resumably, then
the report with one section per figure (Figs. 2-11).

Steps (``STEPS``), each skipping what is already written with the same parameters:

=================  ======================================================  ==================
step               what                                                    figure
=================  ======================================================  ==================
barriers           paths through every level, barrier matrix               Fig. 2
planes_imp         the IMP-step plane at each level asked, every rewind    Fig. 3
robustness         perturbations at the rewind point (IMP-WR runs)         Fig. 4
prune_scan         pruning-ratio scan at each level asked                  Fig. 5
hessian            Hessian spectrum and Lemma 3.1 at each level asked      Fig. 5
planes_pruning     magnitude vs random pruning plane at each level asked   Fig. 6
weights            projection / WR / LRR / FT weight CDFs (branches)       Figs. 7, 9
lrr_rewound        LRR masks retrained from the rewind point (LRR runs)    Fig. 8
=================  ======================================================  ==================

Fig. 10 overlays runs that differ only in the pruning ratio or strategy (``compare``, or such
runs found next to DIR); Fig. 11 is the run itself. The per-level analyses of Figs. 5-9 use the last
rewind step (the paper's matching one); Figs. 2-4 use every rewind step. ``quick`` trades fidelity
for time (``QUICK``); ``levels`` picks the levels of the per-level analyses.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fastimp.analysis import common, paths

STEPS = ("barriers", "planes_imp", "robustness", "prune_scan", "hessian", "planes_pruning",
         "weights", "lrr_rewound")

FULL = {"grid": 51, "perturbations": 4, "ratios": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        "hessian": {"top_n": 5, "iterations": 128, "runs": 4, "trace_samples": 100,
                    "subset": None}}
QUICK = {"grid": 21, "perturbations": 2, "ratios": (0.2, 0.5, 0.8),
         "hessian": {"top_n": 3, "iterations": 32, "runs": 1, "trace_samples": 10,
                     "subset": 1000}}


def paper_analysis(run, levels: Optional[Sequence[int]] = None, quick: bool = False, *,
          skip: Sequence[str] = (), compare: Sequence = (), eps: Optional[float] = None,
          nonpositive: str = "flat", max_examples: Optional[int] = None, device=None,
          threads: Optional[int] = None, progress: bool = True, log=print) -> Path:
    """Run every analysis of the paper that applies to ``run`` (see the module docstring) and write
    ``report/report.md``; returns its path. ``skip``: names of ``STEPS`` not to run; ``compare``:
    run folders Fig. 10 overlays; ``eps``: the matching tolerance (needed with one replicate);
    ``threads``: torch threads meanwhile (default: the run's ``threads``)."""
    import torch

    from fastimp.report import write_report
    bad = [s for s in skip if s not in STEPS]
    if bad:
        raise ValueError(f"--skip: unknown step(s) {bad}; expected some of {list(STEPS)}")
    if levels is not None:
        common.pick_levels([], levels)      # checks them
    if compare:  # Fig. 10's runs, checked before hours of analyses rather than after
        from fastimp.analysis.compare import comparable
        from fastimp.imp import load_run
        comparable([run] + [load_run(c) for c in compare])
    cfg = QUICK if quick else FULL
    device = common.default_device(device)
    old_threads = torch.get_num_threads()
    threads = run.config.threads if threads is None else threads
    if threads is not None:
        torch.set_num_threads(threads)
    record: Dict[str, str] = {}
    seconds: Dict[str, float] = {}
    try:
        steps = _plan(run, levels, cfg, eps, nonpositive, max_examples, device, progress, log)
        for name in STEPS:
            if name in skip:
                record[name] = "skipped (--skip)"
                continue
            reason, fn = steps[name]
            if fn is None:
                record[name] = reason
                log(f"paper: {name}: {reason}")
                continue
            t0 = time.perf_counter()
            log(f"paper: {name} ...")
            try:
                fn()
            except (ValueError, FileNotFoundError) as exc:
                record[name] = f"failed: {exc}"
                log(f"paper: {name} failed: {exc}")
            else:
                record[name] = "done"
            seconds[name] = round(time.perf_counter() - t0, 2)
            log(f"paper: {name}: {record[name]} ({seconds[name]:.1f} s)")
            _save(run, levels, quick, record, seconds)
    finally:
        torch.set_num_threads(old_threads)
    _save(run, levels, quick, record, seconds)
    from fastimp import distributed
    distributed.barrier()  # under torchrun: rank 0 has written every analysis the report reads
    path = write_report(run.dir, compare=list(compare) or None) if distributed.is_main() \
        else Path(run.dir) / "report" / "report.md"
    distributed.barrier()  # ... and the report
    return path


def _save(run, levels, quick, record, seconds):
    from fastimp._io import save_json
    save_json({"levels": None if levels is None else list(levels), "quick": quick,
               "steps": record, "seconds": seconds}, paths.paper_json(run))


def _plan(run, levels, cfg, eps, nonpositive, max_examples, device, progress, log) -> Dict:
    """step name -> (reason it does not apply, or None; a callable that runs it, or None)."""
    from fastimp.analysis import (barriers, hessian, lrr_rewound, planes, prune_scan, robustness,
                                  weights)
    last = run.rewind_steps[-1]
    reps = run.replicates
    ekw = {"max_examples": max_examples, "device": device}

    def per_level(tau, need_next=False, start=0) -> List[int]:
        avail = common.finished_levels(run, tau, reps)
        ok = [L for L in avail if L >= start and (not need_next or L + 1 in avail)]
        return common.pick_levels(ok, levels)

    def planes_step(kind, taus):
        def go():
            for tau in taus:
                for L in per_level(tau, need_next=(kind == "imp")):
                    planes.plane_analysis(run, L, kind=kind, rewind_step=tau, grid=cfg["grid"],
                                          eps=eps, resume=True, **ekw)
        return go

    def scan_step():
        for L in per_level(last):
            prune_scan.prune_scan_analysis(run, L, rewind_step=last, ratios=cfg["ratios"],
                                           eps_matching=eps, device=device, log=log)

    def hessian_step():
        for L in per_level(last):
            hessian.hessian_analysis(run, L, rewind_step=last, nonpositive=nonpositive,
                                     device=device, resume=True, log=log, **cfg["hessian"])

    steps = {
        "barriers": (None, lambda: barriers.barrier_analysis(run, eps=eps, resume=True, **ekw)),
        "planes_imp": (None, planes_step("imp", run.rewind_steps)),
        "robustness": (None, lambda: robustness.robustness_analysis(
            run, levels=levels, perturbations=cfg["perturbations"], progress=False, **ekw)),
        "prune_scan": (None, scan_step),
        "hessian": (None, hessian_step),
        "planes_pruning": (None, planes_step("pruning", [last])),
        "weights": (None, lambda: weights.weights_analysis(run, levels=levels, rewind_step=last,
                                                           device=device, log=log)),
        "lrr_rewound": (None, lambda: lrr_rewound.lrr_rewound_analysis(
            run, levels=levels, rewind_steps=[last], device=device, log=log)),
    }
    if run.config.strategy != "wr":
        steps["robustness"] = (f"not applicable: Fig. 4 perturbs IMP-WR's rewind point "
                               f"(this run is IMP-{run.config.strategy.upper()})", None)
    if run.config.strategy != "lrr":
        steps["lrr_rewound"] = (f"not applicable: Fig. 8 needs an IMP-LRR run (this run is "
                                f"IMP-{run.config.strategy.upper()})", None)
    if not any(per_level(t, need_next=True) for t in run.rewind_steps):
        for name in ("planes_imp", "robustness"):
            steps[name] = ("no level L with a finished level L + 1 among those asked", None)
    if not per_level(last):
        for name in ("prune_scan", "hessian", "planes_pruning"):
            steps[name] = ("no finished level among those asked", None)
    if not per_level(last, start=1):
        for name in ("weights", "lrr_rewound"):
            if steps[name][1] is not None:
                steps[name] = ("no finished level >= 1 among those asked", None)
    if len(reps) < 2 and eps is None and steps["prune_scan"][1] is not None:
        steps["prune_scan"] = ("needs a matching tolerance: the run has one replicate, pass "
                               "--eps", None)
    return steps
