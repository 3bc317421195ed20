"""Magnitude and random pruning (Algorithm 1 line 5 of the paper, and its random control).

Both remove exactly k = round(fraction · n) of the n weights that are still unmasked
(Python's round, half to even): ``scope="global"`` counts n over all prunable tensors together,
``scope="layer"`` per tensor. One rule for ``fraction`` in [0, 1]: at least one weight must
remain, so k = n > 0 (``fraction=1``, or 0.999999 of fewer than 500,000 weights) is an error. Magnitude pruning removes the smallest |w| first; ties are broken by
position — tensors in prunable (``named_parameters()``) order, then row-major flat index, the
earlier position pruned first — so the result is deterministic and the same on every backend.
Only unmasked weights are looked at: pruned weights may hold any value.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastimp.masks import Include, Masks, prunable
from fastimp.ops.magnitude_threshold import magnitude_threshold

WeightsLike = Union[nn.Module, Mapping]


def _check_fraction(fraction, fn: str) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) and not (
            isinstance(fraction, torch.Tensor) and fraction.numel() == 1):
        raise TypeError(f"{fn}: argument 'fraction': expected a number in [0, 1], got "
                        f"{type(fraction).__name__}")
    f = float(fraction)
    if not (0.0 <= f <= 1.0):
        raise ValueError(f"{fn}: argument 'fraction': expected a number in [0, 1], got {f}")
    return f


def _count(fraction: float, n: int, fn: str, where: str = "") -> int:
    """k = round(fraction · n), which must leave at least one of the n weights."""
    k = round(fraction * n)
    if n and k >= n:
        raise ValueError(f"{fn}: argument 'fraction': {fraction} of the {n} unmasked weights"
                         f"{where} rounds to all of them; at least one must remain")
    return k


def _n_free(w: torch.Tensor, m: Optional[torch.Tensor]) -> int:
    return w.numel() if m is None else int(m.count_nonzero())


def _threshold(ws, ms, names, k: int, backend: str, fn: str):
    """``magnitude_threshold`` with its non-finite error naming the parameter."""
    try:
        return magnitude_threshold(ws, ms, k, backend=backend)
    except ValueError as exc:
        if "NaN or inf" not in str(exc):
            raise
        bad = {n: int((~torch.isfinite(w if m is None else w[m])).sum())
               for n, w, m in zip(names, ws, ms if ms is not None else [None] * len(ws))}
        bad = {n: c for n, c in bad.items() if c}
        raise ValueError(f"{fn}: {sum(bad.values())} unmasked weights are NaN or inf (in "
                         f"{', '.join(f'{n!r} ({c})' for n, c in bad.items())}): the weights "
                         "diverged or are corrupt") from None


def _gather(model_or_weights: WeightsLike, masks, include: Include,
            fn: str) -> Tuple[List[str], List[torch.Tensor], Optional[List[torch.Tensor]]]:
    """Names, weight tensors and (validated, bool, on the weights' device) masks."""
    if isinstance(model_or_weights, nn.Module):
        if masks is not None:
            params = dict(model_or_weights.named_parameters())
            missing = [n for n in masks if n not in params]
            if missing:
                raise ValueError(f"{fn}: argument 'masks': the model has no parameters named "
                                 f"{missing}")
            weights = {n: params[n] for n in params if n in masks}
        else:
            weights = prunable(model_or_weights, include)
    elif isinstance(model_or_weights, Mapping):
        weights = dict(model_or_weights)
        for n, w in weights.items():
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{fn}: argument 'model_or_weights': {n!r} is not a tensor")
        if masks is not None and set(masks) != set(weights):
            raise ValueError(f"{fn}: argument 'masks': expected masks for exactly the weights "
                             f"{sorted(weights)}, got {sorted(masks)}")
    else:
        raise TypeError(f"{fn}: argument 'model_or_weights': expected an nn.Module or a mapping "
                        f"name -> tensor, got {type(model_or_weights).__name__}")
    if not weights:
        raise ValueError(f"{fn}: nothing prunable (no weights selected; pass 'include' or "
                         f"weights by name)")
    names = list(weights)
    ws = []
    for n in names:
        w = weights[n].detach()
        if not w.is_floating_point():
            raise TypeError(f"{fn}: weight {n!r} must be floating point, got {w.dtype}")
        ws.append(w)
    if masks is None:
        return names, ws, None
    if not isinstance(masks, Masks):
        if not isinstance(masks, Mapping):
            raise TypeError(f"{fn}: argument 'masks': expected Masks or a mapping name -> "
                            f"tensor, got {type(masks).__name__}")
        masks = Masks(masks)
    ms = []
    for n, w in zip(names, ws):
        m = masks[n]
        if m.shape != w.shape:
            raise ValueError(f"{fn}: argument 'masks': mask {n!r} has shape {tuple(m.shape)}, "
                             f"the weight has shape {tuple(w.shape)}")
        ms.append(m.to(w.device))
    return names, ws, ms


def prune_magnitude(model_or_weights: WeightsLike, fraction: float, masks=None,
                    scope: str = "global", backend: str = "auto",
                    include: Include = None) -> Masks:
    """New masks removing round(fraction·n) of the n unmasked weights, smallest |w| first.

    ``model_or_weights``: a model (its ``prunable(model, include)`` weights, or the parameters
    named by ``masks``) or ``{name: tensor}``. ``masks``: the current masks (None: all ones).
    NaN/inf in an unmasked weight is an error."""
    fn = "prune_magnitude"
    fraction = _check_fraction(fraction, fn)
    if scope not in ("global", "layer"):
        raise ValueError(f"{fn}: argument 'scope': expected 'global' or 'layer', got {scope!r}")
    names, ws, ms = _gather(model_or_weights, masks, include, fn)
    free = [_n_free(w, None if ms is None else ms[i]) for i, w in enumerate(ws)]
    if scope == "global":
        k = _count(fraction, sum(free), fn)
        out = _threshold(ws, ms, names, k, backend, fn).masks
    else:
        out = []
        for i, w in enumerate(ws):
            k = _count(fraction, free[i], fn, f" of {names[i]!r}")
            m = None if ms is None else [ms[i]]
            out.append(_threshold([w], m, [names[i]], k, backend, fn).masks[0])
    return Masks._trusted(dict(zip(names, out)))


def _random_keep(n: int, k: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=gdev)
    keep = torch.ones(n, dtype=torch.bool, device=gdev)
    keep[perm[:k]] = False
    return keep.to(device)


def prune_random(model_or_weights: WeightsLike, fraction: float, masks=None,
                 scope: str = "global", generator: Optional[torch.Generator] = None,
                 include: Include = None) -> Masks:
    """New masks removing round(fraction·n) of the n unmasked weights chosen uniformly at random
    (the paper's random-pruning control); ``generator`` makes it reproducible."""
    fn = "prune_random"
    fraction = _check_fraction(fraction, fn)
    if scope not in ("global", "layer"):
        raise ValueError(f"{fn}: argument 'scope': expected 'global' or 'layer', got {scope!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: argument 'generator': expected a torch.Generator")
    names, ws, ms = _gather(model_or_weights, masks, include, fn)
    free = ([torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in ws] if ms is None
            else ms)
    counts = [int(m.count_nonzero()) for m in free]
    out: Dict[str, torch.Tensor] = {}
    if scope == "global":
        n = sum(counts)
        keep = _random_keep(n, _count(fraction, n, fn), generator, ws[0].device)
        off = 0
        for name, m, c in zip(names, free, counts):
            o = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
            o.view(-1)[m.reshape(-1)] = keep[off:off + c].to(m.device)
            off += c
            out[name] = o
    else:
        for name, m, c in zip(names, free, counts):
            keep = _random_keep(c, _count(fraction, c, fn, f" of {name!r}"), generator, m.device)
            o = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
            o.view(-1)[m.reshape(-1)] = keep
            out[name] = o
    return Masks._trusted(out)


__all__ = ["prune_magnitude", "prune_random"]
