"""Training one IMP level or retraining a mask: what the runner and :meth:`Run.retrain` share.

:class:`LevelTrainer` holds what the levels of one replicate share (its train config with the
replicate's seeds, loaders, the total step count T); :func:`retrain` trains a mask with a run's
retraining strategy (Section 2) and is what ``Run.retrain`` calls.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from fastimp.imp.config import IMPConfig
from fastimp.imp.strategies import PREVIOUS, finetune_train_config, level_plan

DEFAULT_CHECKPOINT_EVERY = 500


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available here")
    return dev


def load_dataset(config: IMPConfig, device="cpu"):
    from fastimp import data
    kwargs = dict(config.dataset_kwargs)
    return data.get(config.dataset, root=config.data_root, device=str(device), **kwargs)


def replicate_train_config(config: IMPConfig, seed: int):
    """Replicate with seed s: init_seed = train.init_seed + s, data_seed = train.data_seed + s."""
    t = config.train
    return t.replace(init_seed=t.init_seed + seed, data_seed=t.data_seed + seed)


def cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class LevelTrainer:
    """What the levels of one replicate (seed) share: its train config, loaders and T."""

    def __init__(self, config: IMPConfig, seed: int, device, dataset, on_step, progress,
                 checkpoint_every):
        from fastimp import training
        self.config, self.seed, self.device, self.dataset = config, seed, device, dataset
        seeds = config.replicate_seeds
        self.replicate = seeds.index(seed) if seed in seeds else 0
        self.train_cfg = replicate_train_config(config, seed)
        self.num_workers = loader_workers(config, dataset)
        self.loader = training.make_loader(dataset, self.train_cfg, device=str(device),
                                           num_workers=self.num_workers)
        self.test_loader = dataset.loader("test", max(self.train_cfg.batch_size, 1000),
                                          device=str(device))
        self.total_steps = self.train_cfg.total_steps(self.loader.iterations_per_epoch)
        self.on_step, self.progress, self.checkpoint_every = on_step, progress, checkpoint_every

    def build_model(self):
        from fastimp import models
        return models.get(self.config.model, num_classes=self.dataset.num_classes,
                          seed=self.train_cfg.init_seed, **self.config.model_kwargs)

    def train_config(self, start_step: int):
        """The train config of a training starting at ``start_step``: the replicate's, or IMP-FT's
        for steps [T, 2T) (``finetune_train_config``)."""
        if start_step >= self.total_steps:  # only IMP-FT runs steps [T, 2T)
            return finetune_train_config(self.train_cfg, self.config.finetune_lr,
                                         self.config.finetune_weight_decay)
        return self.train_cfg

    def train(self, model, masks, start_step, end_step, checkpoint_path=None, extra_on_step=None):
        """One run of this replicate (``train_runs`` with one run)."""
        return train_runs([self], [model], [masks], [start_step], [end_step], [checkpoint_path],
                          extra_on_step, batch_runs=1)[0]


def loader_workers(config: IMPConfig, dataset) -> int:
    """DataLoader workers of an image-folder data set: ``config.num_workers``, else up to 8 per
    process (the node's cores shared by its torchrun processes); 0 for tensor data sets."""
    if not getattr(dataset.train, "is_folder", False):
        return 0
    if getattr(config, "num_workers", None) is not None:
        return int(config.num_workers)
    import os
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (os.cpu_count() or 1) // max(per_node, 1) - 1))


def training_record(ctx: "LevelTrainer", result, parallel: str = "none") -> Dict:
    """How a level was trained, for its stats.json: world size, per-rank batch, micro-batch,
    accumulation steps, precision, channels_last and the parallel mode."""
    from fastimp.distributed.data_parallel import options, record
    how = getattr(result, "how", None)
    if how is None:
        o = options(ctx.config)
        how = record(ctx.train_cfg, 1, o["per_device_batch"], o["precision"],
                     o["channels_last"])
    return dict(how, parallel=parallel)


def batching_options(batch_runs) -> Dict:
    """``IMPConfig.batch_runs`` -> ``train_batched``'s ``batching`` / ``max_batch_runs``."""
    if batch_runs == "auto":
        return {"batching": "auto", "max_batch_runs": None}
    if batch_runs == 1:
        return {"batching": "loop", "max_batch_runs": None}
    return {"batching": "packed", "max_batch_runs": int(batch_runs)}


def train_runs(ctxs: Sequence["LevelTrainer"], models, masks, starts, ends,
               checkpoint_paths=None, extra_on_step=None, batch_runs="auto", on_run_end=None,
               companions=None):
    """Train run ``i`` (replicate ``ctxs[i]``: its config, loader, seeds) from ``models[i]``
    under ``masks[i]`` over steps ``[starts[i], ends[i])``, all as one batched program
    (``fastimp.training.train_batched``) -> list of TrainResult. ``extra_on_step(step, view)``
    sees every step; the replicates' own ``on_step(step, model, optimizer)`` gets the packed
    module and optimizer (or the run's own, when trained alone). Each run keeps its own
    checkpoint file (``checkpoint_paths[i]``), resumable on its own; ``on_run_end(i, result)``
    as soon as run ``i`` is done; ``companions``: see ``train_batched``."""
    from fastimp import training
    user = ctxs[0].on_step
    callbacks = extra_on_step is not None or user is not None

    def on_step(step, view):
        if extra_on_step is not None:
            extra_on_step(step, view)
        if user is not None:
            user(step, view.module, view.optimizer)
    paths = checkpoint_paths or [None] * len(models)
    ckpts = [None if p is None else training.Checkpoint(p, every=ctx.checkpoint_every)
             for p, ctx in zip(paths, ctxs)]
    from fastimp.distributed import data_parallel
    if data_parallel.needed(ctxs[0].config, ctxs[0].train_cfg.batch_size):
        return data_parallel.train_runs(ctxs, models, masks, starts, ends, ckpts,
                                        on_step if callbacks else None,
                                        any(c.progress for c in ctxs), on_run_end, companions)
    opts = data_parallel.options(ctxs[0].config)
    return training.train_batched(
        list(models), [c.train_config(s) for c, s in zip(ctxs, starts)],
        [c.loader for c in ctxs], list(masks),
        list(starts), list(ends), on_step=on_step if callbacks else None, checkpoint=ckpts,
        progress=any(c.progress for c in ctxs), on_run_end=on_run_end, companions=companions,
        precision=opts["precision"], channels_last=opts["channels_last"],
        **batching_options(batch_runs))


def float_or_none(x):
    return None if x is None else float(x)


def retrain(run, masks, rewind_step=None, replicate=0, level=None, strategy: Optional[str] = None,
            device=None, progress: bool = False, start=None, on_result=None):
    """Train ``masks`` with ``run``'s retraining strategy -> ``(state_dict, stats)``; see
    :meth:`fastimp.imp.folder.Run.retrain`.

    Several runs at once: ``masks`` a list, and each of ``rewind_step``, ``replicate``, ``level``,
    ``start`` either one value for all or a list of the same length -> a list of
    ``(state_dict, stats)`` in that order. ``start`` (a state dict) replaces the weights training
    starts from (w_tau or w^(level)); the mask is applied to it. Under torchrun (every rank
    calling it alike) each rank trains a contiguous share of the list and every rank gets all
    the results, in order. ``on_result(i, state_dict, stats)``: as soon as run ``i`` is trained
    and evaluated (a run packed with others finishes with them; runs that do not fit in one
    program are trained in turns), so that a caller can write it before the rest of the list is
    done (under torchrun: on the rank that trained it).
    """
    if not isinstance(masks, (list, tuple)):
        out = _retrain_one(run, masks, rewind_step, replicate, level, strategy, device, progress,
                           start)
        if on_result is not None:
            on_result(0, *out)
        return out
    n = len(masks)
    per_run = {}
    for name, value in (("rewind_step", rewind_step), ("replicate", replicate), ("level", level),
                        ("start", start)):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name}: expected one value per mask ({n}), got {len(value)}")
            per_run[name] = list(value)
        else:
            per_run[name] = [value] * n
    contexts: Dict = {}  # one LevelTrainer per (seed, device), shared by its runs

    def trained(ids):
        ids = list(ids)
        done = None if on_result is None else (lambda j, sd, st: on_result(ids[j], sd, st))
        return _retrain_jobs(run, [
            _retrain_job(run, masks[i], per_run["rewind_step"][i], per_run["replicate"][i],
                         per_run["level"][i], strategy, device, progress, per_run["start"][i],
                         contexts) for i in ids], done)
    from fastimp import distributed
    from fastimp.distributed.data_parallel import current_leader
    if distributed.active() and distributed.world_size() > 1 and current_leader() is None:
        return distributed.spread(range(n), trained)  # under torchrun: a share per rank
    return trained(range(n))


