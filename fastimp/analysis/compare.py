"""Fig. 10 (Appendix F): runs that differ only in the pruning ratio (e.g. fixed 20% against the
adaptive ratio), the retraining strategy or the pruning method, overlaid: test error against
weights remaining, and how many retrainings each needed to reach its sparsest matching level.

``comparable(runs)`` checks that the runs differ only there; ``siblings(run)`` finds such runs
next to ``run`` (in its OUT folder); ``compare(runs, png)`` draws the figure and returns its table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from fastimp.analysis import common

# what may differ between compared runs
VARYING = ("pruning_fraction", "strategy", "pruning", "finetune_lr", "finetune_weight_decay")
MARKERS = ["o", "x", "s", "^", "D", "v", "P", "*"]


def _fixed(run) -> Dict:
    d = run.config.to_dict()
    for k in VARYING + ("levels", "rewind_steps", "replicates", "seeds", "device", "data_root",
                        "threads"):
        d.pop(k, None)
    return d


def comparable(runs: Sequence) -> None:
    """ValueError naming the first setting (other than the pruning ratio, strategy or pruning
    method) in which a run differs from the first, or when they share no rewind step."""
    if len(runs) < 2:
        raise ValueError("runs: Fig. 10 compares at least two runs")
    if not set.intersection(*[set(r.rewind_steps) for r in runs]):
        raise ValueError("runs: no rewind step common to all runs ("
                         + "; ".join(f"{r.dir.name}: {r.rewind_steps}" for r in runs)
                         + "): Fig. 10 compares them at one")
    base = _fixed(runs[0])
    for r in runs[1:]:
        other = _fixed(r)
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if diff:
            raise ValueError(f"{r.dir.name} differs from {runs[0].dir.name} in {diff}, not only in "
                             f"{list(VARYING[:3])}: Fig. 10 compares runs that differ only there")


def siblings(run) -> List:
    """The other runs in ``run``'s OUT folder that differ from it only in ``VARYING``."""
    from fastimp.imp import load_run
    out = []
    for p in sorted(Path(run.dir).parent.glob("imp_*")):
        if p.resolve() == Path(run.dir).resolve() or not (p / "config.json").exists():
            continue
        try:
            other = load_run(p)
            comparable([run, other])
        except (ValueError, FileNotFoundError):
            continue
        out.append(other)
    return out


def label(run) -> str:
    c = run.config
    pf = c.pruning_fraction
    ratio = "adaptive ratio (App. F)" if pf == "adaptive" else f"fixed ratio {100 * pf:g}%"
    return f"IMP-{c.strategy.upper()}, {c.pruning} pruning, {ratio}"


def compare(runs: Sequence, png=None, rewind_step=None) -> Dict:
    """Per run: error per level (mean ± std), the sparsest matching level and the retrainings
    (levels after 0) it took; ``rewind_step``: default the last one every run has."""
    comparable(runs)
    common_taus = sorted(set.intersection(*[set(r.rewind_steps) for r in runs]))
    tau = common_taus[-1] if rewind_step is None else int(rewind_step)
    rows = []
    for r in runs:
        summ = [s for s in r.summary() if s["rewind_step"] == tau]
        matching = [s for s in summ if s["matching"]]
        best = min(matching, key=lambda s: s["weights_remaining"]) if matching else None
        rows.append({"run": r.dir.name, "label": label(r), "rewind_step": tau,
                     "levels": [{"level": s["level"], "weights_remaining": s["weights_remaining"],
                                 "test_error": s["test_error"],
                                 "test_error_std": s["test_error_std"],
                                 "matching": s["matching"]} for s in summ],
                     "sparsest_matching": None if best is None else {
                         "level": best["level"], "weights_remaining": best["weights_remaining"],
                         "retrainings": best["level"]}})
    out = {"rewind_step": tau, "runs": rows}
    if png is not None:
        plot(out, png)
    return out


def plot(result: Dict, png):
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(result["runs"]):
        x = [100 * s["weights_remaining"] for s in row["levels"]]
        y = [100 * s["test_error"] for s in row["levels"]]
        e = [100 * (s["test_error_std"] or 0) for s in row["levels"]]
        ax.errorbar(x, y, yerr=e, marker=MARKERS[i % len(MARKERS)], ms=5, capsize=2,
                    ls="-" if i == 0 else "--", label=f"{row['label']} ({row['run']})",
                    mfc="none" if MARKERS[i % len(MARKERS)] == "o" else None)
    common.error_vs_remaining(ax, f"rewind step {result['rewind_step']}")
    fig.tight_layout()
    common.save_fig(fig, png)
