"""Masked SGD step: fastimp's ``MaskedSGD`` against ``torch.optim.SGD`` (for-loop, foreach, fused)
followed by the mask multiply, on the parameter shapes of torchvision's ResNet-18 and ResNet-50.

Settings of the paper's CIFAR runs (momentum 0.9, weight decay 5e-4, fp32); every conv and
linear weight masked (bool, ~20 % pruned), the rest plain SGD. Traffic floor: read p, g, buf
(+ 1 B mask where masked), write p, buf = 21 B per masked param (20 B unmasked); GB/s is that
floor over the measured time. Speedups are against the fastest baseline measured in the same run.
On a GPU, also: each step's host time (launch cost seen by the CPU, no sync), the same steps
replayed from a CUDA graph (lr as a device tensor), and :func:`bandwidth_table` (one large tensor
against ``copy_``).
"""
from __future__ import annotations

import functools
import itertools
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks.common import Table, sync, timeit
from fastimp import _backend
from fastimp.optim import MaskedSGD

HPARAMS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def resnet_shapes(name: str) -> List[Tuple[Tuple[int, ...], bool]]:
    """(shape, prunable) of every parameter of ``torchvision.models.<name>()``, built without
    weights on the meta device (no download, no init); "tiny": a few small tensors (dry runs)."""
    if name == "tiny":
        return [((16, 3, 3, 3), True), ((16,), False), ((10, 64), True), ((10,), False)]
    import torchvision
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    out = []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            prunable = pname == "weight" and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
            out.append((tuple(p.shape), prunable))
    return out


