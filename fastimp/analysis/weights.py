"""Figs. 7, 9 (right), 18, 19 (Section 3.4; Appendix B, "The importance of iterative pruning and
retraining"): the distribution of the weights at each level after the projection and after each of
the three retraining strategies.

Per level L >= 1: the CDF of u = |w| / mean|w| over the unpruned prunable weights of the level-L
projection m^(L) ⊙ w^(L−1) and of its three retrainings (weight rewinding, learning-rate
rewinding, finetuning; :mod:`fastimp.analysis.branches` trains the two the run did not), mean ± std
over replicates, one panel per level (zoomed in, Figs. 7 / 18, and out, Fig. 19); the 20th
percentile of u per level for each strategy, with the strategies' test errors (Fig. 9). Writes
``analysis/weights.json`` and three PNGs: every level of ``rewind_step`` whose branches are on
disk (the levels of earlier calls too), each averaged over the replicates on disk.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from fastimp.analysis import branches, common, paths

CURVES = ("projection", "wr", "lrr", "ft")
COLORS = {"projection": "navy", "wr": "tab:orange", "lrr": "tab:green", "ft": "tab:red"}
LABELS = {"projection": "projection m(L)⊙w(L-1)", "wr": "IMP-WR", "lrr": "IMP-LRR",
          "ft": "IMP-FT"}


def weights_analysis(run, levels: Optional[Sequence[int]] = None, rewind_step: Optional[int] = None,
                     replicate=None, device=None, progress: bool = False, log=print) -> Dict:
    """Figs. 7 and 9 at ``levels`` (default: every finished level >= 1) of ``rewind_step``
    (default: the run's last, the paper's matching rewind step)."""
    tau = common.rewind_list(run, run.rewind_steps[-1] if rewind_step is None else rewind_step)[0]
    reps = common.replicate_list(run, replicate)
    avail = [L for L in common.finished_levels(run, tau, reps) if L >= 1]
    chosen = common.pick_levels(avail, levels)
    keys = [(tau, L, r, s) for L in chosen for r in reps for s in CURVES]
    now = branches.ensure(run, keys, device=device, progress=progress, log=log)
    got = {}
    for s in CURVES:
        got.update(branches.stored(run, s, tau))
    got.update(now)
    # a level is shown when its projection is on disk (written first by every call)
    levels_on_disk = sorted({L for (_, L, _, s) in got if s == "projection"} | set(chosen))
    rows = []
    for L in levels_on_disk:
        row = {"level": L}
        for s in CURVES:
            row[s] = branches.aggregate(got, tau, L, s, run.replicates)
        rows.append(row)
    shown = sorted({r for row in rows for s in CURVES if row[s] for r in row[s]["replicates"]})
    c = run.config
    out = {"rewind_step": tau, "replicates": shown, "run_strategy": c.strategy,
           "finetune_lr": c.finetune_lr, "finetune_weight_decay": c.finetune_weight_decay,
           "grid": branches.CDF_GRID.tolist(), "levels": rows}
    from fastimp._io import save_json
    save_json(out, paths.weights_json(run))
    if rows:
        zoom, full, q20 = paths.weights_pngs(run)
        plot_cdfs(out, zoom, xmax=2.0)
        plot_cdfs(out, full, xmax=float(branches.CDF_GRID[-1]))
        plot_q20(out, q20)
    return out


def plot_cdfs(result: Dict, png, xmax: float = 2.0):
    """One panel per level: the CDF of |w| / mean|w| of the projection and the three retrainings."""
    import numpy as np
    plt = common.plt()
    rows = result["levels"]
    n = len(rows)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.9 * nrows), squeeze=False)
    x = np.asarray(result["grid"])
    keep = x <= xmax + 1e-9
    for ax, row in zip(axes.flat, rows):
        for s in CURVES:
            a = row.get(s)
            if a is None:
                continue
            y, e = np.asarray(a["cdf"]), np.asarray(a["cdf_std"])
            ax.plot(x[keep], y[keep], color=COLORS[s], lw=1.4, label=LABELS[s])
            ax.fill_between(x[keep], (y - e)[keep], (y + e)[keep], color=COLORS[s], alpha=0.15,
                            lw=0)
        wr = next((row[s]["weights_remaining"] for s in CURVES if row.get(s)), None)
        ax.set_title(f"level {row['level']}" + (f" ({100 * wr:.1f}% left)" if wr else ""),
                     fontsize=9)
        ax.set_xlabel("|w| / mean |w|")
        ax.set_ylabel("CDF")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    common.save_fig(fig, png)


def plot_q20(result: Dict, png):
    """Fig. 9: test error (left) and the 20th percentile of |w| / mean|w| (right) per level."""
    plt = common.plt()
    rows = result["levels"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.3))
    for s in CURVES:
        pts = [(r["level"], r[s]) for r in rows if r.get(s)]
        if not pts:
            continue
        x = [L for L, _ in pts]
        if s != "projection":
            err = [(a["test_error"]["mean"], a["test_error"]["std"]) for _, a in pts]
            if all(m is not None for m, _ in err):
                a1.errorbar(x, [100 * m for m, _ in err], yerr=[100 * (d or 0) for _, d in err],
                            marker="o", ms=4, capsize=2, color=COLORS[s], label=LABELS[s])
        q = [(a["q20"]["mean"], a["q20"]["std"]) for _, a in pts]
        a2.errorbar(x, [m for m, _ in q], yerr=[d or 0 for _, d in q], marker="o", ms=4,
                    capsize=2, color=COLORS[s], label=LABELS[s])
    a1.set_xlabel("level L")
    a1.set_ylabel("test error (%)")
    a1.set_title("error after retraining")
    a2.set_xlabel("level L")
    a2.set_ylabel("20th percentile of |w| / mean |w|")
    a2.set_title("small weights left to prune")
    for a in (a1, a2):
        common.integer_levels(a)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, png)
