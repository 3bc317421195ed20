"""The report's Fig. 5: the Hessian eigenspectrum and Lemma 3.1's largest pruning ratio, with the
pruning-ratio scan, from what :mod:`fastimp.analysis.hessian` and
:mod:`fastimp.analysis.prune_scan` wrote (imported by ``fastimp.report``)."""
from __future__ import annotations

import shutil
from pathlib import Path

from fastimp.analysis.common import figure, read_output
from fastimp.report import FigureUnavailable, register_section


def _pm(ms, fmt="{:.4g}") -> str:
    if not isinstance(ms, dict):
        return "n/a" if ms is None else fmt.format(ms)
    if ms.get("mean") is None:
        return "n/a"
    s = fmt.format(ms["mean"])
    return s + (f" ± {fmt.format(ms['std'])}" if ms.get("std") is not None else "")


@register_section(figure=5, title="The Hessian eigenspectrum determines the limits of IMP")
def fig5_hessian(run, report_dir: Path):
    """Per analysed level (mean over replicates): D_A, top eigenvalue, trace, ε with its source,
    the choice for λ <= 0 and the largest pruning ratio predicted by Lemma 3.1; the scan's points
    against the theory curve."""
    from fastimp.analysis import paths
    from fastimp.analysis.hessian import caption, plot_threshold
    from fastimp.analysis.prune_scan import plot_scan
    from fastimp.analysis.report import unavailable
    hess = [read_output(p, "fastimp hessian DIR --level L") for p in paths.hessian_summaries(run)]
    scans = [read_output(p, "fastimp prune-scan DIR --level L")
             for p in paths.prune_scan_summaries(run)]
    if not hess and not scans:
        raise FigureUnavailable(unavailable(run, "hessian", "fastimp hessian DIR --level L and "
                                                           "fastimp prune-scan DIR --level L"))
    report_dir = Path(report_dir)
    lines = []
    if hess:
        lines += ["Theory (Lemma 3.1) from the SLQ spectrum of the train-loss Hessian at w(L), "
                  "restricted to its mask; mean ± std over replicates.", "",
                  "| level | rewind | replicates | D_A | top eigenvalue | trace | ε | "
                  "f_max at magnitude pruning's R |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for h in sorted(hess, key=lambda h: (h["rewind_step"], h["level"])):
            lines.append(f"| {h['level']} | {h['rewind_step']} | {len(h['replicates'])} | "
                         f"{_pm(h['D_A'], '{:.0f}')} | {_pm(h['top_eigenvalue'])} | "
                         f"{_pm(h['trace'])} | {_pm(h['eps'], '{:.3g}')} | "
                         f"{_pm(h['f_max_magnitude_projection'], '{:.2f}')} |")
        lines.append("")
        for h in sorted(hess, key=lambda h: (h["rewind_step"], h["level"])):
            tag = f"level_{h['level']}_rewind_{h['rewind_step']}"
            lines.append(f"*Level {h['level']}:* {caption(h)}.")
            src = paths.hessian_summary_json(run, h["level"], h["rewind_step"])
            figure(report_dir, f"fig5_threshold_{tag}.png", src.with_suffix(".png"),
                   lambda png, h=h: plot_threshold(h, png))
            lines += ["", f"![threshold {tag}](fig5_threshold_{tag}.png)"]
            density_png = paths.hessian_pngs(run, h["level"], h["rewind_step"],
                                             h["replicates"][0])[0]
            if density_png.exists():
                shutil.copyfile(density_png, report_dir / f"fig5_density_{tag}.png")
                lines.append(f"![density {tag} (replicate {h['replicates'][0]})]"
                             f"(fig5_density_{tag}.png)")
            lines.append("")
    for s in sorted(scans, key=lambda s: (s["rewind_step"], s["level"])):
        tag = f"level_{s['level']}_rewind_{s['rewind_step']}"
        src = paths.prune_scan_json(run, s["level"], s["rewind_step"])
        figure(report_dir, f"fig5_scan_{tag}.png", src.with_suffix(".png"),
               lambda png, s=s: plot_scan(run, s, png, s.get("distance", "projection")),
               data=[src] + paths.hessian_summaries(run))   # it draws the theory curves too
        eps_train = s.get("eps_train")
        lines += [f"Pruning-ratio scan at level {s['level']} (rewind step {s['rewind_step']}, "
                  f"{len(s['replicates'])} replicate(s)); matching = mean error <= "
                  f"{100 * s['dense_error']:.2f}% + {100 * s['eps_matching']:.2f}%; Appendix B's "
                  f"ε_train = " + (f"{eps_train:.3g}" if eps_train is not None else "n/a") + ".",
                  "", f"![prune scan {tag}](fig5_scan_{tag}.png)", "",
                  "| method | ratio | R (projection) | test error | matching |",
                  "|---|---:|---:|---:|:---:|"]
        for e in s["results"]:
            err = f"{100 * e['test_error']:.2f}%"
            if e.get("test_error_std") is not None:
                err += f" ± {100 * e['test_error_std']:.2f}"
            lines.append(f"| {e['method']} | {e['ratio']:.2f} | {e['R_projection']:.4g} | {err} | "
                         f"{'yes' if e['matching'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
