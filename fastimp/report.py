"""``fastimp report DIR``: PNG figures (matplotlib, Agg) and a Markdown summary of an IMP run.

The report is a list of sections. A section is ``fn(run, report_dir) -> str | None``: it reads what
it needs from ``run`` (a :class:`fastimp.imp.Run`; analyses live in ``run.analysis_dir``), writes
its PNGs into ``report_dir`` and returns Markdown (None = nothing to show). Register one with
``register_section(fn, order=...)``; modules named in ``SECTION_MODULES`` are imported first so
that their sections register themselves.

A section registered with ``figure=N, title=...`` is the paper's Fig. N: the report heads it
"## Fig. N: title" (figures in number order), and when it returns None or raises
:class:`FigureUnavailable` the report lists it, with the reason, among the figures not made.
``compared_runs()`` gives a section the runs ``write_report(..., compare=...)`` overlays.
"""
from __future__ import annotations

import contextvars
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

# Imported before a report is written, so their register_section calls run.
SECTION_MODULES = ["fastimp.landscape.report", "fastimp.hessian.report", "fastimp.theory",
                   "fastimp.analysis.report"]


@dataclass
class Section:
    name: str
    fn: Callable
    order: int
    figure: Optional[int] = None
    title: Optional[str] = None


class FigureUnavailable(Exception):
    """Raised by a figure section that cannot be drawn; the message says why."""


_SECTIONS: List[Section] = []
_COMPARE: contextvars.ContextVar = contextvars.ContextVar("fastimp_report_compare", default=None)


def compared_runs() -> Optional[List]:
    """The runs given to ``write_report(..., compare=...)`` (the report's run first), or None."""
    return _COMPARE.get()


def register_section(fn: Callable = None, *, name: Optional[str] = None,
                     order: Optional[int] = None,
                     figure: Optional[int] = None, title: Optional[str] = None):
    """Add a report section (usable as ``@register_section`` or ``@register_section(order=50)``);
    sections are written in increasing ``order`` (default 100, or 10 x ``figure`` for the paper's
    Fig. ``figure``), re-registering a name replaces."""
    def deco(f):
        n = name or f.__name__
        o = order if order is not None else (10 * figure if figure is not None else 100)
        _SECTIONS[:] = [s for s in _SECTIONS if s.name != n]
        _SECTIONS.append(Section(n, f, o, figure, title))
        return f
    if fn is not None:
        return deco(fn)
    return deco


def sections() -> List[Section]:
    return sorted(_SECTIONS, key=lambda s: (s.order, s.name))


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def plot_imp_error(summary, title: str = "", path=None):
    """Test error against weights remaining per rewind step (the paper's Fig. 11): a log axis
    with one label per level's weights remaining; ``summary`` = ``Run.summary()``."""
    plt = _plt()
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
    taus = sorted({s["rewind_step"] for s in summary})
    fig, ax = plt.subplots(figsize=(6, 4))
    for tau in taus:
        rows = [s for s in summary if s["rewind_step"] == tau]
        x = [100 * s["weights_remaining"] for s in rows]
        y = [100 * s["test_error"] for s in rows]
        yerr = [100 * (s["test_error_std"] or 0.0) for s in rows]
        line = ax.errorbar(x, y, yerr=yerr, marker="o", ms=3, capsize=2,
                           label=f"rewind step {tau}")
        dense = rows[0]
        if dense["level"] == 0 and dense["eps"] is not None:
            ax.axhspan(100 * dense["dense_error"] - 100 * dense["eps"],
                       100 * dense["dense_error"] + 100 * dense["eps"], alpha=0.12,
                       color=line[0].get_color(),
                       label=f"dense ± eps (rewind {tau})")
    ax.set_xscale("log")
    ticks = sorted({round(100 * s["weights_remaining"], 6) for s in summary}, reverse=True)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{t:.3g}" for t in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 8:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


