"""Training one IMP level or retraining a mask: what the runner and :meth:`Run.retrain` share.

:class:`LevelTrainer` holds what the levels of one replicate share (its train config with the
replicate's seeds, loaders, the total step count T); :func:`retrain` trains a mask with a run's
retraining strategy (Section 2) and is what ``Run.retrain`` calls.
"""
from __future__ import annotations

from typing import Dict, Optional

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
        self.train_cfg = replicate_train_config(config, seed)
        self.loader = training.make_loader(dataset, self.train_cfg, device=str(device))
        self.test_loader = dataset.loader("test", max(self.train_cfg.batch_size, 1000),
                                          device=str(device))
        self.total_steps = self.train_cfg.total_steps(self.loader.iterations_per_epoch)
        self.on_step, self.progress, self.checkpoint_every = on_step, progress, checkpoint_every

    def build_model(self):
        from fastimp import models
        return models.get(self.config.model, num_classes=self.dataset.num_classes,
                          seed=self.train_cfg.init_seed, **self.config.model_kwargs)

    def train(self, model, masks, start_step, end_step, checkpoint_path=None, extra_on_step=None):
        from fastimp import training
        callbacks = [cb for cb in (extra_on_step, self.on_step) if cb is not None]

        def on_step(step, model, optimizer):
            for cb in callbacks:
                cb(step, model, optimizer)
        ckpt = None
        if checkpoint_path is not None:
            ckpt = training.Checkpoint(checkpoint_path, every=self.checkpoint_every)
        cfg = self.train_cfg
        if start_step >= self.total_steps:  # only IMP-FT runs steps [T, 2T)
            cfg = finetune_train_config(cfg, self.config.finetune_lr,
                                        self.config.finetune_weight_decay)
        return training.train(model, cfg, self.loader, masks=masks,
                              start_step=start_step, end_step=end_step,
                              on_step=on_step if callbacks else None, checkpoint=ckpt,
                              progress=self.progress)


def float_or_none(x):
    return None if x is None else float(x)


def retrain(run, masks, rewind_step=None, replicate=0, level=None, strategy: Optional[str] = None,
            device=None, progress: bool = False, start=None):
    """Train ``masks`` with ``run``'s retraining strategy -> ``(state_dict, stats)``; see
    :meth:`fastimp.imp.folder.Run.retrain`.

    Several runs at once: ``masks`` a list, and each of ``rewind_step``, ``replicate``, ``level``,
    ``start`` either one value for all or a list of the same length -> a list of
    ``(state_dict, stats)`` in that order. ``start`` (a state dict) replaces the weights training
    starts from (w_tau or w^(level)); the mask is applied to it.
    """
    if not isinstance(masks, (list, tuple)):
        return _retrain_one(run, masks, rewind_step, replicate, level, strategy, device, progress,
                            start)
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
    return [_retrain_one(run, masks[i], per_run["rewind_step"][i], per_run["replicate"][i],
                         per_run["level"][i], strategy, device, progress, per_run["start"][i])
            for i in range(n)]


def _retrain_one(run, masks, rewind_step, replicate, level, strategy, device, progress, start):
    from fastimp import training
    from fastimp.masks import Masks
    config = run.config
    strategy = strategy or config.strategy
    tau, seed = run._key(rewind_step, replicate)
    if strategy != "wr" and level is None:
        raise ValueError(f"level: retraining with strategy {strategy!r} starts from the solution "
                         "w^(level) that was pruned; pass level")
    dev = resolve_device(device or config.device)
    dataset = run.dataset(str(dev))
    ctx = LevelTrainer(config, seed, dev, dataset, None, progress, DEFAULT_CHECKPOINT_EVERY)
    plan = level_plan(strategy, 1 if level is None else int(level) + 1, tau, ctx.total_steps)
    if start is None:
        start = run.solution(level, tau, replicate) if plan.start == PREVIOUS \
            else run.rewind_state(tau, replicate)
    model = ctx.build_model()
    model.load_state_dict(start)
    model.to(dev)
    if not isinstance(masks, Masks):
        masks = Masks(dict(masks))
    result = ctx.train(model, masks.to(dev), plan.start_step, plan.end_step)
    test_error, test_loss = training.evaluate(model, ctx.test_loader)
    remaining, total = int(masks.remaining()), int(masks.total())
    stats = {"rewind_step": tau, "seed": seed, "replicate": replicate, "strategy": strategy,
             "from_level": level, "weights_remaining": remaining / total if total else 1.0,
             "test_error": float(test_error), "test_loss": float(test_loss),
             "train_loss": float_or_none(result.train_loss),
             "train_loss_epsilon": float_or_none(result.train_loss_epsilon),
             "start_step": plan.start_step, "end_step": plan.end_step}
    return cpu_state(model), stats
