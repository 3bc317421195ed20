"""The report's landscape figures: Fig. 2 (error along the IMP path, barrier matrix), Fig. 3 (the
error landscape of an IMP step) and Fig. 6 (magnitude vs random pruning directions), drawn from
what :mod:`fastimp.analysis.barriers` and :mod:`fastimp.analysis.planes` wrote."""
from __future__ import annotations

from pathlib import Path
from typing import List

from fastimp.analysis.common import figure, pm, read_output
from fastimp.report import FigureUnavailable, register_section


@register_section(figure=2, title="Error connectivity of IMP solutions")
def fig2_barriers(run, report_dir: Path):
    from fastimp.analysis import barriers, paths
    from fastimp.analysis.report import load
    p = paths.barrier_json(run)
    res = load(run, p, "barriers", "fastimp barrier DIR")
    report_dir = Path(report_dir)
    reps = res.get("replicates", [res.get("replicate", 0)])
    m = res.get("matching", {})
    lines = [f"Test error along the linear path between successive levels' solutions, mean ± std "
             f"over {len(reps)} replicate(s); BatchNorm statistics {res.get('bn')}; "
             f"{res.get('n_examples')} test examples. Matching threshold (dotted): "
             f"{pm(m.get('matching_error'), None)} (dense error {pm(m.get('dense_error'), None)}"
             f" + eps, {m.get('eps_source')}).", ""]
    src_path, src_matrix = paths.barrier_pngs(run)
    if res.get("paths"):
        figure(report_dir, "fig2_paths.png", src_path, lambda png: barriers.plot_path(res, png),
               data=p)
    if res.get("matrix"):
        figure(report_dir, "fig2_matrix.png", src_matrix,
               lambda png: barriers.plot_matrix(res, png), data=p)
    if res.get("paths"):
        lines += ["![error along the IMP path](fig2_paths.png)", "",
                  "| rewind step | level L -> L+1 | barrier | max error | midpoint error |",
                  "|---:|---|---:|---:|---:|"]
        for tau, path in sorted(res["paths"].items(), key=lambda kv: int(kv[0])):
            for s, seg in enumerate(path["segments"]):
                lines.append(
                    f"| {tau} | {path['levels'][s]} -> {path['levels'][s + 1]} | "
                    f"{pm(seg['barrier'], seg.get('barrier_std'))} | "
                    f"{pm(seg['max_error'], seg.get('max_error_std'))} | "
                    f"{pm(seg['midpoint_error'], seg.get('midpoint_error_std'))} |")
        lines.append("")
    mat = res.get("matrix")
    if mat:
        levels = mat["levels"]
        lines += ["![barrier matrix](fig2_matrix.png)", "",
                  f"Max error (%) on the line between every pair of levels, rewind step "
                  f"{mat['rewind_step']} (mean of {mat.get('replicates', 1)}):", "",
                  "| level | " + " | ".join(str(L) for L in levels) + " |",
                  "|---:|" + "---:|" * len(levels)]
        for i, L in enumerate(levels):
            lines.append(f"| {L} | " + " | ".join(f"{100 * v:.1f}" for v in mat["max_error"][i])
                         + " |")
        lines.append("")
    return "\n".join(lines)


def _plane_section(run, report_dir: Path, kind: str) -> str:
    from fastimp.analysis import paths, planes
    from fastimp.analysis.report import unavailable
    files = paths.plane_jsons(run, kind)
    command = "fastimp plane DIR" + (" --kind pruning" if kind == "pruning" else "")
    if not files:
        raise FigureUnavailable(unavailable(run, f"planes_{kind}", command))
    results = [read_output(p, command) for p in files]
    results.sort(key=lambda r: (r["rewind_step"], r["level"]))
    lines: List[str] = []
    if kind == "imp":
        lines += ["The plane through w(L) (grey triangle), its projection m(L+1)⊙w(L) (orange x) "
                  "and w(L+1) (orange triangle); dotted: the matching contour. Each replicate is "
                  "evaluated in one shared frame (the mean of theirs) and the error grids are "
                  "averaged.", "",
                  "| rewind step | level L | replicates | R = ‖w(L) − m(L+1)⊙w(L)‖ | "
                  "error w(L) | error projection | error w(L+1) | matching threshold |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["The plane through w(L) spanned by its magnitude (orange) and random (purple) "
                  "pruning projections; dotted: the matching contour; mean over replicates.", "",
                  "| rewind step | level L | ratio | replicates | R magnitude | R random | "
                  "error w(L) | error magnitude | error random | matching threshold |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        own = res.get("own_points") or [res["points"]]
        if own and isinstance(own[0][0], (int, float)):
            own = [own]
        r1 = sum((p[1][0] ** 2 + p[1][1] ** 2) ** 0.5 for p in own) / len(own)
        r2 = sum((p[2][0] ** 2 + p[2][1] ** 2) ** 0.5 for p in own) / len(own)
        pe = res.get("point_error") or [None, None, None]
        me = res.get("matching_error")
        e = [pm(v, None) for v in pe]
        n = len(res.get("replicates", [0]))
        if kind == "imp":
            lines.append(f"| {res['rewind_step']} | {res['level']} | {n} | {r1:.4g} | {e[0]} | "
                         f"{e[1]} | {e[2]} | {pm(me, None)} |")
        else:
            lines.append(f"| {res['rewind_step']} | {res['level']} | {res.get('ratio')} | {n} | "
                         f"{r1:.4g} | {r2:.4g} | {e[0]} | {e[1]} | {e[2]} | {pm(me, None)} |")
    lines.append("")
    for res, p in sorted(zip(results, files), key=lambda t: (t[0]["rewind_step"], t[0]["level"])):
        png = figure(report_dir, f"fig{3 if kind == 'imp' else 6}_{p.stem}.png",
                     p.with_suffix(".png"), lambda dst, res=res: planes.plot(res, dst))
        lines += [f"![{p.stem}]({png})", ""]
    return "\n".join(lines)


@register_section(figure=3, title="Error landscape of an IMP step")
def fig3_planes(run, report_dir: Path):
    return _plane_section(run, report_dir, "imp")


@register_section(figure=6, title="Magnitude pruning directions correlate with flat directions")
def fig6_planes(run, report_dir: Path):
    return _plane_section(run, report_dir, "pruning")
