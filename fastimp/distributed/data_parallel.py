"""Data-parallel training of one run over the ranks of a torchrun job
(``torch.nn.parallel.DistributedDataParallel``), equal to one process with the same global batch.

At step s the global batch is the loader's batch of step s (b examples, the same on every rank).
Rank r of W takes the contiguous share ``fastimp.distributed.shard(b, r, W)``; the union of the
shares is the one-process batch. Each rank's loss is ``(W / b) · Σ_share CE`` so that DDP's mean of
the ranks' gradients is the gradient of the one-process mean ``(1 / b) · Σ_batch CE``. A share
larger than ``per_device_batch`` is cut into micro-batches whose gradients accumulate
(``no_sync`` until the last); every rank runs the same number of micro-batches. BatchNorm layers
use the statistics of the global (micro-)batch (:mod:`fastimp.distributed.batchnorm`). The
recorded loss of step s is the global mean (the ranks' parts are all-reduced when the losses are
checked: every 50 steps, before each checkpoint and at the end — a non-finite loss stops every
rank at the same check, naming its first step). Masks are verified equal on every rank before
training (:func:`fastimp.distributed.verify_masks`).

Rank 0 writes the checkpoints (``fastimp.training``'s format: a run killed under torchrun resumes
under torchrun or in one process) and reads them back for every rank. Without a process group
(or with one rank) the same function trains in one process, with ``per_device_batch``
(gradient accumulation), ``precision="bf16"`` (autocast) and ``channels_last``.

The IMP runner's data-parallel mode runs only on rank 0 (:class:`Leader`); the other ranks
:func:`follow` it: for each training rank 0 sends the job (architecture, data set, train config,
steps, masks) and all ranks call :func:`train` together.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastimp.distributed import env
from fastimp.training import NonFiniteLossError

PRECISIONS = ("fp32", "bf16")


def _no_buffer_broadcast() -> Dict[str, bool]:
    """DDP's option not to re-send rank 0's buffers every forward (the global BatchNorm keeps the
    running statistics equal): ``forward_sync_buffers`` in newer torch, ``broadcast_buffers``
    before it; both still sync them once at construction."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


_NO_BUFFER_BROADCAST = _no_buffer_broadcast()
__all__ = ["train", "micro_batches", "Leader", "follow", "record", "PRECISIONS"]


