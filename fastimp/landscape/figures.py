"""Figures in the style of the paper's Figs. 2, 3 and 6 (matplotlib, Agg backend). Every function
takes the JSON-able dicts the analyses write (``to_dict()``), so reports can redraw them."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


_TAU_COLORS = ["tab:purple", "tab:orange", "tab:green", "tab:blue", "tab:red", "tab:brown"]


def plot_paths(paths: Dict, matching_error: Optional[float] = None, path: Optional[str] = None):
    """Fig. 2 left: test error along the piecewise linear path w^(0) -> w^(1) -> ..., one curve per
    rewind step (``paths``: rewind step -> PathResult.to_dict())."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (tau, p) in enumerate(sorted(paths.items(), key=lambda kv: int(kv[0]))):
        xs, ys = [], []
        levels = p["levels"]
        for s, seg in enumerate(p["segments"]):
            x0, x1 = levels[s], levels[s + 1]
            xs += [x0 + b * (x1 - x0) for b in seg["betas"]]
            ys += [100 * e for e in seg["error"]]
        ax.plot(xs, ys, "-", color=_TAU_COLORS[i % len(_TAU_COLORS)], lw=1.5,
                label=f"rewind step {tau}")
        ax.plot(levels, [100 * p["segments"][0]["error"][0]] +
                [100 * seg["error"][-1] for seg in p["segments"]], "o",
                color=_TAU_COLORS[i % len(_TAU_COLORS)], ms=3)
    if matching_error is not None:
        ax.axhline(100 * matching_error, color="k", ls=":", lw=1, label="matching")
    ax.set_xlabel("level L (path w(L) -> w(L+1))")
    ax.set_ylabel("test error (%)")
    ax.set_title("Error along the IMP path")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_barrier_matrix(matrix: Dict, matching_error: Optional[float] = None,
                        path: Optional[str] = None, quantity: str = "max_error"):
    """Fig. 2 right: max_beta E((1 - beta) w^(i) + beta w^(j)) for every pair of levels; the
    darkest end of the colour bar is the matching threshold."""
    plt = _plt()
    M = 100 * np.asarray(matrix[quantity], dtype=float)
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    vmin = 100 * matching_error if matching_error is not None else float(M.min())
    vmax = max(float(M.max()), vmin + 1e-9)
    im = ax.imshow(M, cmap="Blues_r", vmin=vmin, vmax=vmax, origin="upper")
    levels = matrix["levels"]
    ax.set_xticks(range(len(levels)), [str(L) for L in levels], fontsize=7)
    ax.set_yticks(range(len(levels)), [str(L) for L in levels], fontsize=7)
    ax.set_xlabel("level j")
    ax.set_ylabel("level i")
    ax.set_title("max error on w(i) -> w(j) (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def _plane_names(res: Dict, kind: str):
    """(title, x label, y label, point labels) of a plane, in the run's level numbers."""
    L, tau = res.get("level"), res.get("rewind_step")
    at = f" (rewind step {tau})" if tau is not None else ""
    if kind == "imp":
        if L is None:
            a, b, c = res.get("labels", ["w(L)", "m(L+1)⊙w(L)", "w(L+1)"])
            names = (f"{a}: level-L solution", f"{b}: its pruning projection",
                     f"{c}: level-(L+1) solution")
            title = "Error landscape of an IMP step"
        else:
            a, b, c = f"w({L})", f"m({L + 1})⊙w({L})", f"w({L + 1})"
            names = (f"{a}: level-{L} solution", f"{b}: its pruning projection",
                     f"{c}: level-{L + 1} solution")
            title = f"Error landscape of IMP step {L} → {L + 1}{at}"
        xlabel = f"distance along {a} → {b}"
        ylabel = f"distance orthogonal to it, towards {c}"
    else:
        a, b, c = res.get("labels", ["w(L)", "magnitude", "random"])
        ratio = res.get("ratio")
        share = f" {100 * ratio:g}%" if ratio is not None else ""
        w = f"w({L})" if L is not None else a
        names = (f"{w}: level-{'L' if L is None else L} solution",
                 f"magnitude pruning{share} of {w}", f"random pruning{share} of {w}")
        title = (f"Magnitude vs random pruning of {w}{at}")
        xlabel = f"distance along {w} → its magnitude pruning"
        ylabel = "distance orthogonal to it, towards the random pruning"
    return title, xlabel, ylabel, names


def plot_plane(res: Dict, kind: str = "imp", title: Optional[str] = None, path: Optional[str] = None):
    """Fig. 3 (``kind="imp"``: w(L) grey triangle, projection orange x, w(L+1) orange triangle,
    the axial subspace m(L+1) dashed purple) or Fig. 6 (``kind="pruning"``: arrows to the
    magnitude (orange) and random (purple) projections); dotted black: the matching contour.
    The axes are the plane's orthonormal basis (distances in weight space); ``title`` defaults to
    one naming the levels (``res``: ``plane_analysis`` output or ``PlaneResult.to_dict()``)."""
    plt = _plt()
    from matplotlib.lines import Line2D
    xs, ys = np.asarray(res["xs"]), np.asarray(res["ys"])
    E = 100 * np.asarray(res["error"])
    pts = np.asarray(res["points"])
    auto_title, xlabel, ylabel, names = _plane_names(res, kind)
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    cf = ax.contourf(xs, ys, E, levels=20, cmap="viridis")
    fig.colorbar(cf, ax=ax, label="test error (%)")
    me = res.get("matching_error")
    if me is None and isinstance(res.get("matching"), dict):
        me = res["matching"].get("matching_error")
    handles = []
    if me is not None and E.min() < 100 * me < E.max():
        ax.contour(xs, ys, E, levels=[100 * me], colors="k", linestyles=":", linewidths=1.5)
        handles.append(Line2D([], [], color="k", ls=":", lw=1.5,
                              label=f"matching: error = {100 * me:.3g}%"))
    if kind == "imp":
        d = pts[2] - pts[1]
        if np.linalg.norm(d) > 0:
            t = np.linspace(-10, 10, 2)
            handles += ax.plot(pts[1, 0] + t * d[0], pts[1, 1] + t * d[1], "--",
                               color="tab:purple", lw=1.2,
                               label="axial subspace of " + names[1].split("⊙")[0])
        handles += ax.plot(*pts[0], "^", color="grey", ms=10, mec="k", label=names[0])
        handles += ax.plot(*pts[1], "x", color="tab:orange", ms=10, mew=2.5, label=names[1])
        handles += ax.plot(*pts[2], "^", color="tab:orange", ms=10, mec="k", label=names[2])
    else:
        handles += ax.plot(*pts[0], "^", color="grey", ms=10, mec="k", label=names[0])
        for p, c, lab in ((pts[1], "tab:orange", names[1]), (pts[2], "tab:purple", names[2])):
            ax.annotate("", xy=p, xytext=pts[0], arrowprops=dict(arrowstyle="->", color=c, lw=2))
            handles += ax.plot(*p, "o", color=c, ms=4, label=lab)
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_title(title or auto_title, fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