def plot_projection_distance(results, path=None):
    """||w^(L) - m^(L+1) . w^(L)|| per level (integer level ticks), one line per rewind step and
    replicate; ``results`` = ``Run.results()``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6, 4))
    for tau in sorted({row["rewind_step"] for row in results}):
        for r in sorted({row["replicate"] for row in results}):
            rows = [row for row in results if row["rewind_step"] == tau and row["replicate"] == r]
            ax.plot([row["level"] for row in rows], [row["projection_distance"] for row in rows],
                    marker=".", label=f"rewind {tau}, replicate {r}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("level L")
    ax.set_ylabel(r"$\|w^{(L)} - m^{(L+1)} \odot w^{(L)}\|_2$")
    ax.set_title("distance of each pruning projection")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)


def _finish(fig, path):
    if path is None:
        return fig
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return None


@register_section(figure=11, title="Error and rewind steps for IMP")
def imp_curves(run, report_dir: Path) -> Optional[str]:
    """Test error against weights remaining per rewind step (the paper's Fig. 11), log-x, and the
    projection distance per level."""
    summary = run.summary()
    if not summary:
        return None
    c = run.config
    plot_imp_error(summary, f"IMP-{c.strategy.upper()} ({c.pruning}) {c.model} / {c.dataset}",
                   report_dir / "imp_error.png")
    plot_projection_distance(run.results(), report_dir / "imp_projection.png")

    pf = c.pruning_fraction
    lines = [f"Strategy IMP-{c.strategy.upper()}, {c.pruning} pruning of "
             f"{pf if isinstance(pf, str) else _pct(pf)}"
             f" per level, {len(run.seeds)} replicate(s) (seeds {run.seeds}).", "",
             "![test error](imp_error.png)", "",
             "| rewind step | level | weights remaining | test error (mean ± std) | matching |",
             "|---:|---:|---:|---:|:---:|"]
    for s in summary:
        std = f" ± {100 * s['test_error_std']:.2f}" if s["test_error_std"] is not None else ""
        m = {True: "yes", False: "no", None: "n/a"}[s["matching"]]
        lines.append(f"| {s['rewind_step']} | {s['level']} | {_pct(s['weights_remaining'])} | "
                     f"{100 * s['test_error']:.2f}%{std} | {m} |")
    eps_notes = sorted({(s["rewind_step"], s["eps"], s["eps_source"]) for s in summary
                        if s["level"] == 0}, key=lambda t: t[0])
    lines.append("")
    for tau, eps, source in eps_notes:
        lines.append(f"- rewind step {tau}: matching = error <= dense error + eps, eps = "
                     + (f"{100 * eps:.2f}% ({source})" if eps is not None else f"n/a ({source})"))
    lines += ["", "![projection distance](imp_projection.png)", ""]
    return "\n".join(lines)


def write_report(folder, out: Optional[str] = None, compare: Optional[Sequence] = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default ``<run folder>/report``);
    ``compare``: more run folders that differ from this one only in the pruning ratio or strategy
    (Fig. 10 overlays them)."""
    from fastimp.imp import load_run
    run = load_run(folder)
    from fastimp._io import folder_path
    report_dir = folder_path(out if out is not None else run.dir / "report", "out (--out)",
                             "for report.md and its figures")
    if not run.summary():
        raise ValueError(f"{run.dir}: nothing to report yet, no level has finished; run (or "
                         "resume) `fastimp imp` with the same arguments first")
    others = [load_run(f) for f in (compare or ())]
    token = _COMPARE.set([run] + others if others else None)
    try:
        return _write_report(run, report_dir)
    finally:
        _COMPARE.reset(token)


def _write_report(run, report_dir: Path) -> Path:
    for mod in SECTION_MODULES:
        importlib.import_module(mod)
    report_dir.mkdir(parents=True, exist_ok=True)
    c = run.config
    parts = [f"# fastimp report: {run.dir.name}", "",
             f"model `{c.model}`, dataset `{c.dataset}`, strategy `{c.strategy}`, "
             f"rewind steps {run.rewind_steps}, levels 0..{c.levels}", ""]
    missing = []
    for section in sections():
        try:
            text = section.fn(run, report_dir)
        except FigureUnavailable as exc:
            if section.figure is None:
                raise
            text, why = None, str(exc)
        else:
            why = "nothing to show"
        if section.figure is not None:
            if not text:
                missing.append(f"Fig. {section.figure} ({why})")
                continue
            text = f"## Fig. {section.figure}: {section.title or section.name}\n\n" + text.lstrip()
        if text:
            parts.append(text.rstrip() + "\n")
    figures = sorted({s.figure for s in sections() if s.figure is not None})
    if missing:
        note = "Figures not made: " + "; ".join(missing) + "."
    else:
        note = (f"Every figure was made (Figs. {figures[0]}-{figures[-1]})." if figures else "")
    if note:
        parts.insert(4, note + "\n")
    path = report_dir / "report.md"
    from fastimp._io import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(parts))
    atomic_write(path, write)
    return path
