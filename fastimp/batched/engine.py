"""``train_batched``: N independent runs of one architecture trained as one program.

Each run keeps its own weights, mask, momentum, BatchNorm statistics and loader (data order and
augmentation); the lr schedule is the config's. The runs are packed into one wide module
(:mod:`fastimp.batched.pack`): one forward, one backward and one fused masked SGD step serve them
all, and :class:`fastimp.data.BatchedLoader` gathers and augments their N batches at once. Run
``i`` equals ``train(models[i], cfg, loaders[i], masks[i], ...)`` to float tolerance.

Runs may start and end at different global steps (IMP-WR levels of several rewind steps, resumed
runs): the program walks the global steps, and between two changes of the set of runs in flight
(a *segment*) it trains those runs packed; at a segment's end their state goes back to each
run's own model and optimizer. A segment of one run trains that run's model itself (as
``train`` would, bit for bit).

Checkpoints are one file per run in ``train``'s format (either engine resumes the other's).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastimp import training as _tr
from fastimp.batched import graph as _graph
from fastimp.batched.pack import CannotPack, pack, pack_tensors, run_slice, unpack_, verify
from fastimp.data import BatchedLoader, Dataset

__all__ = ["train_batched", "BatchingFallbackWarning", "RunsView", "EagerStep", "runs_that_fit",
           "batching_pays", "BATCHINGS", "PRECISIONS"]

BATCHINGS = ("auto", "packed", "loop")
PRECISIONS = ("fp32", "bf16")

# On the CPU, packing pays while a run's step is bound by per-op overhead rather than by
# arithmetic: while its forward does at most this many multiply-adds (a run's whole batch) per
# layer call. Measured with 4 runs, 1 thread (benchmarks/RESULTS.md): the MNIST-1D MLP
# (0.5 M MACs per layer call) gains 1.6x, the MNIST-1D conv net 1.6x (1.3 M) and 1.2x with 64
# channels (4.8 M); ResNet-20 of width 4 still 1.15x (6.7 M), of width 8 breaks even (26 M); the
# conv net with 128 channels (19 M), the MLP with 1000-wide layers (35 M) and ResNet-20 (104 M,
# batch 128) lose (0.65-0.76x): there grouped convolutions and batched matmuls are slower than
# plain ones.
CPU_PACKED_MAX_MACS_PER_LAYER = 6e6


class BatchingFallbackWarning(UserWarning):
    """The runs are trained one after another instead of as one program; the text says why."""


# ------------------------------------------------------------------------------ run bookkeeping
@dataclass
class _Run:
    index: int
    model: nn.Module
    cfg: Any
    loader: Any
    masks: Dict[str, torch.Tensor]
    optimizer: Any
    start: int
    end: int
    step: int
    losses: torch.Tensor
    checkpoint: Optional[Any]


class RunsView:
    """What ``on_step(step, view)`` receives after each step of a batched program.

    ``runs``: indices (into ``models``) of the runs that just completed global step ``step``;
    ``module`` / ``optimizer``: the packed module and its MaskedSGD (a run's own model and
    optimizer when it trains alone); ``state_dict(i)``: run ``i``'s current state (a copy).
    """

    def __init__(self, runs: List[int], module: nn.Module, optimizer, sync: Callable[[], None],
                 models: Sequence[nn.Module]):
        self.runs, self.module, self.optimizer = runs, module, optimizer
        self._sync, self._models = sync, models

    def state_dict(self, i: int) -> Dict[str, torch.Tensor]:
        if i not in self.runs:
            raise ValueError(f"state_dict: run {i} did not take this step (runs {self.runs})")
        self._sync()
        return {k: v.detach().clone() for k, v in self._models[i].state_dict().items()}


# ----------------------------------------------------------------------------------- the step
class EagerStep:
    """One training step of ``k`` runs: ``(x [b, k, ...], y [b, k], lr) -> losses [k]``.

    The loss is the sum over runs of each run's mean cross-entropy, so every run's gradient is
    its own; with one run it is ``F.cross_entropy(model(x), y)`` exactly as ``train``.
    """

    def __init__(self, module: nn.Module, optimizer, k: int, batch_size: int, device,
                 precision: str = "fp32", channels_last: bool = False):
        self.module, self.optimizer, self.k = module, optimizer, k
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.precision, self.channels_last = precision, channels_last
        self.group = optimizer.param_groups[0]

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         set_to_none: bool = True) -> torch.Tensor:
        b, k = x.shape[0], self.k
        xp = x.reshape(b, k * x.shape[2], *x.shape[3:]) if k > 1 else x.reshape(b, *x.shape[2:])
        if self.channels_last and xp.dim() == 4:
            xp = xp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            out = self.module(xp)
            if k == 1:
                loss = F.cross_entropy(out, y.reshape(b))
                per_run = loss.detach().reshape(1)
            else:
                logits = out.unflatten(1, (k, -1)).flatten(0, 1)
                ce = F.cross_entropy(logits.float() if self.precision == "bf16" else logits,
                                     y.reshape(b * k, *y.shape[2:]), reduction="none")
                per_run = ce.view(b, k, -1).mean((0, 2))
                loss = per_run.sum()
                per_run = per_run.detach()
        self.optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        return per_run

    def __call__(self, x, y, lr: Optional[float], set_to_none: bool = True) -> torch.Tensor:
        if lr is not None:
            self.group["lr"] = lr
        per_run = self.forward_backward(x, y, set_to_none)
        self.optimizer.step()
        return per_run


# ------------------------------------------------------------------------------------ choices
def _free_bytes(device: torch.device) -> int:
    """Memory a batch of runs may take: 80% of the free GPU memory, half the available RAM."""
    from fastimp._memory import available_bytes
    return int(available_bytes(device) * (0.8 if device.type == "cuda" else 0.5))


def _probe(model: nn.Module, x: torch.Tensor):
    """(activation bytes per example, multiply-adds per example, layer calls) of one forward of
    ``model`` (eval mode, no grad) on the few examples ``x``; layer calls = calls of modules
    without children (a forward dispatches about two ops per layer call)."""
    acts, macs, calls = [0], [0], [0]

    def hook(m, inputs, out):
        calls[0] += 1
        if isinstance(out, torch.Tensor):
            acts[0] += out.numel() * out.element_size()
            if isinstance(m, nn.modules.conv._ConvNd):
                w = m.weight
                macs[0] += out.numel() * (w.shape[1] * math.prod(w.shape[2:]))
            elif isinstance(m, nn.Linear):
                macs[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    b = max(1, x.shape[0])
    return acts[0] / b, macs[0] / b, calls[0]


def runs_that_fit(model: nn.Module, x: torch.Tensor, batch_size: int, device,
                  momentum: bool = True, runs: int = 1) -> int:
    """How many runs of ``model`` at ``batch_size`` fit packed in the free memory of ``device``
    (measured with the ``runs`` models of the program already on it): per packed run its
    weights, gradients, momentum and mask (13 B per parameter), three times the activations of
    a forward (kept for backward, their gradients, workspace) and its batch; first, the momentum
    buffer each of the ``runs`` runs' own optimizer gets when its packed state is handed back
    (4 B per parameter) is set aside."""
    device = torch.device(device)
    n_params = sum(p.numel() for p in model.parameters())
    act, _, _ = _probe(model, x)
    per_param = 4 + 4 + (4 if momentum else 0) + 1
    per_run = n_params * per_param + 3 * act * batch_size + \
        x[:1].numel() * x.element_size() * batch_size
    own = runs * n_params * 4 if momentum else 0
    return max(1, int(max(0, _free_bytes(device) - own) // max(1, per_run)))


def batching_pays(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> bool:
    """Whether packing beats a loop on ``device``: always on a GPU (a small step leaves it idle);
    on the CPU while a run's forward does at most ``CPU_PACKED_MAX_MACS_PER_LAYER``
    multiply-adds per layer call (above, the step is compute-bound and grouped convolutions
    lose)."""
    if torch.device(device).type != "cpu":
        return True
    _, macs, calls = _probe(model, x)
    return macs * batch_size <= CPU_PACKED_MAX_MACS_PER_LAYER * max(1, calls)


# ------------------------------------------------------------------------------- entry point
def _per_run(value, n: int, name: str, is_one: Callable[[Any], bool]) -> list:
    if is_one(value):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"train_batched: {name} must be one value or a list of {n}, got "
                        f"{type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"train_batched: {name}: expected {n} values (one per model), got "
                         f"{len(value)}")
    return list(value)


def train_batched(models, cfg, loaders, masks=None, start_step=0, end_step=None, *,
                  on_step=None, checkpoint=None, progress: bool = True, eval_data=None,
                  on_run_end=None, companions=None, batching: str = "auto",
                  max_batch_runs: Optional[int] = None, cuda_graph: bool = False,
                  precision: str = "fp32", channels_last: bool = False) -> List[Any]:
    """Train ``models`` (N independent runs, in place) as one program -> ``list[TrainResult]``.

    ``cfg``: a TrainConfig, or one per run differing only in ``init_seed`` / ``data_seed``.
    ``loaders``, ``masks``, ``start_step``, ``end_step``: one value for all runs or a list with
    one per run (a ``Dataset`` gives each run ``make_loader(dataset, its cfg)``). ``checkpoint``:
    None or one ``Checkpoint`` (or None) per run, each in ``train``'s format. ``eval_data``:
    evaluated on every run at the end. ``on_step(step, view)``: after every global step, with a
    :class:`RunsView`. ``on_run_end(i, result)``: as soon as run ``i`` has finished (its model
    holds its final weights). Checkpoints are removed when the runs packed with them are all done
    (a run that ends before the others first writes a final one, unless ``on_run_end`` took its
    result), so a killed program resumes every run of it where it was.
    ``companions``: None or one bool per run; a companion only keeps the others company: packed,
    it is trained so that the others train in the very batch they were first trained in (a
    bit-identical recomputation); in a loop it is skipped (its result is None).

    ``batching``: ``"packed"`` (one wide module), ``"loop"`` (``train`` run after run: today's
    results bit for bit) or ``"auto"`` (packed on a GPU; on the CPU where it pays,
    :func:`batching_pays`). A model that cannot be packed is trained in a loop, with one
    :class:`BatchingFallbackWarning` saying why. ``max_batch_runs`` caps the runs packed at once
    (else as many as fit in the free memory, :func:`runs_that_fit`); more runs go in turns.
    ``cuda_graph``: capture the packed step in a CUDA graph (:mod:`fastimp.batched.graph`; an
    option until a GPU has checked it). ``precision``: ``"fp32"`` (default, the paper's) or
    ``"bf16"`` (autocast; weights, optimizer and loss stay fp32). ``channels_last``: 2-D conv
    nets in channels-last memory format. A non-finite loss stops the program with a
    :class:`fastimp.training.NonFiniteLossError` naming the run (``.run``), step and lr.
    """
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise TypeError("train_batched: models must be a non-empty list of nn.Module")
    n = len(models)
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(f"train_batched: models must be nn.Modules, got {type(m).__name__}")
    if batching not in BATCHINGS:
        raise ValueError(f"train_batched: batching must be one of {BATCHINGS}, got {batching!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"train_batched: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    if max_batch_runs is not None and (isinstance(max_batch_runs, bool) or
                                       not isinstance(max_batch_runs, int) or max_batch_runs < 1):
        raise ValueError(f"train_batched: max_batch_runs must be None or an int >= 1, "
                         f"got {max_batch_runs!r}")
    cfgs = _per_run(cfg, n, "cfg", lambda v: isinstance(v, _tr.TrainConfig))
    for c in cfgs:
        if not isinstance(c, _tr.TrainConfig):
            raise TypeError(f"train_batched: cfg must be a TrainConfig, got {type(c).__name__}")
    shared = cfgs[0].replace(init_seed=0, data_seed=0)
    for c in cfgs[1:]:
        if c.replace(init_seed=0, data_seed=0) != shared:
            raise ValueError("train_batched: the runs' configs may differ only in init_seed and "
                             "data_seed (one lr schedule, batch size and optimizer for all)")
    loaders = _per_run(loaders, n, "loaders",
                       lambda v: isinstance(v, Dataset) or hasattr(v, "steps"))
    loaders = [_tr._resolve_loader(ld, c, "train_batched") for ld, c in zip(loaders, cfgs)]
    masks = _per_run(masks, n, "masks", lambda v: v is None or hasattr(v, "items"))
    starts = _per_run(start_step, n, "start_step", lambda v: isinstance(v, int))
    ends = _per_run(end_step, n, "end_step", lambda v: v is None or isinstance(v, int))
    ckpts = _per_run(checkpoint, n, "checkpoint", lambda v: v is None)
    company = [bool(c) for c in _per_run(companions, n, "companions", lambda v: v is None)]
    for ck in ckpts:
        if ck is not None and not isinstance(ck, _tr.Checkpoint):
            raise TypeError("train_batched: checkpoint must be None or a list of "
                            "fastimp.training.Checkpoint (one per run)")
    device = loaders[0].device
    ipe = loaders[0].iterations_per_epoch
    for ld in loaders[1:]:
        if str(ld.device) != str(device) or ld.iterations_per_epoch != ipe \
                or ld.batch_size != loaders[0].batch_size:
            raise ValueError("train_batched: the loaders must share device, batch size and "
                             "iterations per epoch")
    ranges = [_tr._step_range(c, ipe, s, e, "train_batched")
              for c, s, e in zip(cfgs, starts, ends)]
    if cuda_graph and not _graph.supported(device):
        raise ValueError(f"train_batched: cuda_graph=True needs a CUDA device, the data are on "
                         f"{device}")

    plain = not cuda_graph and precision == "fp32" and not channels_last
    mode = batching
    if n == 1:
        mode = "loop"
    elif batching != "loop":
        mode = _packable(models, loaders, masks, ranges, device, batching)
    if mode == "loop" and plain:
        return _loop(models, cfgs, loaders, masks, ranges, ckpts, on_step, progress, eval_data,
                     on_run_end, company)

    t0 = time.perf_counter()
    todo = [i for i in range(n) if mode == "packed" or not company[i]]
    runs = [_make_run(i, models[i], cfgs[i], loaders[i], masks[i], ranges[i], ckpts[i], ipe,
                      device) for i in todo]
    if mode == "loop":  # one run at a time, with the step's options (graph, bf16, ...)
        limit = 1
    else:
        limit = max_batch_runs or runs_that_fit(
            models[0], loaders[0].batch(ranges[0][0])[0][:2], loaders[0].batch_size, device,
            cfgs[0].momentum != 0, runs=len(runs))
    opts = dict(precision=precision, channels_last=channels_last, cuda_graph=cuda_graph)
    results: Dict[int, Any] = {}

    def finished(r: _Run) -> None:
        res = _tr.TrainResult(r.losses.cpu(), r.start, r.end, ipe,
                              seconds=time.perf_counter() - t0)
        if eval_data is not None:
            res.test_error, res.test_loss = _tr.evaluate(r.model, eval_data, device)
        results[r.index] = res
        if on_run_end is not None:
            on_run_end(r.index, res)
    for i in range(0, len(runs), limit):  # chunks in the callers' order: the same every time
        chunk = runs[i:i + limit]
        _program(chunk, ipe, device, on_step, progress, opts, models, finished,
                 save_done=on_run_end is None)
        for r in chunk:
            if r.checkpoint is not None and not r.checkpoint.keep:
                r.checkpoint.remove()
    return [results.get(i) for i in range(n)]


def _packable(models, loaders, masks, ranges, device, batching) -> str:
    """``"packed"`` or ``"loop"``; warns (once) when the models cannot be packed."""
    x, _ = BatchedLoader(loaders).batch(min(r[0] for r in ranges))
    probe = x[:4]
    for m in models:
        m.to(device)
    if batching == "auto" and not batching_pays(models[0], probe[:, 0], loaders[0].batch_size,
                                                device):
        return "loop"
    try:
        packed = pack(models)
        verify(packed, models, probe)
        _cumulative_batchnorm_counts_agree(models, ranges)
    except CannotPack as exc:
        warnings.warn(f"train_batched: the {len(models)} runs of {type(models[0]).__name__} "
                      f"cannot be packed into one model ({exc}); training them one after "
                      "another", BatchingFallbackWarning, stacklevel=3)
        return "loop"
    return "packed"


def _cumulative_batchnorm_counts_agree(models, ranges) -> None:
    """Raise :class:`CannotPack` unless the runs reach every global step at one batch count of
    each BatchNorm with ``momentum=None`` (a cumulative average, weighted by 1/count, which one
    packed module has once for all its runs). A run counts one batch per step, so run ``r``
    holds ``count_r + (step - start_r)`` at ``step``: the offsets ``count_r - start_r`` must
    agree (runs starting at different steps from equal counts do not)."""
    for name, m0 in models[0].named_modules():
        if not (isinstance(m0, nn.modules.batchnorm._BatchNorm) and m0.momentum is None
                and m0.num_batches_tracked is not None):
            continue
        offsets = [int(m.get_submodule(name).num_batches_tracked) - rng[0]
                   for m, rng in zip(models, ranges)]
        if len(set(offsets)) > 1:
            raise CannotPack(
                f"{name or 'the model'} ({type(m0).__name__}): momentum=None (a cumulative "
                f"average) and runs that would be packed at different batch counts (start "
                f"steps {[rng[0] for rng in ranges]}, batches counted "
                f"{[int(m.get_submodule(name).num_batches_tracked) for m in models]})")


def _loop(models, cfgs, loaders, masks, ranges, ckpts, on_step, progress, eval_data,
          on_run_end, company):
    results = []
    for i, model in enumerate(models):
        if company[i]:
            results.append(None)
            continue
        cb = None
        if on_step is not None:
            def cb(step, m, opt, i=i):
                on_step(step, RunsView([i], m, opt, lambda: None, models))
        results.append(_tr.train(model, cfgs[i], loaders[i], masks=masks[i],
                                 start_step=ranges[i][0], end_step=ranges[i][1], on_step=cb,
                                 checkpoint=ckpts[i], progress=progress, eval_data=eval_data))
        if on_run_end is not None:
            on_run_end(i, results[-1])
    return results


def _make_run(i, model, cfg, loader, masks, rng, ckpt, ipe, device) -> _Run:
    start, end = rng
    model.to(device)
    by_name = _tr._mask_dict(model, masks)
    _tr._apply_masks(model, by_name)
    opt = _tr.make_optimizer(model, cfg, by_name)
    losses = torch.zeros(end - start, dtype=torch.float32, device=device)
    step = start
    if ckpt is not None and ckpt.exists():
        sched = _tr.make_scheduler(opt, cfg, ipe, start)
        step = _tr._resume(ckpt, model, opt, sched, start, end, cfg, losses, device)
    return _Run(i, model, cfg, loader, by_name, opt, start, end, step, losses, ckpt)


def _save(r: _Run, step: int, ipe: int, device) -> None:
    sched = _tr.make_scheduler(r.optimizer, r.cfg, ipe, step)
    r.checkpoint.save(_tr._checkpoint_state(r.model, r.optimizer, sched, step, r.start, r.end,
                                            r.cfg, r.losses, device))


# ------------------------------------------------------------------------------- the program
def _program(runs: List[_Run], ipe, device, on_step, progress, opts, models,
             finished: Callable[[_Run], None], save_done: bool) -> None:
    """Train ``runs`` over the global steps, one segment (a fixed set of runs in flight) at a
    time; ``finished(run)`` as each run ends (``save_done``: first checkpoint a run that ends
    before the others, so that a kill does not lose it)."""
    first = min(r.step for r in runs)
    last = max(r.end for r in runs)
    bar = _tr._Progress(progress, min(r.start for r in runs), last, first,
                        desc=f"train {len(runs)} runs")
    for r in runs:
        if r.step == r.end:  # resumed from the checkpoint of a finished run
            finished(r)
    try:
        while True:
            pending = [r for r in runs if r.step < r.end]
            if not pending:
                break
            a = min(r.step for r in pending)
            active = sorted((r for r in pending if r.step == a), key=lambda r: r.index)
            later = [r.step for r in pending if r.step > a]
            b = min([r.end for r in active] + later)
            _segment(active, a, b, ipe, device, on_step, bar, opts, models)
            for r in active:
                if r.step == r.end:
                    if save_done and r.checkpoint is not None and r.end < last:
                        _save(r, r.step, ipe, device)  # done before the others: resumable
                    finished(r)
    finally:
        bar.close()


def _packed_optimizer(module: nn.Module, active: List[_Run]):
    """MaskedSGD over the packed parameters: masks and momentum buffers packed like them."""
    run_params = [dict(r.model.named_parameters()) for r in active]
    masks = {}
    for name, p in module.named_parameters():
        ms = [r.masks.get(name) for r in active]
        if any(m is not None for m in ms):
            masks[name] = pack_tensors([m if m is not None else
                                        torch.ones_like(run_params[j][name], dtype=torch.bool)
                                        for j, m in enumerate(ms)])
    opt = _tr.make_optimizer(module, active[0].cfg, masks)
    if active[0].cfg.momentum != 0:
        for name, p in module.named_parameters():
            bufs = [r.optimizer.state.get(run_params[j][name], {}).get("momentum_buffer")
                    for j, r in enumerate(active)]
            if all(b is None for b in bufs):
                continue  # a fresh buffer (torch's first step b = d) for every run
            packed = pack_tensors([b if b is not None else torch.zeros_like(run_params[j][name])
                                   for j, b in enumerate(bufs)])
            opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(packed)
    return opt


def _segment(active: List[_Run], a: int, b: int, ipe, device, on_step, bar, opts,
             models) -> None:
    k = len(active)
    cfg = active[0].cfg
    if k == 1:
        module, optimizer = active[0].model, active[0].optimizer
    else:
        module = pack([r.model for r in active])
        if opts["channels_last"]:
            module.to(memory_format=torch.channels_last)
        optimizer = _packed_optimizer(module, active)
    module.train()
    loader = BatchedLoader([r.loader for r in active])
    step_fn = EagerStep(module, optimizer, k, loader.batch_size, device, opts["precision"],
                        opts["channels_last"])
    if opts["cuda_graph"]:
        step_fn = _graph.GraphStep(step_fn, _graph.new_graph(device),
                                   _graph.optimizer_capturable(device, cfg.backend))
    mult = _tr._multiplier_fn(cfg, ipe)
    lr_at = lambda s: cfg.lr * mult(s)  # noqa: E731
    seg_losses = torch.zeros(b - a, k, dtype=torch.float32, device=device)
    guard = _tr._FiniteGuard(seg_losses, a, lr_at, a, runs=[r.index for r in active])
    synced = [a]

    def sync(upto: Optional[int] = None) -> None:
        """Each run's model, momentum and losses <- the packed ones (steps up to ``upto``)."""
        upto = synced[0] if upto is None else upto
        if k > 1:
            _unpack_state(module, optimizer, active)
        for j, r in enumerate(active):
            r.losses[a - r.start:upto - r.start] = seg_losses[:upto - a, j]

    view_runs = [r.index for r in active]
    saving = any(r.checkpoint is not None for r in active)
    step = a
    try:
        for x, y in loader.steps(a, b):
            per_run = step_fn(x, y, lr_at(step))
            seg_losses[step - a] = per_run
            step += 1
            synced[0] = step
            guard.after_step(step, per_run)
            if on_step is not None:
                on_step(step, RunsView(view_runs, module, optimizer, sync, models))
            due = [r for r in active if saving and r.checkpoint is not None
                   and step % r.checkpoint.every == 0 and step < r.end]
            if due:
                guard.flush(step)
                sync(step)
                for r in due:
                    _save(r, step, ipe, device)
            if bar.due(step):
                bar.update(step, f"{float(per_run.mean()):.4f}", lr_at(step - 1))
        guard.flush(b)
    finally:
        sync(step)
        for r in active:
            r.step = step


def _unpack_state(module: nn.Module, optimizer, active: List[_Run]) -> None:
    k = len(active)
    unpack_(module, [r.model for r in active])
    run_params = [dict(r.model.named_parameters()) for r in active]
    for name, p in module.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is None:
            continue
        for j, r in enumerate(active):
            rp = run_params[j][name]
            st = r.optimizer.state[rp]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.empty_like(rp)
            st["momentum_buffer"].copy_(run_slice(buf, k, j))
