"""Batched weight-space evaluation (fastimp.landscape.evaluate) against the lean loop users write
today: per point, build the state dict, ``load_state_dict``, evaluate on data already in memory.

Cases: K = 9 path points (Appendix B's betas 0.1..0.9) and a G x G slice through three points
(Figs. 3 and 6; G = 51, quick: 11), on the MNIST-1D MLP and CNN and on ResNet-20 over CIFAR-shaped
images. The FLOP column is the forward FLOP count of all K models on the data (the floor: the
work cannot go below it), with the rate each implementation reaches.
"""
from __future__ import annotations

import copy
import os

import torch

from benchmarks.common import Table, sync, timeit


def _flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def _lean_loop(model, states_fn, K, data, device):
    """The baseline: for each point its state dict, load_state_dict, evaluate."""
    net = copy.deepcopy(model).to(device).eval()

    def run():  # error and loss per point, as fastimp.landscape.evaluate returns
        out = []
        for k in range(K):
            net.load_state_dict(states_fn(k))
            wrong = torch.zeros((), device=device)
            loss = torch.zeros((), device=device)
            with torch.no_grad():
                for x, y in data:
                    logits = net(x)
                    wrong += (logits.argmax(-1) != y).sum()
                    loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            out.append(torch.stack([wrong, loss]))
        return torch.stack(out).cpu()
    return run


def _case(table, name, model, shape, n_images, K_kind, G, device, repeat, sample_rows=None,
          both=True):
    """One case: the loop, fastimp's vmap and per-point paths (``both``, else only auto's).
    ``sample_rows``: time the loop on that many rows of the G x G grid and scale to G rows (its
    cost per point is constant; the full loop takes too long on a 2-core CPU)."""
    from fastimp.landscape import StateLayout, evaluate
    torch.manual_seed(0)
    model = model.eval()
    layout = StateLayout(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_images, *shape, generator=g)
    y = torch.randint(0, 10, (n_images,), generator=g)
    bs = 512 if device == "cpu" else 2048
    data = [(x[i:i + bs].to(device), y[i:i + bs].to(device)) for i in range(0, n_images, bs)]
    w0 = layout.flatten(model).to(device)
    sd0 = {k: v.to(device) for k, v in model.state_dict().items()}
    d1 = 0.05 * torch.randn(layout.D, generator=g).to(device) * w0.abs().mean()
    d2 = 0.05 * torch.randn(layout.D, generator=g).to(device) * w0.abs().mean()
    if K_kind == "path":
        C = torch.arange(1, 10, dtype=torch.float32)[:, None] / 10
        U = d1[None]
        case = f"{name}, path K=9, {n_images} images"
    else:
        t = torch.linspace(-0.5, 1.5, G)
        C = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
        U = torch.stack([d1, d2])
        case = f"{name}, slice {G}x{G}, {n_images} images"
    K = C.shape[0]
    Cd = C.to(device)

    def states_fn(k):  # what users do: the point's state dict from the end points
        w = w0 + Cd[k] @ U
        return layout.state_dict(w, like=sd0)

    flops = _flops(copy.deepcopy(model).to(device), data[0][0]) * n_images / len(data[0][0]) * K
    K_loop = K if sample_rows is None or K_kind == "path" else min(K, sample_rows * G)
    base = _lean_loop(model, states_fn, K_loop, data, device)
    warmup = 1 if K_kind == "path" else 0  # slices: one timed run each (minutes on the CPU)
    t_loop = timeit(base, device, warmup=warmup, repeat=repeat if K_kind == "path" else 1, min_time=0)
    note = lambda t: f"{flops / 1e9:.2f} GFLOP, {flops / t / 1e9:.1f} GFLOP/s"
    t_loop *= K / K_loop
    scaled = f"; timed on {K_loop // G} of {G} rows, scaled x{K / K_loop:.1f}" if K_loop < K else ""
    table.add(case, "loop: state dict + load_state_dict + eval", t_loop, extra=note(t_loop) + scaled)
    from fastimp.landscape.evaluate import auto_batching
    auto = auto_batching(model, torch.device(device), len(data[0][1]))
    for batching, why in (("vmap", "one vmapped forward per chunk (bmm / grouped conv)"),
                          ("loop", "weight_points, then per point one copy into a working model + forward")):
        if not both and batching != auto:
            continue
        fn = lambda: evaluate(model, w0, U, C, data, batching=batching, device=device)
        t = timeit(fn, device, warmup=warmup, repeat=repeat if K_kind == "path" else 1, min_time=0)
        table.add(case, f"fastimp batching={batching}", t,
                  baseline="loop: state dict + load_state_dict + eval", extra=f"{note(t)}; {why}")
    for r in table.rows:
        if r.case == case and r.impl == f"fastimp batching={auto}":
            r.impl += " (auto)"
    sync(device)


def tables(device: str = "cpu", quick: bool = False):
    import fastimp.models as models
    G = 11 if quick else 51
    repeat = 1 if quick else 2
    t = Table(f"landscape: K weight-space points, fastimp.landscape.evaluate vs the lean loop "
              f"({device})\n\nWhere the gain comes from: the loop copies every point's weights twice "
              "(state dict, load_state_dict) and runs one forward per point and batch; fastimp "
              "writes a chunk's weights once (weight_points) and, with vmap, runs one batched "
              "forward per chunk: the matmuls of K models become one bmm, so small networks stop "
              "being bound by per-op overhead; that pays on small batches (<= 16 examples). On the CPU "
              "larger batches are compute-bound and vmap's batched matmuls and grouped convolutions "
              "(the input replicated K times) are slower than K plain forwards, so auto takes the "
              "per-point path there (same FLOPs; per point one flat copy into a cached working "
              "model instead of building and loading a state dict).")
    mlp, conv = models.get("mnist1d_mlp", seed=0), models.get("mnist1d_conv", seed=0)
    r20 = models.get("resnet20", seed=0)
    n1d = 1000  # MNIST-1D's test set
    if device == "cpu":
        r_path, r_slice = (32, 4) if quick else (256, 4)
    else:
        r_path, r_slice = (1000, 1000) if quick else (10000, 10000)
    cpu_full = device == "cpu" and not quick
    rows = 5 if cpu_full else None
    cases = [("MNIST-1D MLP", mlp, (40,), n1d, "path", None, True),
             ("MNIST-1D MLP", mlp, (40,), n1d, "slice", None, not cpu_full),
             ("MNIST-1D CNN", conv, (1, 40), n1d, "path", None, True),
             ("MNIST-1D CNN", conv, (1, 40), n1d, "slice", rows, True),
             ("ResNet-20", r20, (3, 32, 32), r_path, "path", None, True),
             ("ResNet-20", r20, (3, 32, 32), r_slice, "slice", 3 if cpu_full else None,
              not cpu_full)]
    for name, model, shape, n, kind, sample_rows, both in cases:
        _case(t, name, model, shape, n, kind, G, device, repeat, sample_rows, both)
        if os.environ.get("FASTIMP_BENCH_VERBOSE"):
            print("\n".join(t.render().splitlines()[-3:]), flush=True)
    return [t]
