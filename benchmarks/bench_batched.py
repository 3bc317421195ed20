"""Many runs, one program (issue 13): N independent trainings batched against N trained one at a
time.

- Dispatched aten ops per run-step (a ``TorchDispatchMode`` that counts every op reaching the
  kernels: the CPU-measurable proxy of GPU launch cost), data path included: separate runs (each
  ``Loader.batch`` + forward, backward, MaskedSGD) against packing (``fastimp.batched``: one
  ``BatchedLoader`` gather + augmentation, one forward/backward of the packed module, one fused
  MaskedSGD step) and against ``torch.func`` vmap over stacked parameters (the alternative
  design, measured here to justify the choice).
- CPU wall time per run-step: ``train`` run after run against ``train_batched`` packed, and what
  ``batching="auto"`` picks.
- The mnist1d preset's IMP end to end: ``batch_runs=1`` (runs one after another) against the
  default.

``gpu_check(device, runs, batch_size, steps)`` is the GPU measurement (run-steps per second of
12 ResNet-20 runs: eager one at a time, packed, packed + CUDA graph, fp32 and bf16) and
``equality_check(device)`` the judged equality of a few steps: packed runs against separate
ones, the CUDA-graph program against the eager one; ``benchmarks/gpu_check.py`` calls both (on
the CPU, in its dry run, with :class:`fastimp.batched.graph.EmulatedGraph`).
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import Table, sync

MODELS = {
    # name: (model, kwargs, dataset kwargs, batch size)
    "ResNet-20": ("cifar_resnet_20", {}, dict(shape=(3, 32, 32), num_classes=10), 128),
    "MNIST-1D conv": ("mnist1d_conv", {}, dict(shape=(40,), num_classes=10,
                                               dtype=torch.float32), 100),
    "MNIST-1D MLP": ("mnist1d_mlp", {}, dict(shape=(40,), num_classes=10,
                                             dtype=torch.float32), 100),
}


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (``.n``; ``.ops`` per op name)."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        name = str(func)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _setup(key: str, runs: int, device, train_size: int = 2048, batch=None):
    from fastimp import data, models
    from fastimp.training import TrainConfig
    name, kw, dkw, default_batch = MODELS[key]
    batch = batch or default_batch
    ds = data.get("synthetic", train_size=train_size, test_size=16, device=str(device), **dkw)
    cfg = TrainConfig(steps=10 ** 6, batch_size=batch, lr=0.1, momentum=0.9, weight_decay=1e-4,
                      milestones=())
    loaders = [ds.loader("train", batch, seed=s) for s in range(runs)]
    ms = [models.get(name, num_classes=10, seed=s, **kw).to(device) for s in range(runs)]
    g = torch.Generator().manual_seed(0)
    from fastimp.masks import prunable
    masks = [{n: (torch.rand(p.shape, generator=g) < 0.5).to(device)
              for n, p in prunable(m).items()} for m in ms]
    return ds, cfg, loaders, ms, masks


def _separate_step(ms, opts, loaders):
    from fastimp.training import _sgd_step
    state = {"step": 0}

    def step():
        s = state["step"]
        for m, opt, ld in zip(ms, opts, loaders):
            x, y = ld.batch(s)
            _sgd_step(m, opt, x, y)
        state["step"] = s + 1
    return step


def _packed_step(ms, masks, loaders, cfg, device, precision="fp32"):
    from fastimp.batched.engine import EagerStep, _Run, _packed_optimizer
    from fastimp.batched.pack import pack
    from fastimp.data import BatchedLoader
    from fastimp.training import make_optimizer
    runs = [_Run(i, m, cfg, ld, mk, make_optimizer(m, cfg, mk), 0, 0, 0, None, None)
            for i, (m, ld, mk) in enumerate(zip(ms, loaders, masks))]
    module = pack(ms) if len(ms) > 1 else ms[0]
    opt = _packed_optimizer(module, runs) if len(ms) > 1 else runs[0].optimizer
    module.train()
    bl = BatchedLoader(loaders)
    step_fn = EagerStep(module, opt, len(ms), bl.batch_size, device, precision)
    state = {"step": 0}

    def step():
        s = state["step"]
        x, y = bl.batch(s)
        step_fn(x, y, cfg.lr)
        state["step"] = s + 1
    return step, module, opt, bl, step_fn


def _vmap_step(ms, masks, loaders, cfg):
    """The alternative design: torch.func.functional_call + vmap over stacked parameters and
    buffers (BN statistics stacked too), MaskedSGD over the stacked tensors."""
    from torch.func import functional_call, stack_module_state, vmap
    from fastimp.data import BatchedLoader
    from fastimp.optim import MaskedSGD
    params, buffers = stack_module_state(ms)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = copy.deepcopy(ms[0]).to("meta")
    fwd = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, 1))
    stacked_masks = {params[n]: torch.stack([m[n] for m in masks]) for n in masks[0]}
    opt = MaskedSGD(list(params.values()), lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, masks=stacked_masks)
    bl = BatchedLoader(loaders)
    n = len(ms)
    state = {"step": 0}

    def step():
        s = state["step"]
        x, y = bl.batch(s)                                   # [b, n, ...]
        out = fwd(params, buffers, x)                        # [n, b, K]
        ce = F.cross_entropy(out.flatten(0, 1), y.t().reshape(-1), reduction="none")
        loss = ce.view(n, -1).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] = s + 1
    return step


def _count(step) -> int:
    step()  # warm-up: buffers created, epoch plans drawn
    c = CountOps()
    with c:
        step()
    return c.n


class CountTable(Table):
    """A Table of op counts (in ``Row.seconds``): 'ops per run-step' and 'x fewer than'."""
    value_name = "ops per run-step"
    ratio_name = "fewer ops vs"
    ratio_word = "fewer than"

    def fmt(self, value: float) -> str:
        return f"{value:.1f}"


def dispatch_table(device="cpu", counts=(1, 4, 12)) -> Table:
    """Ops per run-step (``Table.seconds`` holds the count)."""
    from fastimp.training import make_optimizer
    t = CountTable(f"dispatched aten ops per run-step, data path included ({device})")
    sep_name = "separate runs (Loader.batch + step, each)"
    for key in ("ResNet-20", "MNIST-1D conv"):
        for n in counts:
            _, cfg, loaders, ms, masks = _setup(key, n, device, train_size=512)
            sep_ms = [copy.deepcopy(m) for m in ms]
            opts = [make_optimizer(m, cfg, mk) for m, mk in zip(sep_ms, masks)]
            sep = _count(_separate_step(sep_ms, opts, loaders)) / n
            packed = _count(_packed_step([copy.deepcopy(m) for m in ms], masks, loaders, cfg,
                                         device)[0]) / n
            vm = _count(_vmap_step([copy.deepcopy(m) for m in ms], masks, loaders, cfg)) / n
            case = f"{key}, batch {MODELS[key][3]}, {n} run{'s' if n > 1 else ''}"
            t.add(case, sep_name, sep)
            t.add(case, "packed (fastimp.batched)", packed, baseline=sep_name)
            t.add(case, "torch.func vmap over stacked params", vm, baseline=sep_name)
    return t


def _wall(key: str, n: int, steps: int, device) -> Dict[str, object]:
    """Seconds per run-step: train() run after run, train_batched packed and train_batched's
    default (``batching="auto"``, timed when it does not pack)."""
    from fastimp.batched.engine import batching_pays
    from fastimp.training import train, train_batched
    _, cfg, loaders, ms, masks = _setup(key, n, device)
    cfg = cfg.replace(steps=steps + 2)
    x = loaders[0].batch(0)[0][:2]
    auto = "packed" if n > 1 and batching_pays(ms[0], x, loaders[0].batch_size, device) \
        else "loop"

    def separate(models_, start, end):
        for m, ld, mk in zip(models_, loaders, masks):
            train(m, cfg, ld, mk, start_step=start, end_step=end, progress=False)

    def batched(batching):
        def go(models_, start, end):
            train_batched(models_, cfg, loaders, masks, start, end, progress=False,
                          batching=batching)
        return go
    variants = {"separate": separate}
    if n > 1:
        variants["packed"] = batched("packed")
        if auto == "loop":
            variants["auto"] = batched("auto")
    if n > 1:  # the alternative design, for the record
        def vmapped(models_, start, end):
            step = vmap_steps.setdefault(id(models_), _vmap_step(models_, masks, loaders, cfg))
            for _ in range(start, end):
                step()
        vmap_steps: Dict[int, Callable] = {}
        variants["vmap"] = vmapped
    best = {k: float("inf") for k in variants}
    for _ in range(2):  # alternate, keep the best of each: the machine is shared
        for name, fn in variants.items():
            models_ = [copy.deepcopy(m) for m in ms]
            fn(models_, 0, 2)  # warm-up steps (buffers, epoch plans)
            sync(device)
            t0 = time.perf_counter()
            fn(models_, 2, 2 + steps)
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / (steps * n))
    out: Dict[str, object] = dict(best)
    out["auto"] = auto
    if auto == "loop":
        out["auto seconds"] = best.get("auto", best["separate"])
    return out


def wall_table(device="cpu", quick=False) -> Table:
    t = Table(f"CPU wall time per run-step: train() run after run vs train_batched, {device}, "
              f"{torch.get_num_threads()} thread(s)")
    base = "separate: train() per run"
    plan = [("MNIST-1D conv", n, 30 if quick else 150) for n in (1, 4, 12)] + \
        [("MNIST-1D MLP", n, 30 if quick else 150) for n in (4, 12)] + \
        [("ResNet-20", n, 2 if quick else 3) for n in ((1, 4) if quick else (1, 4, 12))]
    for key, n, steps in plan:
        r = _wall(key, n, steps, device)
        case = f"{key}, batch {MODELS[key][3]}, {n} run{'s' if n > 1 else ''}"
        t.add(case, base, r["separate"])
        if n > 1:
            packed_auto = r["auto"] == "packed"
            t.add(case, "train_batched packed" + (" = default (auto)" if packed_auto else ""),
                  r["packed"], baseline=base)
            if not packed_auto:
                t.add(case, "train_batched default (auto: a loop here)", r["auto seconds"],
                      baseline=base)
            t.add(case, "torch.func vmap step (the alternative, not used)", r["vmap"],
                  baseline=base)
    return t


def imp_table(quick=False) -> Table:
    """The mnist1d preset's IMP end to end (quick: 4 levels), batch_runs=1 vs the default."""
    import tempfile
    from fastimp import imp, presets
    cfg = presets.get("mnist1d")
    if quick:
        cfg = cfg.replace(levels=3)
    t = Table(f"IMP end to end: mnist1d preset ({cfg.levels + 1} levels x {cfg.replicates} "
              f"replicates, {cfg.train.steps} steps, threads={cfg.threads}), cpu")
    times = {1: float("inf"), "auto": float("inf")}
    for _ in range(1 if not quick else 1):
        for br in (1, "auto"):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                imp.run(cfg.replace(batch_runs=br), d, progress=False)
                times[br] = min(times[br], time.perf_counter() - t0)
    t.add("whole run", "batch_runs=1 (one training after another)", times[1])
    t.add("whole run", "batch_runs='auto' (default: a level's 3 runs packed)", times["auto"],
          baseline="batch_runs=1 (one training after another)")
    return t


