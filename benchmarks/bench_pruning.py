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
    torch.manual_seed(0)
    if name == "tiny":  # the gpu_check dry run: seconds on a CPU
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(),
                             nn.Linear(16, 10)).to(device)
    import torchvision
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


def histogram_table(device, numel: int, repeat: int = 10) -> Table:
    """Atomic contention of the histogram pass: Gaussian weights (keys crowd a few hundred of the
    65,536 bins) against uniform keys (random bit patterns spread over every finite bin); the
    Triton pass with relaxed and with acq_rel atomics, and the whole threshold per backend."""
    device = torch.device(device)
    t = Table(f"magnitude threshold: histogram atomics, {numel:,} float32 weights, {device.type}")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "Gaussian weights": torch.randn(numel, generator=g),
        "uniform keys": torch.randint(0, 0x7F800000, (numel,), generator=g,
                                      dtype=torch.int32).view(torch.float32),
    }
    dev_type = device.type
    for dist, w in inputs.items():
        w = w.to(device)
        if _backend.status("magnitude_threshold", "triton", dev_type) and dev_type == "cuda":
            from fastimp.kernels.magnitude_threshold import first_histogram
            base = None
            for sem in ("acq_rel", "relaxed"):
                sec = timeit(lambda: first_histogram([w], sem=sem), device, repeat=repeat)
                label = f"triton histogram pass 1 ({sem})"
                t.add(dist, label, sec, baseline=base,
                      extra=f"{numel * 4 / sec / 1e9:.0f} GB/s of weights")
                base = base or label
        for b in ("cuda", "triton", "cpu", "torch"):
            if not _backend.status("magnitude_threshold", b, dev_type) or (
                    b == "triton" and dev_type == "cpu"):
                continue
            out = [torch.empty_like(w, dtype=torch.bool)]
            sec = timeit(lambda: _op.magnitude_threshold([w], None, fraction=FRACTION, out=out,
                                                         backend=b),
                         device, warmup=1, repeat=max(2, repeat // 3), min_time=0)
            t.add(dist, f"whole threshold ({b})", sec)
        del w
    return t


def tables(device, quick: bool, models=("resnet18", "resnet50")) -> List[Table]:
    device = torch.device(device)
    backend = _backend.resolve_name("magnitude_threshold", "auto", device)
    t = Table(f"Global magnitude pruning, {FRACTION:.0%} of the unmasked weights, {device.type} "
              f"(fastimp backend: {backend})")
    repeat = 3 if quick else 7
    for name in models:
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
