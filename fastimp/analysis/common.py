"""What the analyses share: the device, the evaluation data (read once), the matching threshold of
the landscape contours, mean ± std over replicates, and the check that lets a rerun skip what is
already written with the same parameters."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from fastimp._io import save_json


def default_device(device: Optional[str] = None) -> str:
    """``device``, else cuda when available, else cpu."""
    if device is not None and device != "auto":
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_data(run, split: str = "test", max_examples: Optional[int] = None,
              batch_size: Optional[int] = None, device="cpu") -> List:
    """The split as a list of (x, y) batches on ``device`` (read once, reused by every chunk)."""
    it = run.test_data(batch_size, device="cpu") if split == "test" else \
        run.train_data(batch_size, device="cpu")
    out, n = [], 0
    for x, y in it:
        if max_examples is not None:
            x, y = x[:max_examples - n], y[:max_examples - n]
        if len(y) == 0:
            break
        out.append((x.to(device), y.to(device)))
        n += len(y)
        if max_examples is not None and n >= max_examples:
            break
    if not out:
        raise ValueError(f"the run's {split} set is empty")
    return out


def split_over_ranks() -> bool:
    """Whether the analyses run under torchrun with several ranks: then every rank calls them,
    the landscape points and Hessian probes are split over the ranks and gathered, and rank 0
    writes (``fastimp.distributed.main_writes``)."""
    from fastimp import distributed
    return distributed.active() and distributed.world_size() > 1


def eval_kwargs(run, device, bn: str = "interpolate", bn_examples: Optional[int] = 2048,
                chunk_size: Optional[int] = None) -> Dict[str, Any]:
    """Keyword arguments of ``fastimp.landscape.evaluate`` for the BatchNorm mode asked (and the
    split of the points over the ranks under torchrun)."""
    if bn not in ("interpolate", "reset"):
        raise ValueError(f"bn: expected 'interpolate' or 'reset', got {bn!r}")
    kw: Dict[str, Any] = {"bn": bn, "device": device}
    if split_over_ranks():
        kw["distributed"] = True
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    if bn == "reset":
        kw["train_data"] = load_data(run, "train", bn_examples, device=device)
    return kw


def dense_error(run, rewind_step: int, model, data, replicate: int, **ekw) -> Optional[float]:
    """E(w_T) of one replicate on ``data`` (the examples the landscape is evaluated on)."""
    from fastimp.landscape.evaluate import evaluate
    from fastimp.landscape.space import StateLayout
    if 0 not in run.levels(rewind_step, replicate):
        return None
    ev = evaluate(model, run.solution(0, rewind_step, replicate),
                  torch.zeros(0, StateLayout(model).D), torch.zeros(1, 0), data, **ekw)
    return float(ev.error[0])


def run_eps(run, rewind_step: int, eps: Optional[float] = None):
    """(eps, source): given, else the run's (std of the dense replicates' test errors), else 0."""
    if eps is not None:
        return float(eps), "given"
    rows = [s for s in run.summary() if s["rewind_step"] == rewind_step and s["level"] == 0]
    if rows and rows[0]["eps"] is not None:
        return float(rows[0]["eps"]), rows[0]["eps_source"]
    return 0.0, "one replicate: eps = 0 (pass --eps)"


def matching_error(run, rewind_step: int, model, data, replicate=0,
                   eps: Optional[float] = None, **ekw) -> Dict:
    """E(w_T) + eps (Definition 2.2) for the contours, with E(w_T) the dense (level 0) solutions'
    error on the same examples the landscape is evaluated on, averaged over ``replicate`` (an
    index or a list); eps: given, else the run's, else 0 with one replicate."""
    reps = [replicate] if isinstance(replicate, int) else list(replicate)
    errs = [dense_error(run, rewind_step, model, data, r, **ekw) for r in reps]
    errs = [e for e in errs if e is not None]
    if not errs:
        return {"matching_error": None, "dense_error": None, "eps": eps,
                "eps_source": "no dense level"}
    e, source = run_eps(run, rewind_step, eps)
    dense = sum(errs) / len(errs)
    return {"matching_error": dense + e, "dense_error": dense, "eps": e, "eps_source": source}


