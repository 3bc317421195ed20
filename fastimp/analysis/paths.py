"""Where every analysis of a run folder writes, in one place: the analyses write through these
names, the report and the CLI read through them.

::

    DIR/analysis/
      barrier.json, barrier_path.png, barrier_matrix.png          Fig. 2   (barriers)
      plane_<kind>_tau<t>_L<L>.{json,png}                          Figs. 3, 6 (planes: the mean
      replicates/plane_<kind>_tau<t>_L<L>_rep<r>.json               over replicates, and each one)
      robustness.json, robustness.png                              Fig. 4   (robustness)
      robustness/tau<t>_L<L>_rep<r>.json                                    (one per replicate)
      hessian/level_<L>_rewind_<t>_rep_<r>/{hessian.json, density.npz, density.png, threshold.png}
      hessian/level_<L>_rewind_<t>.{json,png}                      Fig. 5   (mean over replicates)
      prune-scan/level_<L>_rewind_<t>_rep_<r>.json                          (PNG too when alone)
      prune-scan/level_<L>_rewind_<t>.{json,png}                   Fig. 5   (mean over replicates)
      branches/tau<t>_L<L>_rep<r>_<strategy>.json                  one retraining of m^(L) (WR /
                                                                   LRR / FT), its weights' CDF
      weights.json, weights_cdf.png, weights_cdf_full.png,         Figs. 7, 9, 18, 19
      weights_q20.png
      lrr_rewound.json, lrr_rewound.png                            Fig. 8
      paper.json                                                   what `fastimp paper` did
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


ANALYSIS = "analysis"
BARRIER_JSON = "barrier.json"
HESSIAN_JSON, DENSITY_NPZ, DENSITY_PNG, THRESHOLD_PNG = \
    "hessian.json", "density.npz", "density.png", "threshold.png"


def analysis_dir(run) -> Path:
    """``run.dir/analysis`` (``run``: a :class:`fastimp.imp.Run` or a run folder), created."""
    d = Path(getattr(run, "dir", run)) / ANALYSIS
    d.mkdir(parents=True, exist_ok=True)
    return d


def _parsed(files, pattern) -> dict:
    """{the integers ``pattern`` captures in a file's name: its path}, sorted."""
    out = {}
    for p in files:
        m = pattern.fullmatch(p.name)
        if m:
            out[tuple(int(g) for g in m.groups())] = p
    return dict(sorted(out.items()))


# -- Fig. 2 --------------------------------------------------------------------------------
def barrier_json(run) -> Path:
    return analysis_dir(run) / BARRIER_JSON


def barrier_pngs(run):
    """(path figure, matrix figure)."""
    d = analysis_dir(run)
    return d / "barrier_path.png", d / "barrier_matrix.png"


# -- Figs. 3, 6 ----------------------------------------------------------------------------
def plane_name(kind: str, level: int, rewind_step: int, replicate: Optional[int] = None) -> str:
    rep = "" if replicate is None else f"_rep{replicate}"
    return f"plane_{kind}_tau{rewind_step}_L{level}{rep}.json"


def plane_json(run, kind: str, level: int, rewind_step: int,
               replicate: Optional[int] = None) -> Path:
    """The mean over replicates (``replicate=None``) or one replicate's plane."""
    d = analysis_dir(run) if replicate is None else analysis_dir(run) / "replicates"
    return d / plane_name(kind, level, rewind_step, replicate)


def plane_jsons(run, kind: Optional[str] = None):
    """Every mean plane written so far, sorted."""
    pattern = "plane_*.json" if kind is None else f"plane_{kind}_*.json"
    return sorted(analysis_dir(run).glob(pattern))


# -- Fig. 4 --------------------------------------------------------------------------------
def robustness_json(run) -> Path:
    return analysis_dir(run) / "robustness.json"


def robustness_png(run) -> Path:
    return analysis_dir(run) / "robustness.png"


def robustness_part(run, rewind_step: int, level: int, replicate: int) -> Path:
    return analysis_dir(run) / "robustness" / f"tau{rewind_step}_L{level}_rep{replicate}.json"


def robustness_parts(run):
    """{(rewind step, level, replicate): path} of every part on disk."""
    return _parsed((analysis_dir(run) / "robustness").glob("tau*_L*_rep*.json"),
                   re.compile(r"tau(\d+)_L(\d+)_rep(\d+)\.json"))


# -- Fig. 5 --------------------------------------------------------------------------------
def hessian_dir(run, level: int, rewind_step: int, replicate: int) -> Path:
    return analysis_dir(run) / "hessian" / f"level_{level}_rewind_{rewind_step}_rep_{replicate}"


def hessian_json(run, level: int, rewind_step: int, replicate: int) -> Path:
    return hessian_dir(run, level, rewind_step, replicate) / HESSIAN_JSON


def hessian_density(run, level: int, rewind_step: int, replicate: int) -> Path:
    """The saved SLQ spectrum (:class:`fastimp.hessian.SpectralDensity`)."""
    return hessian_dir(run, level, rewind_step, replicate) / DENSITY_NPZ


def hessian_pngs(run, level: int, rewind_step: int, replicate: int):
    """(density figure, threshold figure) of one replicate."""
    d = hessian_dir(run, level, rewind_step, replicate)
    return d / DENSITY_PNG, d / THRESHOLD_PNG


def hessian_summary_json(run, level: int, rewind_step: int) -> Path:
    return analysis_dir(run) / "hessian" / f"level_{level}_rewind_{rewind_step}.json"


def hessian_summaries(run):
    return sorted((analysis_dir(run) / "hessian").glob("level_*_rewind_*.json"))


def prune_scan_json(run, level: int, rewind_step: int, replicate: Optional[int] = None) -> Path:
    rep = "" if replicate is None else f"_rep_{replicate}"
    return analysis_dir(run) / "prune-scan" / f"level_{level}_rewind_{rewind_step}{rep}.json"


def prune_scan_summaries(run):
    return sorted(p for p in (analysis_dir(run) / "prune-scan").glob("level_*_rewind_*.json")
                  if "_rep_" not in p.name)


# -- Figs. 7, 8, 9 ---------------------------------------------------------------------------
def branch_json(run, rewind_step: int, level: int, replicate: int, strategy: str) -> Path:
    return analysis_dir(run) / "branches" / f"tau{rewind_step}_L{level}_rep{replicate}_{strategy}.json"


def branch_jsons(run, strategy: str):
    """{(rewind step, level, replicate): path} of every branch of ``strategy`` on disk."""
    return _parsed((analysis_dir(run) / "branches").glob(f"tau*_L*_rep*_{strategy}.json"),
                   re.compile(rf"tau(\d+)_L(\d+)_rep(\d+)_{re.escape(strategy)}\.json"))


def weights_json(run) -> Path:
    return analysis_dir(run) / "weights.json"


def weights_pngs(run):
    """(CDFs zoomed in (Figs. 7, 18), CDFs zoomed out (Fig. 19), 20th percentiles (Fig. 9))."""
    d = analysis_dir(run)
    return d / "weights_cdf.png", d / "weights_cdf_full.png", d / "weights_q20.png"


def lrr_rewound_json(run) -> Path:
    return analysis_dir(run) / "lrr_rewound.json"


def lrr_rewound_png(run) -> Path:
    return analysis_dir(run) / "lrr_rewound.png"


# -- fastimp paper ----------------------------------------------------------------------------
def paper_json(run) -> Path:
    return analysis_dir(run) / "paper.json"
