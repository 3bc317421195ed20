"""Global magnitude pruning of torchvision ResNet-18 / ResNet-50 (no pretrained weights; the
prunable conv + linear weights): fastimp.prune_magnitude against
``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` and against ``torch.cat`` +
``torch.kthvalue``, at the first level (nothing masked) and at a later level (half the weights
already masked), all measured in one run."""
from __future__ import annotations

import copy
import statistics
import time
from typing import List

import torch
from torch import nn
from torch.nn.utils import prune

import fastimp
from benchmarks.common import Table, sync, timeit
from fastimp import _backend
from fastimp.ops import magnitude_threshold as _op  # noqa: F401  (registers the op)

FRACTION = 0.2


def _model(name: str, device) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).to(device)


def _torch_params(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _time_global_unstructured(model, device, repeat: int, masks=None) -> float:
    """Median of ``repeat`` calls, each on a fresh copy (prepared outside the timing)."""
    times = []
    for _ in range(repeat):
        m = copy.deepcopy(model)
        if masks is not None:
            masks.to_torch_prune(m)
        params = _torch_params(m)
        sync(device)
        t0 = time.perf_counter()
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=FRACTION)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cat_kthvalue(weights, masks):
    """What users write today: concatenate the unmasked |w|, k-th value, compare."""
    if masks is None:
        a = torch.cat([w.abs().reshape(-1) for w in weights])
    else:
        a = torch.cat([w.abs()[m] for w, m in zip(weights, masks)])
    k = round(FRACTION * a.numel())
    v = torch.kthvalue(a.cpu() if a.is_cuda else a, k).values.to(a.device)
    if masks is None:
        return [w.abs() > v for w in weights]
    return [m & (w.abs() > v) for w, m in zip(weights, masks)]


def tables(device, quick: bool) -> List[Table]:
    device = torch.device(device)
    backend = _backend.resolve_name("magnitude_threshold", "auto", device)
    t = Table(f"Global magnitude pruning, {FRACTION:.0%} of the unmasked weights, {device.type} "
              f"(fastimp backend: {backend})")
    repeat = 3 if quick else 7
    for name in ("resnet18", "resnet50"):
        dense = _model(name, device)
        n = sum(p.numel() for p in fastimp.prunable(dense).values())
        half = fastimp.prune_magnitude(dense, 0.5)  # a later level: half the weights pruned
        pruned = half.apply_(copy.deepcopy(dense))
        for level, model, masks in (("level 1", dense, None), ("later level", pruned, half)):
            case = f"{name} ({n / 1e6:.1f} M), {level}"
            weights = [p.detach() for p in fastimp.prunable(model).values()]
            mlist = None if masks is None else [masks[k] for k in fastimp.prunable(model)]
            gu = _time_global_unstructured(model, device, 1 if quick else 3, masks)
            t.add(case, "global_unstructured", gu)
            kth = timeit(lambda: _cat_kthvalue(weights, mlist), device, warmup=1,
                         repeat=2 if quick else 3, min_time=0)
            t.add(case, "cat + kthvalue", kth)
            ours = timeit(lambda: fastimp.prune_magnitude(model, FRACTION, masks), device,
                          warmup=2, repeat=repeat * 2)
            t.add(case, "fastimp.prune_magnitude", ours, baseline="global_unstructured",
                  extra=f"{kth / ours:.1f}x vs cat + kthvalue")
    return [t]