def _retrain_one(run, masks, rewind_step, replicate, level, strategy, device, progress, start):
    return _retrain_jobs(run, [_retrain_job(run, masks, rewind_step, replicate, level, strategy,
                                            device, progress, start, {})])[0]


def _retrain_job(run, masks, rewind_step, replicate, level, strategy, device, progress, start,
                 contexts):
    """What one retraining needs: (replicate context, model at its start, masks, plan, stats)."""
    from fastimp.masks import Masks
    config = run.config
    strategy = strategy or config.strategy
    tau, seed = run._key(rewind_step, replicate)
    if strategy != "wr" and level is None:
        raise ValueError(f"level: retraining with strategy {strategy!r} starts from the solution "
                         "w^(level) that was pruned; pass level")
    dev = resolve_device(device or config.device)
    key = (seed, str(dev))
    if key not in contexts:
        contexts[key] = LevelTrainer(config, seed, dev, run.dataset(str(dev)), None, progress,
                                     DEFAULT_CHECKPOINT_EVERY)
    ctx = contexts[key]
    plan = level_plan(strategy, 1 if level is None else int(level) + 1, tau, ctx.total_steps)
    if start is None:
        start = run.solution(level, tau, replicate) if plan.start == PREVIOUS \
            else run.rewind_state(tau, replicate)
    model = ctx.build_model()
    model.load_state_dict(start)
    model.to(dev)
    if not isinstance(masks, Masks):
        masks = Masks(dict(masks))
    remaining, total = int(masks.remaining()), int(masks.total())
    head = {"rewind_step": tau, "seed": seed, "replicate": replicate, "strategy": strategy,
            "from_level": level, "weights_remaining": remaining / total if total else 1.0}
    return ctx, model, masks.to(dev), plan, head


def _retrain_jobs(run, jobs, on_result=None):
    """Train the jobs as one batched program (the run's ``batch_runs``), evaluate each as soon as
    it is done (then ``on_result(i, state_dict, stats)``)."""
    from fastimp import training
    out = [None] * len(jobs)

    def finished(i, result):
        ctx, model, _, plan, head = jobs[i]
        test_error, test_loss = training.evaluate(model, ctx.test_loader)
        stats = dict(head, test_error=float(test_error), test_loss=float(test_loss),
                     train_loss=float_or_none(result.train_loss),
                     train_loss_epsilon=float_or_none(result.train_loss_epsilon),
                     start_step=plan.start_step, end_step=plan.end_step)
        out[i] = (cpu_state(model), stats)
        if on_result is not None:
            on_result(i, *out[i])
    results = train_runs([j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                         [j[3].start_step for j in jobs], [j[3].end_step for j in jobs],
                         batch_runs=getattr(run.config, "batch_runs", "auto"),
                         on_run_end=finished)
    for i, result in enumerate(results):
        if out[i] is None:
            finished(i, result)
    return out
