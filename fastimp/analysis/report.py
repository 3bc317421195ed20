"""The report's Figs. 4, 7, 8, 9 and 10, drawn from what the analyses wrote (imported by
``fastimp.report``; Figs. 2, 3, 6 are in ``fastimp.landscape.report``, Fig. 5 in
``fastimp.hessian.report``, Fig. 11 in ``fastimp.report``)."""
from __future__ import annotations

from pathlib import Path

from fastimp.analysis import paths
from fastimp.analysis.common import figure, pm, read_output
from fastimp.report import FigureUnavailable, compared_runs, register_section


def unavailable(run, step: str, command: str) -> str:
    """Why an analysis' output is missing: the reason ``fastimp paper`` recorded for ``step``, or
    how to compute it."""
    p = paths.paper_json(run)
    if p.exists():
        why = read_output(p, "fastimp paper DIR").get("steps", {}).get(step)
        if why and why != "done":
            return why
    return f"not computed: run `fastimp paper DIR` or `{command}`"


def load(run, path, step: str, command: str):
    """The analysis JSON at ``path``, or FigureUnavailable with the reason it is missing."""
    if not path.exists():
        raise FigureUnavailable(unavailable(run, step, command))
    return read_output(path, command)


@register_section(figure=4, title="Robustness of SGD at the rewind point")
def fig4_robustness(run, report_dir: Path):
    from fastimp.analysis import robustness
    res = load(run, paths.robustness_json(run), "robustness", "fastimp robustness DIR")
    if not any(res["rewind_steps"].values()):
        raise FigureUnavailable("no level with a next level to compare with")
    figure(report_dir, "fig4_robustness.png", paths.robustness_png(run),
           lambda png: robustness.plot(res, png))
    prm = res["params"]
    lines = [f"Midpoint test error between w(L) and w(L+1) (blue, IMP's own perturbation) and "
             f"between w(L) and a solution trained from m(L)⊙w_τ + v (orange), v random on the "
             f"unpruned prunable weights with ‖v‖ = ρ = ‖m(L)⊙w_τ − m(L+1)⊙w_τ‖, trained under "
             f"m(L) with the IMP-WR schedule from τ; {prm['perturbations']} perturbation(s) per "
             f"replicate, {len(res['replicates'])} replicate(s), mean ± std.", "",
             "![robustness](fig4_robustness.png)", "",
             "| rewind step | level L | weights remaining | ρ | error w(L) | blue: w(L)↔w(L+1) | "
             "orange: w(L)↔perturbed |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for tau, rows in sorted(res["rewind_steps"].items(), key=lambda kv: int(kv[0])):
        for r in rows:
            lines.append(f"| {tau} | {r['level']} | {100 * r['weights_remaining']:.1f}% | "
                         f"{pm(r['rho'], pct=False)} | {pm(r['solution_error'])} | "
                         f"{pm(r['blue'])} | {pm(r['orange'])} |")
    return "\n".join(lines) + "\n"


def _weights(run, step="weights"):
    res = load(run, paths.weights_json(run), step, "fastimp weights DIR")
    if not res["levels"]:
        raise FigureUnavailable("no level >= 1 finished")
    return res


def _ft_note(res) -> str:
    lr, wd = res.get("finetune_lr"), res.get("finetune_weight_decay")
    lr = "the schedule's final lr" if lr is None else f"lr {lr:g}"
    wd = "the run's weight decay" if wd is None else f"weight decay {wd:g}"
    return f"FT: {lr}, {wd}"


@register_section(figure=7, title="Weight distributions after projection and retraining")
def fig7_cdf(run, report_dir: Path):
    from fastimp.analysis import weights
    res = _weights(run)
    report_dir = Path(report_dir)
    zoom, full, _ = paths.weights_pngs(run)
    figure(report_dir, "fig7_cdf.png", zoom, lambda png: weights.plot_cdfs(res, png, xmax=2.0))
    figure(report_dir, "fig7_cdf_full.png", full,
           lambda png: weights.plot_cdfs(res, png, xmax=float(res["grid"][-1])))
    grid = res["grid"]
    at = [grid.index(x) for x in (0.25, 0.5) if x in grid]
    lines = [f"CDF of |w| / mean|w| over the unpruned prunable weights at level L, rewind step "
             f"{res['rewind_step']}: the projection m(L)⊙w(L−1) and its three retrainings (the "
             f"run is IMP-{res['run_strategy'].upper()}; the other two are retrained from its "
             f"w(L−1); {_ft_note(res)}); mean ± std over {len(res['replicates'])} replicate(s). "
             f"Zoomed in (Figs. 7, 18) and out (Fig. 19).", "",
             "![CDFs](fig7_cdf.png)", "", "![CDFs, zoomed out](fig7_cdf_full.png)", "",
             "Fraction of weights below 0.25 and 0.5 of the mean |w|:", "",
             "| level | " + " | ".join(weights.LABELS[s] for s in weights.CURVES) + " |",
             "|---:|" + "---:|" * len(weights.CURVES)]
    for row in res["levels"]:
        cells = []
        for s in weights.CURVES:
            a = row.get(s)
            cells.append("n/a" if a is None else
                         " / ".join(f"{a['cdf'][i]:.3f}" for i in at))
        lines.append(f"| {row['level']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@register_section(figure=8, title="IMP-LRR masks retrained from the rewind point")
def fig8_lrr_rewound(run, report_dir: Path):
    from fastimp.analysis import lrr_rewound
    if run.config.strategy != "lrr":
        raise FigureUnavailable(f"needs an IMP-LRR run (this one is "
                                f"IMP-{run.config.strategy.upper()}); run `fastimp paper` on one")
    res = load(run, paths.lrr_rewound_json(run), "lrr_rewound", "fastimp lrr-rewound DIR")
    if not any(res["rewind_steps"].values()):
        raise FigureUnavailable("no level >= 1 finished")
    figure(report_dir, "fig8_lrr_rewound.png", paths.lrr_rewound_png(run),
           lambda png: lrr_rewound.plot(res, png))
    lines = ["Each level's IMP-LRR mask trained with learning-rate rewinding (the run, blue) and "
             "from the rewind point as IMP-WR trains (orange), mean ± std over "
             f"{len(res['replicates'])} replicate(s).", "",
             "![LRR masks rewound](fig8_lrr_rewound.png)",
             "", "| rewind step | level | weights remaining | IMP-LRR error | rewound error |",
             "|---:|---:|---:|---:|---:|"]
    for tau, rows in sorted(res["rewind_steps"].items(), key=lambda kv: int(kv[0])):
        for r in rows:
            lines.append(f"| {tau} | {r['level']} | {100 * r['lrr']['weights_remaining']:.1f}% | "
                         f"{pm(r['lrr']['test_error'])} | {pm(r['rewound']['test_error'])} |")
    return "\n".join(lines) + "\n"


@register_section(figure=9, title="LRR provides small weights to prune, finetuning does not")
def fig9_q20(run, report_dir: Path):
    from fastimp.analysis import weights
    res = _weights(run)
    figure(report_dir, "fig9_q20.png", paths.weights_pngs(run)[2],
           lambda png: weights.plot_q20(res, png))
    lines = [f"Left: test error after one retraining of level L's mask (the run's own strategy: "
             f"its level; the others: retrained from its w(L−1); {_ft_note(res)}). Right: the "
             f"20th percentile of |w| / mean|w| (what the next level prunes), mean ± std over "
             f"{len(res['replicates'])} replicate(s).", "", "![20th percentile](fig9_q20.png)", "",
             "| level | weights remaining | LRR error | FT error | WR error | LRR q20 | FT q20 | "
             "WR q20 | projection q20 |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["levels"]:
        def g(s, k, pct):
            a = row.get(s)
            return "n/a" if a is None else pm(a[k], pct=pct)
        wr = next((row[s]["weights_remaining"] for s in weights.CURVES if row.get(s)), None)
        lines.append(f"| {row['level']} | {100 * wr:.1f}% | {g('lrr', 'test_error', True)} | "
                     f"{g('ft', 'test_error', True)} | {g('wr', 'test_error', True)} | "
                     f"{g('lrr', 'q20', False)} | {g('ft', 'q20', False)} | "
                     f"{g('wr', 'q20', False)} | {g('projection', 'q20', False)} |")
    return "\n".join(lines) + "\n"


@register_section(figure=10, title="Adaptive vs fixed pruning ratio")
def fig10_compare(run, report_dir: Path):
    from fastimp.analysis import compare
    runs = compared_runs()
    if runs is None:
        others = compare.siblings(run)
        if not others:
            raise FigureUnavailable(
                "needs runs that differ from this one only in the pruning ratio or strategy: "
                "`fastimp report DIR DIR2 ...` (or such runs in the same OUT folder)")
        runs = [run] + others
    res = compare.compare(runs, Path(report_dir) / "fig10_compare.png")
    lines = [f"Test error against weights remaining, rewind step {res['rewind_step']}; each run's "
             "sparsest matching level and the retrainings (levels after 0) it took.", "",
             "![comparison](fig10_compare.png)", "",
             "| run | setting | levels | sparsest matching: weights remaining | retrainings |",
             "|---|---|---:|---:|---:|"]
    for row in res["runs"]:
        b = row["sparsest_matching"]
        lines.append(f"| {row['run']} | {row['label']} | {len(row['levels']) - 1} | "
                     + ("n/a | n/a |" if b is None else
                        f"{100 * b['weights_remaining']:.2f}% | {b['retrainings']} |"))
    return "\n".join(lines) + "\n"