def tables(device, quick: bool) -> List[Table]:
    device = str(device)
    out = [dispatch_table(device)]
    if torch.device(device).type == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            out.append(wall_table(device, quick))
            out.append(imp_table(quick))
        finally:
            torch.set_num_threads(threads)
    else:
        eq = equality_check(device)
        if not eq["ok"]:
            raise AssertionError(f"batched runs differ from separate ones: {eq}")
        out.append(gpu_table(gpu_check(device)))
    return out


# ------------------------------------------------------------------------------------------ GPU
@contextlib.contextmanager
def _graphs(device, made: List):
    """CUDA graphs on a GPU; on the CPU (the GPU check's dry run) ``EmulatedGraph``, which runs
    everything but the capture. Every graph made goes to ``made``."""
    from fastimp.batched import graph as G
    real_new, real_supported = G.new_graph, G.supported
    cpu = torch.device(device).type == "cpu"

    def new_graph(dev):
        made.append(G.EmulatedGraph() if cpu else real_new(dev))
        return made[-1]
    G.new_graph = new_graph
    if cpu:
        G.supported = lambda dev: True
    try:
        yield
    finally:
        G.new_graph, G.supported = real_new, real_supported


def gpu_check(device="cuda", runs: int = 12, batch_size: int = 128, steps: int = 30,
              model: str = "cifar_resnet_20") -> Dict[str, object]:
    """Run-steps per second of ``runs`` ResNet-20 runs (CIFAR-shaped synthetic data, batch
    ``batch_size``, 50% random masks, data on the device) trained for ``steps`` steps: eager one
    at a time, packed, packed + CUDA graph, in fp32 and bf16; and the amortised time of a full
    62,400-step training per run. Returns a dict; ``gpu_table(result)`` renders it. (Timings
    only: :func:`equality_check` judges the results.)"""
    from fastimp.batched import graph as G
    from fastimp.training import make_optimizer
    device = torch.device(device)
    key = {"cifar_resnet_20": "ResNet-20"}.get(model, model)
    _, cfg, loaders, ms, masks = _setup(key, runs, device, train_size=max(4096, batch_size * 8),
                                        batch=batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    res: Dict[str, object] = {"device": name, "runs": runs, "batch_size": batch_size,
                              "steps": steps,
                              "optimizer_in_graph": G.optimizer_capturable(device, cfg.backend)}

    def rate(step, warm=5):
        for _ in range(warm):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return runs * steps / (time.perf_counter() - t0)

    sep = [copy.deepcopy(m) for m in ms]
    res["eager_loop"] = rate(_separate_step(sep, [make_optimizer(m, cfg, mk) for m, mk in
                                                  zip(sep, masks)], loaders))
    made: List = []
    with _graphs(device, made):
        for precision in ("fp32", "bf16"):
            for graph in (False, True):
                models_ = [copy.deepcopy(m) for m in ms]
                step, module, opt, bl, eager = _packed_step(models_, masks, loaders, cfg, device,
                                                            precision)
                if graph:
                    gs = G.GraphStep(eager, G.new_graph(device), res["optimizer_in_graph"])
                    state = {"s": 0}

                    def step(gs=gs, bl=bl, state=state):
                        x, y = bl.batch(state["s"])
                        gs(x, y, cfg.lr)
                        state["s"] += 1
                res[f"packed{' + graph' if graph else ''} {precision}"] = rate(step)
    res["graphs_captured"] = bool(made) and all(g.captured for g in made)
    best = max(v for k, v in res.items() if k.startswith("packed") and isinstance(v, float))
    res["full_training_seconds_per_run"] = 62400 / best
    res["speedup_vs_eager_loop"] = best / res["eager_loop"]
    return res


# Largest relative L2 difference of the state dicts' tensors after a few float64 steps. In fp32
# a few steps cannot tell a bug from noise: ResNet-20 on these data turns a 1e-7 change of the
# initial weights into 0.2-0.4 after 5 steps at lr 0.1 (and packing's summation order into
# 0.02-0.2; benchmarks/RESULTS.md, "How closely batched runs follow separate ones"). In float64
# the same amplification leaves the summation-order noise (1e-16) far below these bounds, while
# a bug (a stale batch in the graph, runs mixed up, a mask lost) changes whole updates (>= 1e-3).
EQUALITY_TOL = {"packed_vs_separate": 1e-7, "graph_vs_eager": 1e-7}


def _state_diff(a, b) -> float:
    """Largest relative L2 difference over the floating tensors of two modules' state dicts
    (inf when an integer buffer differs or a value is not finite)."""
    worst = 0.0
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        x, y = sa[k].detach().double(), sb[k].detach().double()
        if not sa[k].is_floating_point():
            if not torch.equal(x, y):
                return float("inf")
            continue
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return float("inf")
        worst = max(worst, float((x - y).norm() / (x.norm() + 1e-12)))
    return worst


def equality_check(device="cuda", runs: int = 3, batch_size: int = 128, steps: int = 5,
                   side: int = 32, width: int = 16) -> Dict[str, object]:
    """Judged equality of ``steps`` float64 steps of ``runs`` masked ResNet-20 runs (lr 2^-4,
    exact in the float32 lr tensor a captured step reads): each run trained alone (``train``),
    packed (``train_batched``) and packed with its step in a CUDA graph (3 eager warm-up steps,
    then replays); the largest relative state-dict difference of packed against separate and of
    graph against eager must stay within ``EQUALITY_TOL``, the pruned weights exactly 0 and the
    graph captured. ``result["ok"]`` is the verdict. ``side``, ``width``: image side and
    network width (smaller for the CPU's dry run)."""
    from fastimp import data, models
    from fastimp.masks import prunable
    from fastimp.training import TrainConfig, train, train_batched
    device = torch.device(device)
    name, kw, dkw, _ = MODELS["ResNet-20"]
    ds = data.get("synthetic", train_size=batch_size * 8, test_size=16, device=str(device),
                  **dict(dkw, shape=(3, side, side), dtype=torch.float64))
    loaders = [ds.loader("train", batch_size, seed=s) for s in range(runs)]
    ms = [models.get(name, num_classes=10, seed=s, width=width, **kw).to(device, torch.float64)
          for s in range(runs)]
    g = torch.Generator().manual_seed(0)
    masks = [{n: (torch.rand(p.shape, generator=g) < 0.5).to(device)
              for n, p in prunable(m).items()} for m in ms]
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=2.0 ** -4, momentum=0.9,
                      weight_decay=1e-4, milestones=())
    made: List = []
    alone = [copy.deepcopy(m) for m in ms]
    for m, ld, mk in zip(alone, loaders, masks):
        train(m, cfg, ld, mk, progress=False)
    eager = [copy.deepcopy(m) for m in ms]
    train_batched(eager, cfg, loaders, masks, progress=False, batching="packed")
    graphed = [copy.deepcopy(m) for m in ms]
    with _graphs(device, made):
        train_batched(graphed, cfg, loaders, masks, progress=False, batching="packed",
                      cuda_graph=True)
    sync(device)
    res: Dict[str, object] = {"runs": runs, "batch_size": batch_size, "steps": steps,
                              "image": f"3x{side}x{side}", "width": width,
                              "tolerance": dict(EQUALITY_TOL)}
    res["packed_vs_separate"] = max(_state_diff(a, b) for a, b in zip(alone, eager))
    res["graph_vs_eager"] = max(_state_diff(a, b) for a, b in zip(eager, graphed))
    res["pruned_weights_zero"] = all(
        bool((dict(m.named_parameters())[n][~mk[n]] == 0).all())
        for group in (alone, eager, graphed) for m, mk in zip(group, masks) for n in mk)
    res["graph_captured"] = bool(made) and all(g.captured for g in made)
    res["ok"] = bool(res["pruned_weights_zero"] and res["graph_captured"] and all(
        res[k] <= tol for k, tol in EQUALITY_TOL.items()))
    return res


def gpu_table(res: Dict[str, object]) -> Table:
    t = Table(f"GPU: {res['runs']} ResNet-20 runs, batch {res['batch_size']}, {res['device']} "
              f"(optimizer in graph: {res['optimizer_in_graph']})")
    base = "eager, one run at a time"
    t.add("run-steps", base, 1 / float(res["eager_loop"]),
          extra=f"{res['eager_loop']:.0f} run-steps/s")
    for k, v in res.items():
        if k.startswith("packed") and isinstance(v, float):
            t.add("run-steps", k, 1 / v, baseline=base, extra=f"{v:.0f} run-steps/s")
    return t
