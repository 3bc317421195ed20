"""Fig. 8 (Appendix D): IMP-LRR's masks retrained from the rewind point. For each level L >= 1 of an
IMP-LRR run, the mask m^(L) is trained as IMP-WR would train it, A_tau(m^(L) ⊙ w_tau, T − tau)
(a ``"wr"`` branch, :mod:`fastimp.analysis.branches`), and its test error is compared with the LRR
solution w^(L)'s; mean ± std over replicates, per rewind step. Writes
``analysis/lrr_rewound.json`` and ``lrr_rewound.png``: every (rewind step, level) whose rewound
branches are on disk (those of earlier calls too), each over the replicates on disk."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from fastimp.analysis import branches, common, paths


def lrr_rewound_analysis(run, levels: Optional[Sequence[int]] = None,
                         rewind_steps: Optional[Sequence[int]] = None, replicate=None,
                         device=None, progress: bool = False, log=print) -> Dict:
    """Fig. 8 for an IMP-LRR run (ValueError for other strategies)."""
    if run.config.strategy != "lrr":
        raise ValueError(f"Fig. 8 retrains IMP-LRR masks from the rewind point; {run.dir.name} is "
                         f"an IMP-{run.config.strategy.upper()} run")
    taus = common.rewind_list(run, rewind_steps)
    reps = common.replicate_list(run, replicate)
    chosen = {t: common.pick_levels([L for L in common.finished_levels(run, t, reps) if L >= 1],
                                    levels) for t in taus}
    keys = [(t, L, r, s) for t in taus for L in chosen[t] for r in reps for s in ("lrr", "wr")]
    now = branches.ensure(run, keys, device=device, progress=progress, log=log)
    rewound = {**branches.stored(run, "wr"), **{k: v for k, v in now.items() if k[3] == "wr"}}
    # the run's own solutions (nothing to train) beside every rewound branch on disk
    got = branches.ensure(run, [k[:3] + ("lrr",) for k in rewound], device=device, log=log)
    got.update(rewound)
    everywhere = sorted({k[0] for k in rewound} | set(taus))
    out = {"replicates": sorted({k[2] for k in rewound}), "rewind_steps": {}}
    for t in everywhere:
        levels_t = sorted({k[1] for k in rewound if k[0] == t})
        out["rewind_steps"][str(t)] = [
            {"level": L, "lrr": branches.aggregate(got, t, L, "lrr", run.replicates),
             "rewound": branches.aggregate(got, t, L, "wr", run.replicates)} for L in levels_t]
    for rows in out["rewind_steps"].values():
        for row in rows:
            for k in ("lrr", "rewound"):
                row[k] = {key: row[k][key] for key in ("weights_remaining", "test_error",
                                                        "replicates")}
    from fastimp._io import save_json
    save_json(out, paths.lrr_rewound_json(run))
    if any(out["rewind_steps"].values()):
        plot(out, paths.lrr_rewound_png(run))
    return out


def plot(result: Dict, png):
    """Fig. 8: test error against weights remaining, LRR (blue) and its masks rewound (orange)."""
    plt = common.plt()
    taus = [t for t, rows in result["rewind_steps"].items() if rows]
    fig, axes = plt.subplots(1, len(taus), figsize=(4.3 * len(taus), 3.4), squeeze=False)
    for ax, tau in zip(axes[0], taus):
        rows = result["rewind_steps"][tau]
        for key, color, label in (("lrr", "tab:blue", "IMP-LRR"),
                                  ("rewound", "tab:orange", f"LRR mask, rewound to {tau}")):
            x = [100 * r[key]["weights_remaining"] for r in rows]
            y = [100 * r[key]["test_error"]["mean"] for r in rows]
            e = [100 * (r[key]["test_error"]["std"] or 0) for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, color=color, label=label)
        common.error_vs_remaining(ax, f"rewind step {tau}")
    fig.tight_layout()
    common.save_fig(fig, png)
