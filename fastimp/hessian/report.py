"""The report's "Hessian and pruning-ratio theory" section: what `fastimp hessian` and
`fastimp prune-scan` wrote under ``run.analysis_dir`` (imported by ``fastimp.report``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from fastimp.report import register_section


@register_section(order=60)
def hessian_theory(run, report_dir: Path) -> Optional[str]:
    """Per analysed level: D_A, top eigenvalue, trace, ε and the largest pruning ratio predicted
    by Lemma 3.1, with the density and Fig. 5 style plots."""
    base = Path(run.analysis_dir)
    hess = sorted((base / "hessian").glob("*/hessian.json"))
    scans = sorted((base / "prune-scan").glob("*.json"))
    if not hess and not scans:
        return None
    lines = ["## Hessian eigenspectrum and the largest pruning ratio (Section 3.3, Fig. 5)", ""]
    if hess:
        lines += ["| level | rewind | D_A | top eigenvalue | trace | ε (source) | "
                  "f_max at magnitude pruning's R |", "|---:|---:|---:|---:|---:|---|---:|"]
        for p in hess:
            h = json.loads(p.read_text())
            lines.append(f"| {h['level']} | {h['rewind_step']} | {h['D_A']} | "
                         f"{h['eigenvalues'][0]:.4g} | {h['trace']:.4g} ± {h['trace_stderr']:.2g}"
                         f" | {h['eps']:.3g} ({h['eps_source'].split(' (')[0]}) | "
                         f"{h['f_max_magnitude_projection']:.2f} |")
        lines.append("")
        for p in hess:
            for name in ("density.png", "threshold.png"):
                src = p.parent / name
                if src.exists():
                    dst = report_dir / f"hessian_{p.parent.name}_{name}"
                    shutil.copyfile(src, dst)
                    lines.append(f"![{p.parent.name} {name[:-4]}]({dst.name})")
        lines.append("")
    for p in scans:
        s = json.loads(p.read_text())
        png = p.with_suffix(".png")
        lines.append(f"Pruning-ratio scan at level {s['level']} (rewind {s['rewind_step']}): "
                     + ", ".join(f"{e['method'][:3]} {e['ratio']:.1f}: "
                                 f"{'match' if e['matching'] else 'no'}" for e in s["results"]))
        if png.exists():
            dst = report_dir / f"prune_scan_{p.stem}.png"
            shutil.copyfile(png, dst)
            lines += ["", f"![prune scan {p.stem}]({dst.name})"]
        lines.append("")
    return "\n".join(lines)