def _make(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, masks = [], {}
    for shape, prunable in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
        if prunable:
            masks[p] = (torch.rand(shape, generator=gen) > 0.2).to(device)
    return params, masks


def _warm_buffers(opt):
    opt.step()  # creates the momentum buffers: the steady state is what we time


def _baseline(shapes, device, kw, mask_dtype):
    params, masks = _make(shapes, device)
    opt = torch.optim.SGD(params, **HPARAMS, **kw)
    _warm_buffers(opt)  # raises for fused SGD on a device torch does not support
    mp = [p for p in params if p in masks]
    mm = [masks[p].to(mask_dtype) for p in mp]
    mb = [opt.state[p]["momentum_buffer"] for p in mp]
    if kw.get("foreach") is False:
        def step():
            opt.step()
            with torch.no_grad():
                for p, b, m in zip(mp, mb, mm):
                    p.mul_(m)
                    b.mul_(m)
    else:
        def step():
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(mp, mm)
                torch._foreach_mul_(mb, mm)
    return step


def baselines(shapes, device) -> Dict[str, Callable[[], Callable[[], None]]]:
    """Factories of torch.optim.SGD step + ``p.mul_(m)``, ``buf.mul_(m)``: what users write
    today, with the masks kept as bool (1 B/param) or float (multiplied without a conversion)."""
    out = {}
    variants = [("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                ("fused", dict(fused=True))]
    for (name, kw), mask_dtype in itertools.product(variants, (torch.bool, torch.float32)):
        label = "bool" if mask_dtype == torch.bool else "float"
        out[f"torch SGD {name} + {label} mask"] = functools.partial(_baseline, shapes, device, kw,
                                                                    mask_dtype)
    return out


def _candidate(shapes, device, backend, lr_tensor=False):
    params, masks = _make(shapes, device)
    hp = dict(HPARAMS)
    if lr_tensor:
        hp["lr"] = torch.tensor(hp["lr"], device=device)
    opt = MaskedSGD(params, **hp, masks=masks, backend=backend)
    _warm_buffers(opt)
    return opt.step


def capture(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph after warm-up steps on a side stream; returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def host_seconds(step: Callable[[], object], device, n: int = 30) -> float:
    """Median CPU time of one call (what the host spends issuing it; the device is idle before
    each call, so no launch waits for a full queue)."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sync(device)
    return statistics.median(times)


def candidates(shapes, device) -> Dict[str, Callable[[], Callable[[], None]]]:
    """Factories of ``MaskedSGD.step`` for every backend available on ``device``."""
    out = {}
    dev_type = torch.device(device).type
    for b in ("cpu", "cuda", "triton", "torch"):
        if not _backend.status("masked_sgd", b, dev_type):
            continue
        if b == "triton" and dev_type == "cpu":
            continue  # the interpreter: a test tool, not a backend to time
        out[f"fastimp MaskedSGD ({b})"] = functools.partial(_candidate, shapes, device, b)
    return out


def _time(make, device, repeat):
    try:
        fn = make()
    except (RuntimeError, ValueError):
        return None  # not supported here (e.g. fused SGD on this device)
    t = timeit(fn, device, repeat=repeat)
    sync(device)
    del fn
    return t


def floor_bytes(shapes) -> int:
    n = 0
    for shape, prunable in shapes:
        numel = 1
        for s in shape:
            numel *= s
        n += numel * (21 if prunable else 20)
    return n


def _table(device: str, models, repeat: int, title: str) -> Table:
    table = Table(title)
    for name in models:
        shapes = resnet_shapes(name)
        n_params = sum(torch.Size(s).numel() for s, _ in shapes)
        case = f"{name} ({n_params / 1e6:.1f} M params, {len(shapes)} tensors)"
        nbytes = floor_bytes(shapes)
        times = {}
        for impl, make in baselines(shapes, device).items():
            t = _time(make, device, repeat)
            if t is not None:
                times[impl] = t
        best = min(times, key=times.get)
        for impl, t in times.items():
            table.add(case, impl, t, baseline=None if impl == best else best,
                      extra=f"{nbytes / t / 1e9:.1f} GB/s" + (" (best baseline)" if impl == best else ""))
        copy_bw = _copy_bandwidth(nbytes, device, repeat)
        table.add(case, "torch copy_ of the same bytes (bandwidth reference)", nbytes / copy_bw,
                  extra=f"{copy_bw / 1e9:.1f} GB/s")
        for impl, make in candidates(shapes, device).items():
            t = _time(make, device, repeat)
            if t is None:
                continue
            table.add(case, impl, t, baseline=best,
                      extra=f"{nbytes / t / 1e9:.1f} GB/s = {nbytes / t / copy_bw:.0%} of copy")
        if torch.device(device).type == "cuda":
            _gpu_rows(table, case, shapes, device, repeat, best, nbytes, copy_bw)
    return table


def _gpu_rows(table, case, shapes, device, repeat, best, nbytes, copy_bw) -> None:
    """Host time per step, and steps replayed from a CUDA graph (best baseline vs MaskedSGD)."""
    makers = {best: baselines(shapes, device)[best]}
    for b in ("cuda", "triton"):
        if _backend.status("masked_sgd", b, "cuda"):
            makers[f"fastimp MaskedSGD ({b})"] = functools.partial(_candidate, shapes, device, b,
                                                                   lr_tensor=True)
    for impl, make in makers.items():
        try:
            step = make()
            host = host_seconds(step, device)
            table.add(case, f"{impl}: host time per step", host,
                      extra="CPU time to issue one step, no sync")
            replay = capture(step)
            t = timeit(replay, device, repeat=repeat)
        except Exception as exc:  # noqa: BLE001 - a row that says why
            table.add(case, f"{impl}: CUDA graph replay", float("nan"),
                      extra=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        table.add(case, f"{impl}: CUDA graph replay", t,
                  baseline=None if impl == best else f"{best}: CUDA graph replay",
                  extra=f"{nbytes / t / 1e9:.1f} GB/s = {nbytes / t / copy_bw:.0%} of copy")


def bandwidth_table(device, numel: int, dtypes=(torch.float32, torch.bfloat16),
                    repeat: int = 10, backends: Optional[List[str]] = None) -> Table:
    """One tensor of ``numel`` elements (momentum, weight decay, bool mask): masked SGD moves
    (5 x element size + 1) bytes per element; ``copy_`` of the param moves 2 x element size.
    The share is the step's bytes/s over copy_'s."""
    dev_type = torch.device(device).type
    table = Table(f"masked SGD bandwidth at {numel:,} elements vs copy_ ({device})")
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(numel, generator=gen).to(device, dtype)
        g = torch.randn(numel, generator=gen).to(device, dtype)
        b = torch.randn(numel, generator=gen).to(device, dtype)
        m = (torch.rand(numel, generator=gen) > 0.2).to(device)
        dst = torch.empty_like(p)
        esize = p.element_size()
        case = f"{str(dtype).replace('torch.', '')}, {numel:,} elements"
        t_copy = timeit(lambda: dst.copy_(p), device, repeat=repeat)
        copy_bw = 2 * esize * numel / t_copy
        table.add(case, "copy_", t_copy, extra=f"{copy_bw / 1e9:.0f} GB/s")
        step_bytes = (5 * esize + 1) * numel
        names = backends or [x for x in ("cuda", "triton", "cpu")
                             if _backend.status("masked_sgd", x, dev_type)
                             and not (x == "triton" and dev_type == "cpu")]
        from fastimp.ops.masked_sgd import masked_sgd_
        lr = torch.tensor(1e-6, device=device)
        for name in names:
            def step():
                masked_sgd_([p], [g], [b], [m], lr=lr, momentum=0.9, weight_decay=5e-4,
                            backend=name)
            sec = timeit(step, device, repeat=repeat)
            bw = step_bytes / sec
            table.add(case, f"masked_sgd_ ({name})", sec,
                      extra=f"{bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy_")
        del p, g, b, m, dst
    return table


def _copy_bandwidth(nbytes: int, device, repeat: int) -> float:
    """Bytes/s of a device-to-device ``copy_`` moving ``nbytes`` (read + write) in fp32."""
    n = nbytes // 8
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeat=repeat)
    del src, dst
    return nbytes / t


def tables(device: str, quick: bool) -> List[Table]:
    _backend._load_ops()
    models = ["resnet18"] if quick else ["resnet18", "resnet50"]
    repeat = 5 if quick else 10
    title = "masked SGD step (momentum 0.9, wd 5e-4, fp32, 21 B/param floor)"
    if torch.device(device).type != "cpu":
        return [_table(device, models, repeat, f"{title} on {device}")]
    threads = torch.get_num_threads()
    out = [_table(device, models, repeat, f"{title} on cpu, {threads} threads")]
    if not quick and threads > 1:
        # one thread: the same comparison without OpenMP scheduling (robust on a busy machine)
        torch.set_num_threads(1)
        try:
            out.append(_table(device, ["resnet18"], repeat, f"{title} on cpu, 1 thread"))
        finally:
            torch.set_num_threads(threads)
    return out