def micro_batches(batch: int, world: int, per_device_batch: Optional[int]) -> int:
    """Micro-batches per step: the largest share ``ceil(batch / world)`` cut into pieces of at
    most ``per_device_batch`` (None: one piece)."""
    share = -(-batch // world)
    if per_device_batch is None or share == 0:
        return 1
    return max(1, -(-share // int(per_device_batch)))


def record(cfg, world: int, per_device_batch: Optional[int], precision: str,
           channels_last: bool = False) -> Dict[str, Any]:
    """How a run was trained, for its ``stats.json``: world size, per-rank batch (the largest
    share), micro-batch, accumulation steps, precision."""
    share = -(-cfg.batch_size // world)
    n = micro_batches(cfg.batch_size, world, per_device_batch)
    return {"world_size": world, "per_rank_batch": share, "micro_batch": -(-share // n),
            "accumulation_steps": n, "precision": precision, "channels_last": bool(channels_last)}


def _shares(loader, start: int, end: int, rank: int, world: int):
    """(step, b, x, y): this rank's share of the batch of every step in ``[start, end)`` and the
    batch's size b (the loader's ``steps(part=)`` when it has it: an image-folder loader then
    decodes only the share, with its workers prefetching)."""
    from fastimp.data.loader import batch_examples, batch_share
    if world == 1:
        for step, (x, y) in enumerate(loader.steps(start, end), start):
            yield step, int(y.shape[0]), x, y
        return
    try:
        it = loader.steps(start, end, part=(rank, world))
    except TypeError:  # a loader without shares: take them from the whole batch
        it = None
    for step in range(start, end):
        if it is not None:
            x, y = next(it)
        else:
            lo, hi = batch_share(loader, step, rank, world)
            x, y = loader.batch(step)
            x, y = x[lo:hi], y[lo:hi]
        yield step, batch_examples(loader, step), x, y


class _Loaded:
    """A checkpoint already read (by rank 0), for ``training._resume``."""

    def __init__(self, state, path):
        self.state, self.path = state, path

    def load(self):
        return self.state


class _Guard:
    """The non-finite-loss stop over the ranks: the unchecked losses are all-reduced (turning
    the ranks' parts into the global mean), then checked; the same on every rank."""

    def __init__(self, losses, start, lr_at, at, group: bool, every: int):
        self.losses, self.start, self.lr_at, self.group, self.every = \
            losses, start, lr_at, group, every
        self.checked = at

    def flush(self, step: int) -> None:
        part = self.losses[self.checked - self.start:step - self.start]
        if self.group and part.numel():
            dist.all_reduce(part)
        bad = ~torch.isfinite(part)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteLossError(self.checked + i, self.lr_at(self.checked + i),
                                     float(part[i]))
        self.checked = step


def train(model: nn.Module, cfg, loader, masks=None, start_step: int = 0,
          end_step: Optional[int] = None, *, checkpoint=None,
          on_step: Optional[Callable] = None, progress: bool = False,
          per_device_batch: Optional[int] = None, precision: str = "fp32",
          channels_last: bool = False, label: Optional[str] = None):
    """Train ``model`` for global steps ``[start_step, end_step)`` data-parallel over the ranks
    (every rank calls it with the same model architecture, config, loader and masks; the weights
    and a checkpoint come from rank 0) -> ``fastimp.training.TrainResult`` with the global
    losses, on every rank. ``checkpoint``/``on_step``/``progress`` matter on rank 0 only (a
    ``fastimp.training.Checkpoint``: read there for every rank, written there). See the module
    docstring. ``label`` names the run in errors."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastimp import training as tr
    from fastimp.distributed.batchnorm import synchronized
    from fastimp.distributed.masks import verify_masks
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if per_device_batch is not None and (isinstance(per_device_batch, bool) or
                                         not isinstance(per_device_batch, int)
                                         or per_device_batch < 1):
        raise ValueError(f"per_device_batch: expected None or an int >= 1, "
                         f"got {per_device_batch!r}")
    loader = tr._resolve_loader(loader, cfg, "data-parallel train")
    device, ipe = torch.device(loader.device), loader.iterations_per_epoch
    start, end = tr._step_range(cfg, ipe, start_step, end_step, "data-parallel train")
    W, rank = env.world_size(), env.rank()
    group = env.active() and W > 1

    model.to(device)
    by_name = tr._mask_dict(model, masks)
    if group:
        verify_masks(by_name, f"the masks of {label or 'the run'} (steps {start}..{end})")
    tr._apply_masks(model, by_name)
    optimizer = tr.make_optimizer(model, cfg, by_name)
    scheduler = tr.make_scheduler(optimizer, cfg, ipe, start)
    losses = torch.zeros(end - start, dtype=torch.float32, device=device)
    step = start
    every = env.agree(checkpoint.every if checkpoint is not None else None)
    state = None
    if env.is_main() and checkpoint is not None and checkpoint.exists():
        state = checkpoint.load()
    state = env.agree(state)
    if state is not None:
        step = tr._resume(_Loaded(state, getattr(checkpoint, "path", "checkpoint")), model,
                          optimizer, scheduler, start, end, cfg, losses, device)
        del state

    lr_of = tr._multiplier_fn(cfg, ipe)
    # checked every step in one CPU process (as training.train); otherwise every 50 steps, each
    # check being a collective over the ranks (and a device sync)
    guard = _Guard(losses, start, lambda s: cfg.lr * lr_of(s), step, group,
                   1 if device.type == "cpu" and not group else 50)
    bar = tr._Progress(progress and env.is_main(), start, end, step,
                       desc=f"train ({W} ranks)" if group else "train")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if precision == "bf16" else contextlib.nullcontext
    t0 = time.perf_counter()
    was_training = model.training
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        with contextlib.ExitStack() as stack:
            if group:
                stack.enter_context(synchronized(model, device))
                card = device.index if device.index is not None else \
                    (torch.cuda.current_device() if device.type == "cuda" else None)
                net = DDP(model, device_ids=[card] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True, **_NO_BUFFER_BROADCAST)
            else:
                net = model
            for at, b, x, y in _shares(loader, step, end, rank, W):
                assert at == step
                n_micro = micro_batches(b, W, per_device_batch)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=False)
                total = torch.zeros((), dtype=torch.float32, device=device)
                n = x.shape[0]
                for j in range(n_micro):
                    a, c = n * j // n_micro, n * (j + 1) // n_micro
                    sync = not group or j == n_micro - 1
                    with (contextlib.nullcontext() if sync else net.no_sync()):
                        with autocast():
                            out = net(x[a:c])
                        ce = F.cross_entropy(out.float(), y[a:c], reduction="sum")
                        (ce * (W / b)).backward()
                    total += ce.detach()
                optimizer.step()
                scheduler.step()
                losses[step - start] = total / b
                step += 1
                if step % guard.every == 0:
                    guard.flush(step)
                if on_step is not None and env.is_main():
                    on_step(step, model, optimizer)
                if every is not None and step % every == 0 and step < end:
                    guard.flush(step)
                    if env.is_main():
                        checkpoint.save(tr._checkpoint_state(model, optimizer, scheduler, step,
                                                             start, end, cfg, losses, device))
                if bar.due(step) and guard.checked > start:  # the last global loss known
                    bar.update(step, f"{float(losses[guard.checked - start - 1]):.4f}",
                               scheduler.get_last_lr()[0])
            guard.flush(step)
    finally:
        # drop DDP (its reducer holds the process group) now, not with the traceback of an error
        net = None  # noqa: F841
        bar.close()
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = tr.TrainResult(losses.cpu(), start, end, ipe, seconds=time.perf_counter() - t0)
    result.how = record(cfg, W, per_device_batch, precision, channels_last)
    if checkpoint is not None and env.is_main() and not checkpoint.keep:
        checkpoint.remove()
    return result


# --------------------------------------------------------------- the IMP runner's trainings
_LEADER: "contextvars.ContextVar[Optional[Leader]]" = contextvars.ContextVar(
    "fastimp_dp_leader", default=None)


def current_leader() -> Optional["Leader"]:
    """The :class:`Leader` of the data-parallel run this process (rank 0) is leading, or None."""
    return _LEADER.get()


@contextlib.contextmanager
def leading():
    """Rank 0 leads a data-parallel IMP run within it: the runner's trainings go to every rank
    (:func:`train_runs`); on exit the followers are told to stop."""
    with Leader() as leader:
        token = _LEADER.set(leader)
        try:
            yield leader
        finally:
            _LEADER.reset(token)


def options(config) -> Dict[str, Any]:
    """:func:`train`'s options from an IMPConfig (``per_device_batch``, ``precision``,
    ``channels_last``)."""
    return {"per_device_batch": getattr(config, "per_device_batch", None),
            "precision": getattr(config, "precision", "fp32"),
            "channels_last": bool(getattr(config, "channels_last", False))}


def needed(config, batch_size: int) -> bool:
    """Whether a training of ``config`` needs this module rather than ``train_batched``: under a
    data-parallel leader, or to accumulate gradients in one process."""
    pdb = getattr(config, "per_device_batch", None)
    return current_leader() is not None or (pdb is not None and pdb < batch_size)


def run_spec(ctx) -> Dict[str, Any]:
    """What a follower needs to build the run of ``ctx`` (a ``LevelTrainer``)."""
    c = ctx.config
    dev = torch.device(ctx.device)
    return {"model": c.model, "num_classes": ctx.dataset.num_classes,
            "model_kwargs": dict(c.model_kwargs), "dataset": c.dataset, "data_root": c.data_root,
            "dataset_kwargs": dict(c.dataset_kwargs),
            "device": "cuda" if dev.type == "cuda" else str(dev),
            "num_workers": getattr(ctx, "num_workers", 0)}


def train_runs(ctxs, models, masks, starts, ends, checkpoints, on_step=None, progress=False,
               on_run_end=None, companions=None):
    """``fastimp.imp.retraining.train_runs`` one run after another with :func:`train`
    (data-parallel when leading, else in this process with accumulation); companions are
    skipped, as ``train_batched``'s loop does."""
    from fastimp.batched.engine import RunsView
    leader = current_leader()
    results = []
    for i, model in enumerate(models):
        if companions is not None and companions[i]:
            results.append(None)
            continue
        ctx = ctxs[i]
        cfg = ctx.train_config(starts[i])
        cb = None
        if on_step is not None:
            def cb(step, m, opt, i=i):
                on_step(step, RunsView([i], m, opt, lambda: None, models))
        kw = dict(checkpoint=checkpoints[i], on_step=cb, progress=progress,
                  label=f"replicate {ctx.replicate} (seed {ctx.seed})")
        try:
            if leader is None:
                res = train(model, cfg, ctx.loader, masks[i], starts[i], ends[i], **kw,
                            **options(ctx.config))
            else:
                res = leader.train(run_spec(ctx), model, cfg, ctx.loader, masks[i], starts[i],
                                   ends[i], options=options(ctx.config), **kw)
        except NonFiniteLossError as exc:  # which run diverged: the caller names it
            raise NonFiniteLossError(exc.step, exc.lr, exc.loss, run=i) from None
        results.append(res)
        if on_run_end is not None:
            on_run_end(i, res)
    return results


# ------------------------------------------------------------------- rank 0 leads, others follow
class Leader:
    """Rank 0's side of the IMP runner's data-parallel mode: :meth:`train` sends the job to the
    followers and trains with them; leaving the ``with`` block tells them to stop (with the error,
    if rank 0 failed outside a training: inside one, the other ranks' collectives fail with it
    and torchrun stops them)."""

    def __init__(self):
        self.in_job = False
        self.folder = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.in_job:
            return False
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        env.agree({"op": "stop", "folder": None if self.folder is None else str(self.folder),
                   "error": error, "where": getattr(exc, "where", None)})
        return False

    def train(self, spec: Dict[str, Any], model, cfg, loader, masks, start, end, *,
              checkpoint=None, on_step=None, progress=False, options=None, label=None):
        """Train one run with every rank. ``spec``: what a follower needs to build the run
        (``model``, ``num_classes``, ``model_kwargs``, ``dataset``, ``data_root``,
        ``dataset_kwargs``, ``device``); ``options``: :func:`train`'s ``per_device_batch``,
        ``precision``, ``channels_last``."""
        from fastimp.distributed.masks import broadcast_masks
        options = dict(options or {})
        self.in_job = True
        env.agree({"op": "train", "spec": spec, "cfg": cfg.to_dict(), "start": start,
                   "end": end, "options": dict(options, label=label),
                   "masks": masks is not None})
        if masks is not None:
            masks = broadcast_masks(masks, device=loader.device)
        try:
            result = train(model, cfg, loader, masks, start, end, checkpoint=checkpoint,
                           on_step=on_step, progress=progress, label=label, **options)
        except NonFiniteLossError:
            self.in_job = False  # every rank stopped at the same step: they hear where from us
            raise
        self.in_job = False
        return result


def follow():
    """A rank other than 0 in the IMP runner's data-parallel mode: train every job rank 0 sends
    until it says stop; returns the run folder rank 0 named (or None). Raises
    :class:`~fastimp.distributed.RankStoppedError` when rank 0 stopped with an error."""
    from fastimp import data, models
    from fastimp import training as tr
    from fastimp.distributed.masks import broadcast_masks
    datasets: Dict[Any, Any] = {}
    while True:
        job = env.agree(None)
        if job["op"] == "stop":
            if job["error"] is not None:
                raise env.RankStoppedError(0, job["error"])
            return job["folder"]
        spec = job["spec"]
        key = (spec["dataset"], spec["data_root"], repr(sorted(spec["dataset_kwargs"].items())),
               spec["device"])
        if key not in datasets:
            datasets[key] = data.get(spec["dataset"], root=spec["data_root"],
                                     device=spec["device"], **spec["dataset_kwargs"])
        cfg = tr.TrainConfig.from_dict(job["cfg"])
        loader = tr.make_loader(datasets[key], cfg, device=spec["device"],
                                num_workers=spec["num_workers"])
        model = models.get(spec["model"], num_classes=spec["num_classes"], seed=0,
                           **spec["model_kwargs"])
        masks = broadcast_masks(None, device=spec["device"]) if job["masks"] else None
        try:
            train(model, cfg, loader, masks, job["start"], job["end"], **job["options"])
        except NonFiniteLossError as exc:  # rank 0 stopped at the same step and says where
            raise exc.located(env.agree(None).get("where") or "") from None