def mean_std(values: Iterable[float]) -> Dict[str, Any]:
    """{"mean", "std" (unbiased; None for one value), "n"} of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": m, "std": s, "n": len(v)}


def mean_std_arrays(arrays: Sequence[Sequence[float]]):
    """Elementwise mean and std (unbiased; zeros for one array) of equally shaped arrays, as
    nested lists."""
    import numpy as np
    a = np.asarray(arrays, dtype=np.float64)
    mean = a.mean(0)
    std = a.std(0, ddof=1) if a.shape[0] > 1 else np.zeros_like(mean)
    return mean.tolist(), std.tolist()


def normalized(params: Dict[str, Any]) -> Dict[str, Any]:
    """``params`` as JSON would give them back (tuples -> lists, ...)."""
    return json.loads(json.dumps(params, default=str))


def read_output(path: Path, command: Optional[str] = None) -> Any:
    """The analysis output (JSON) at ``path``, checked: an unreadable one is a
    :class:`fastimp.imp.verify.CorruptFileError`, one line naming the file and the fix (delete
    it and rerun ``command``, the analysis that wrote it)."""
    from fastimp.imp.verify import read_json
    rerun = f"`{command}`" if command else "the analysis that wrote it"
    return read_json(path, f"delete it and rerun {rerun}")


def read(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON at ``path`` (an analysis' own output, or a part of it that a rerun can skip), or
    None when it is missing; an unreadable one is None too (recomputed), with a
    :class:`fastimp.imp.verify.RecomputeWarning` naming it."""
    from fastimp.imp.verify import CorruptFileError, RecomputeWarning
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_output(path)
    except CorruptFileError as exc:
        import warnings
        warnings.warn(RecomputeWarning(f"{path} {exc.problem}: computing it again"),
                      stacklevel=2)
        return None


def current(path: Path, params: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The JSON at ``path`` if it exists and was written with these ``params``, else None."""
    data = read(path)
    return data if data is not None and data.get("params") == normalized(params) else None


def write(path: Path, params: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``{"params": params, **result}`` atomically; returns what was written."""
    out = {"params": normalized(params), **result}
    save_json(out, path)
    return out


def finished_levels(run, rewind_step: int, replicates: Sequence[int]) -> List[int]:
    """The levels finished by every one of ``replicates``."""
    sets = [set(run.levels(rewind_step, r)) for r in replicates]
    return sorted(set.intersection(*sets)) if sets else []


def pick_levels(available: Sequence[int], levels: Optional[Sequence[int]]) -> List[int]:
    """``levels`` ∩ ``available`` (all of ``available`` when ``levels`` is None)."""
    if levels is None:
        return list(available)
    for L in levels:
        if isinstance(L, bool) or not isinstance(L, int) or L < 0:
            raise ValueError(f"levels: expected ints >= 0, got {list(levels)!r}")
    return [L for L in available if L in set(levels)]


def replicate_list(run, replicate=None) -> List[int]:
    """All replicates (``None``), one index or a list of indices, checked."""
    reps = run.replicates if replicate is None else \
        ([replicate] if isinstance(replicate, int) else list(replicate))
    for r in reps:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(run.seeds):
            raise ValueError(f"replicate: expected an index in [0, {len(run.seeds)}), got {r!r}")
    return reps


def rewind_list(run, rewind_steps=None) -> List[int]:
    taus = run.rewind_steps if rewind_steps is None else \
        ([rewind_steps] if isinstance(rewind_steps, int) else list(rewind_steps))
    for t in taus:
        if t not in run.rewind_steps:
            raise ValueError(f"rewind_step: {t!r} is not one of this run's rewind steps "
                             f"{run.rewind_steps}")
    return [int(t) for t in taus]


def prunable_names(run) -> List[str]:
    from fastimp.masks import prunable
    return list(prunable(run.build_model()))


def plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_fig(fig, path) -> Path:
    """Save a matplotlib figure atomically and close it."""
    from fastimp._io import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt().close(fig)
    return Path(path)


def figure(report_dir, name: str, src, draw, data=None) -> str:
    """Put a figure into the report: a copy of the analysis' PNG ``src`` when it is there and not
    older than the JSON it shows (``data``: a path or a list of paths; default the JSON beside
    it), else ``draw(path)``. Returns ``name``."""
    import shutil
    dst = Path(report_dir) / name
    src = None if src is None else Path(src)
    if src is not None and src.exists():
        data = [src.with_suffix(".json")] if data is None else \
            [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
        if all(not d.exists() or d.stat().st_mtime <= src.stat().st_mtime for d in data):
            shutil.copyfile(src, dst)
            return name
    draw(dst)
    return name


def pm(value, std=None, pct: bool = True) -> str:
    """"12.34 ± 0.56%" (``pct``: fractions shown in percent) or "0.123 ± 0.045"; ``value`` may be a
    {"mean", "std"} dict; None -> "n/a"."""
    if isinstance(value, dict):
        value, std = value.get("mean"), value.get("std")
    if value is None:
        return "n/a"
    if pct:
        s = f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
        return s + "%"
    return f"{value:.3g}" + (f" ± {std:.2g}" if std is not None else "")


def integer_levels(ax):
    """Level numbers on the x axis: integer ticks only."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def error_vs_remaining(ax, title: str):
    """Axes of an error-against-weights-remaining plot (log x, sparser to the right)."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
