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


def plot_plane(res: Dict, kind: str = "imp", title: Optional[str] = None, path: Optional[str] = None):
    """Fig. 3 (``kind="imp"``: w(L) grey triangle, projection orange x, w(L+1) orange triangle,
    the axial subspace m(L+1) dashed purple) or Fig. 6 (``kind="pruning"``: arrows to the
    magnitude (orange) and random (purple) projections); dotted black: the matching contour."""
    plt = _plt()
    xs, ys = np.asarray(res["xs"]), np.asarray(res["ys"])
    E = 100 * np.asarray(res["error"])
    pts = np.asarray(res["points"])
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    cf = ax.contourf(xs, ys, E, levels=20, cmap="viridis")
    fig.colorbar(cf, ax=ax, label="test error (%)")
    me = res.get("matching_error")
    if me is not None and E.min() < 100 * me < E.max():
        ax.contour(xs, ys, E, levels=[100 * me], colors="k", linestyles=":", linewidths=1.5)
    labels = res.get("labels", ["p0", "p1", "p2"])
    if kind == "imp":
        d = pts[2] - pts[1]
        if np.linalg.norm(d) > 0:
            t = np.linspace(-10, 10, 2)
            ax.plot(pts[1, 0] + t * d[0], pts[1, 1] + t * d[1], "--", color="tab:purple", lw=1.2,
                    label="axial subspace m(L+1)")
        ax.plot(*pts[0], "^", color="grey", ms=10, mec="k", label=labels[0])
        ax.plot(*pts[1], "x", color="tab:orange", ms=10, mew=2.5, label=labels[1])
        ax.plot(*pts[2], "^", color="tab:orange", ms=10, mec="k", label=labels[2])
    else:
        ax.plot(*pts[0], "^", color="grey", ms=10, mec="k", label=labels[0])
        for p, c, lab in ((pts[1], "tab:orange", labels[1]), (pts[2], "tab:purple", labels[2])):
            ax.annotate("", xy=p, xytext=pts[0], arrowprops=dict(arrowstyle="->", color=c, lw=2))
            ax.plot(*p, "o", color=c, ms=4, label=lab)
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.set_xlabel("e1")
    ax.set_ylabel("e2")
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
