"""The landscape section of ``fastimp report``: Fig. 2 (paths, barrier matrix) and the planes of
Figs. 3 and 6 found in the run's analysis folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fastimp.report import register_section


@register_section(order=50)
def landscape(run, report_dir: Path) -> Optional[str]:
    from fastimp.landscape.figures import plot_barrier_matrix, plot_paths, plot_plane
    d = Path(run.dir) / "analysis"
    if not d.is_dir():
        return None
    report_dir = Path(report_dir)
    lines = []
    b = d / "barrier.json"
    if b.exists():
        res = json.loads(b.read_text())
        me = res.get("matching", {}).get("matching_error")
        lines += ["## Error connectivity of IMP solutions (Fig. 2)", "",
                  f"BatchNorm statistics: {res.get('bn')}; {res.get('n_examples')} test examples.", ""]
        if res.get("paths"):
            plot_paths(res["paths"], me, str(report_dir / "landscape_paths.png"))
            lines += ["![error along the IMP path](landscape_paths.png)", "",
                      "| rewind step | level L -> L+1 | barrier | max error | midpoint error |",
                      "|---|---|---:|---:|---:|"]
            for tau, p in res["paths"].items():
                for s, seg in enumerate(p["segments"]):
                    lines.append(f"| {tau} | {p['levels'][s]} -> {p['levels'][s + 1]} | "
                                 f"{100 * seg['barrier']:.2f}% | {100 * seg['max_error']:.2f}% | "
                                 f"{100 * seg['midpoint_error']:.2f}% |")
            lines.append("")
        if res.get("matrix"):
            plot_barrier_matrix(res["matrix"], me, str(report_dir / "landscape_matrix.png"))
            lines += [f"![barrier matrix](landscape_matrix.png) (rewind step "
                      f"{res['matrix']['rewind_step']})", ""]
    planes = sorted(d.glob("plane_*.json"))
    if planes:
        lines += ["## 2-D slices of the error landscape (Figs. 3, 6)", ""]
        for p in planes:
            res = json.loads(p.read_text())
            png = f"landscape_{p.stem}.png"
            plot_plane(res, res.get("kind", "imp"), None, str(report_dir / png))
            lines += [f"![{p.stem}]({png})", ""]
    return "\n".join(lines) if lines else None
