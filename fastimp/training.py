"""Step-based training as the paper counts it (Appendix B): SGD with momentum and weight decay,
step decay at milestones or cosine with linear warm-up, separate seeds for initialization and data
order, the train loss of every step kept, resumable checkpoints.

``train`` runs global steps ``[start_step, end_step)``: the learning rate of step ``s`` is
``lr * multiplier(s)`` and the batch of step ``s`` is ``loader.batch(s)``, so training from
``w_tau`` at ``start_step=tau`` continues the schedule and the data order of a run that reached
``tau`` (IMP-WR), and ``start_step=0`` restarts both (IMP-LRR).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import durations
from .data import Dataset, FolderLoader, Loader
from .masks import check_mask

__all__ = ["TrainConfig", "TrainResult", "Checkpoint", "NonFiniteLossError", "make_loader",
           "make_optimizer", "make_scheduler", "train", "train_batched", "evaluate",
           "train_loss_epsilon_appendix_f",
           "train_loss_epsilon"]

_SCHEDULES = ("step", "cosine", "constant")


@dataclass
class TrainConfig:
    """Training hyperparameters (defaults: the paper's CIFAR-10 ResNet-20, Appendix B).

    ``steps``, ``milestones`` and ``warmup_steps`` are durations (``62400``, ``"62400it"``,
    ``"160ep"``; epochs use the loader's iterations per epoch). Learning rate at step s:
    ``lr * warmup(s) * decay(s)`` with ``warmup(s) = min(1, (s + 1) / warmup_steps)`` and
    ``decay`` = ``gamma ** #{milestones <= s}`` ("step"),
    ``(1 + cos(pi * (s - warmup_steps) / (steps - warmup_steps))) / 2`` ("cosine") or 1
    ("constant"). ``data_seed`` fixes the data order and augmentation (``make_loader``);
    ``init_seed`` is for whoever builds the model (``models.get(name, seed=cfg.init_seed)``);
    ``backend`` is MaskedSGD's.
    """

    steps: Union[int, str] = 62400
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decoupled_weight_decay: bool = False
    nesterov: bool = False
    schedule: str = "step"
    milestones: Tuple[Union[int, str], ...] = (31200, 46800)
    gamma: float = 0.1
    warmup_steps: Union[int, str] = 0
    init_seed: int = 0
    data_seed: int = 0
    drop_last: bool = False
    backend: str = "auto"

    def __post_init__(self):
        self.milestones = tuple(self.milestones)
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig: schedule must be one of {_SCHEDULES}, "
                             f"got {self.schedule!r}")
        for name in ("steps", "warmup_steps"):
            durations.parse(getattr(self, name))
        for m in self.milestones:
            durations.parse(m)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ValueError(f"TrainConfig: batch_size must be an int >= 1, "
                             f"got {self.batch_size!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"TrainConfig: {name} must be a finite number >= 0, got {v!r}")
        for name in ("init_seed", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TrainConfig: {name} must be an int, got {v!r}")

    # ------------------------------------------------------------------ durations in steps
    def total_steps(self, iterations_per_epoch: Optional[int] = None) -> int:
        return durations.to_steps(self.steps, iterations_per_epoch)

    def milestone_steps(self, iterations_per_epoch: Optional[int] = None) -> Tuple[int, ...]:
        return tuple(sorted(durations.to_steps(m, iterations_per_epoch) for m in self.milestones))

    def warmup(self, iterations_per_epoch: Optional[int] = None) -> int:
        return durations.to_steps(self.warmup_steps, iterations_per_epoch)

    def lr_multiplier(self, step: int, iterations_per_epoch: Optional[int] = None) -> float:
        """The factor of ``lr`` at (0-based) step ``step``."""
        return _multiplier_fn(self, iterations_per_epoch)(step)

    def lr_at(self, step: int, iterations_per_epoch: Optional[int] = None) -> float:
        return self.lr * self.lr_multiplier(step, iterations_per_epoch)

    # ------------------------------------------------------------------------ (de)serialize
    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**dict(d))


def _multiplier_fn(cfg: TrainConfig, iterations_per_epoch: Optional[int]) -> Callable[[int], float]:
    """``step -> lr multiplier`` with the durations resolved once (it runs every step)."""
    w = cfg.warmup(iterations_per_epoch)
    schedule, gamma = cfg.schedule, cfg.gamma
    milestones = cfg.milestone_steps(iterations_per_epoch) if schedule == "step" else ()
    span = 1
    if schedule == "cosine":
        span = max(1, cfg.total_steps(iterations_per_epoch) - w)

    def multiplier(step: int) -> float:
        mult = min(1.0, (step + 1) / w) if w > 0 else 1.0
        if schedule == "step":
            mult *= gamma ** sum(1 for m in milestones if m <= step)
        elif schedule == "cosine":
            t = min(1.0, max(0.0, (step - w) / span))
            mult *= 0.5 * (1.0 + math.cos(math.pi * t))
        return mult

    return multiplier


@dataclass
class TrainResult:
    """What ``train`` returns. ``losses[i]`` is the train loss of step ``start_step + i``."""

    losses: torch.Tensor
    start_step: int
    end_step: int
    iterations_per_epoch: int
    test_error: Optional[float] = None
    test_loss: Optional[float] = None
    seconds: float = 0.0

    @property
    def train_loss(self) -> float:
        """Mean train loss over the last epoch of the steps run."""
        n = min(self.iterations_per_epoch, self.losses.numel())
        return float(self.losses[-n:].double().mean()) if n else float("nan")

    @property
    def train_loss_epsilon(self) -> float:
        """Appendix F's eps: :func:`train_loss_epsilon_appendix_f` of these losses."""
        return train_loss_epsilon_appendix_f(self.losses, self.iterations_per_epoch)


def train_loss_epsilon_appendix_f(losses, iterations_per_epoch: int) -> float:
    """Appendix F's eps of the train LCS-set: std (unbiased) of the per-batch train loss over the
    last epoch of (dense) training. (Appendix B's eps, fitted from random-pruning experiments, is
    ``fastimp.theory.train_loss_epsilon_appendix_b``.)"""
    t = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if isinstance(iterations_per_epoch, bool) or not isinstance(iterations_per_epoch, int) \
            or iterations_per_epoch < 1:
        raise ValueError(f"iterations_per_epoch must be an int >= 1, got {iterations_per_epoch!r}")
    last = t[-iterations_per_epoch:]
    if last.numel() < 2:
        return float("nan")
    return float(last.std())


def train_loss_epsilon(losses, iterations_per_epoch: int) -> float:
    """Deprecated name of :func:`train_loss_epsilon_appendix_f`."""
    import warnings
    warnings.warn("fastimp.training.train_loss_epsilon is deprecated: call "
                  "train_loss_epsilon_appendix_f (Appendix F's eps; Appendix B's is "
                  "fastimp.theory.train_loss_epsilon_appendix_b)", DeprecationWarning,
                  stacklevel=2)
    return train_loss_epsilon_appendix_f(losses, iterations_per_epoch)


# ---------------------------------------------------------------------------- building blocks
def make_loader(dataset: Dataset, cfg: TrainConfig, device=None,
                num_workers: int = 0) -> Union[Loader, FolderLoader]:
    """The train loader of ``cfg`` (its batch size, data seed, drop_last), shuffled, augmented;
    ``num_workers``: DataLoader workers of an image-folder data set."""
    return dataset.loader("train", cfg.batch_size, drop_last=cfg.drop_last, seed=cfg.data_seed,
                          device=device, num_workers=num_workers)


def _mask_dict(model: nn.Module, masks) -> Dict[str, torch.Tensor]:
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a fastimp.Masks or a dict name -> bool tensor, "
                        f"got {type(masks).__name__}")
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"masks: the model has no parameter named {name!r}")
        m = check_mask(m, f"masks: {name!r}", params[name].shape)
        out[name] = m.to(device=params[name].device)
    return out


def _params_to_masks(model: nn.Module, masks: Dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    return {params[n]: m for n, m in masks.items()}


def make_optimizer(model: nn.Module, cfg: TrainConfig, masks=None):
    """``fastimp.MaskedSGD`` over ``model.parameters()`` with ``cfg``'s lr, momentum, weight decay
    (coupled or decoupled), nesterov and backend; pruned weights stay exactly zero."""
    from .optim import MaskedSGD
    by_param = _params_to_masks(model, _mask_dict(model, masks))
    return MaskedSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                     masks=by_param or None, decoupled_weight_decay=cfg.decoupled_weight_decay,
                     backend=cfg.backend)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   iterations_per_epoch: Optional[int] = None,
                   start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` with ``cfg.lr_multiplier``; ``last_epoch`` is the global step,
    so after ``start_step`` the optimizer's lr is that of step ``start_step``."""
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["initial_lr"] = cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                              _multiplier_fn(cfg, iterations_per_epoch))
    _position(sched, start_step)
    return sched


def _position(sched, step: int) -> None:
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(sched.optimizer.param_groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs


# ------------------------------------------------------------------------------ checkpoints
class Checkpoint:
    """Resume file of ``train``: written atomically every ``every`` steps (temp file +
    ``os.replace``); ``train`` resumes from it when it exists and removes it at the end unless
    ``keep``."""

    def __init__(self, path, every: int = 1000, keep: bool = False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Checkpoint: every must be an int >= 1, got {every!r}")
        self.path = Path(path)
        self.every = every
        self.keep = keep

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: Dict[str, Any]) -> None:
        from fastimp._io import save_torch
        save_torch(state, self.path)

    def load(self) -> Dict[str, Any]:
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer_to(optimizer, device) -> None:
    for st in optimizer.state.values():
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                st[k] = v.to(device)


# ------------------------------------------------------------------- pieces of a training run
class NonFiniteLossError(ValueError):
    """The train loss became NaN or infinite: training stopped at that step (a diverging run,
    e.g. too large an lr). ``step`` (global), ``lr`` (that step's), ``loss``, ``run`` (the run's
    index in a batch of runs, else None); callers add where it happened (e.g. the IMP level)."""

    def __init__(self, step: int, lr: float, loss: float, run: Optional[int] = None,
                 where: str = ""):
        self.step, self.lr, self.loss, self.run, self.where = step, lr, loss, run, where
        super().__init__(self._text())

    def _text(self) -> str:
        who = self.where or (f"run {self.run}" if self.run is not None else "")
        return (f"{who + ': ' if who else ''}training diverged: the loss of step {self.step} "
                f"is {self.loss} (lr {self.lr:g}); lower the learning rate (train.lr) or check "
                "the data")

    def located(self, where: str) -> "NonFiniteLossError":
        """The same error with ``where`` (e.g. "level 2, rewind step 0, replicate 1") in front."""
        return NonFiniteLossError(self.step, self.lr, self.loss, self.run, where)


def _resolve_loader(loader, cfg: TrainConfig, who: str = "train"):
    if isinstance(loader, Dataset):
        loader = make_loader(loader, cfg)
    if not hasattr(loader, "steps") or not hasattr(loader, "iterations_per_epoch"):
        raise TypeError(f"{who}: loader must be a fastimp.data Loader / FolderLoader or a Dataset")
    if loader.iterations_per_epoch < 1:
        raise ValueError(f"{who}: the loader has no batch per epoch")
    return loader


def _step_range(cfg: TrainConfig, ipe: int, start_step, end_step,
                who: str = "train") -> Tuple[int, int]:
    """``[start, end)`` of global steps (``end_step=None``: the config's total)."""
    end = cfg.total_steps(ipe) if end_step is None else int(end_step)
    start = int(start_step)
    if start < 0 or end < start:
        raise ValueError(f"{who}: need 0 <= start_step <= end_step, got {start}, {end}")
    return start, end


def _apply_masks(model: nn.Module, mask_by_name: Dict[str, torch.Tensor]) -> None:
    """m ⊙ w, in place."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, m in mask_by_name.items():
            params[name].mul_(m)


def _checkpoint_state(model, optimizer, scheduler, step: int, start: int, end: int,
                      cfg: TrainConfig, losses: torch.Tensor, device) -> Dict[str, Any]:
    """What a resume needs: model, optimizer (momentum, masks), scheduler, step, the losses so
    far, the RNG states, and what identifies the run (steps, config)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "start_step": start,
            "end_step": end, "config": cfg.to_dict(), "losses": losses[:step - start].cpu(),
            "rng": _rng_state(torch.device(device))}


def _resume(checkpoint: Checkpoint, model, optimizer, scheduler, start: int, end: int,
            cfg: TrainConfig, losses: torch.Tensor, device) -> int:
    """Load ``checkpoint`` (written by :func:`_checkpoint_state` for the same run) into model,
    optimizer, scheduler and ``losses``; returns the step it reached."""
    state = checkpoint.load()
    if (state.get("start_step"), state.get("end_step"), state.get("config")) != \
            (start, end, cfg.to_dict()):
        raise ValueError(f"checkpoint {checkpoint.path} belongs to another run (steps "
                         f"{state.get('start_step')}..{state.get('end_step')}, config "
                         f"{state.get('config')}); remove it to start over")
    device = torch.device(device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _optimizer_to(optimizer, device)
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    losses[:step - start] = state["losses"].to(losses.device)
    _set_rng_state(state["rng"], device)
    return step


class _FiniteGuard:
    """Stops training at the first non-finite loss (:class:`NonFiniteLossError`). On the CPU every
    step is checked as it ends (one scalar read); on a GPU every 50 steps and before each
    checkpoint (each check waits for the device), naming the first bad step all the same.
    ``losses`` [steps] or [steps, runs]: row ``i`` is global step ``start + i``."""

    def __init__(self, losses: torch.Tensor, start: int, lr_at: Callable[[int], float],
                 at: int, runs: Optional[Sequence[int]] = None):
        self.losses, self.start, self.lr_at, self.runs = losses, start, lr_at, runs
        self.every = 1 if losses.device.type == "cpu" else 50
        self.checked = at

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        """``step`` = steps completed; ``loss`` = that step's loss (a scalar or one per run)."""
        if self.every == 1:
            if not math.isfinite(float(loss if loss.dim() == 0 else loss.sum())):
                self.flush(step)  # raises
            self.checked = step
        elif step % self.every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        """Check every step not yet checked up to ``step`` (exclusive)."""
        lo = self.checked
        part = self.losses[lo - self.start:step - self.start]
        bad = ~torch.isfinite(part)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            i = where[0]
            run = None
            if part.dim() > 1:
                run = where[1] if self.runs is None else self.runs[where[1]]
            raise NonFiniteLossError(lo + i, self.lr_at(lo + i), float(part[tuple(where)]), run)
        self.checked = step


class _Progress:
    """A tqdm bar over the steps ``[start, end)`` updated about 100 times, with loss and lr."""

    def __init__(self, enabled: bool, start: int, end: int, at: int, desc: str = "train"):
        self.bar = None
        self.every = max(1, (end - start) // 100)
        self.start, self.end = start, end
        if enabled and end > at:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=end - start, initial=at - start, desc=desc, unit="it",
                            leave=False, dynamic_ncols=True)

    def due(self, step: int) -> bool:
        return self.bar is not None and (step % self.every == 0 or step == self.end)

    def update(self, step: int, loss: str, lr: float) -> None:
        self.bar.update(step - self.start - self.bar.n)
        self.bar.set_postfix(loss=loss, lr=f"{lr:.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sgd_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _finish(model: nn.Module, losses: torch.Tensor, start: int, end: int, ipe: int, device,
            t0: float, eval_data, checkpoint: Optional[Checkpoint]) -> TrainResult:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    result = TrainResult(losses.cpu(), start, end, ipe, seconds=time.perf_counter() - t0)
    if eval_data is not None:
        result.test_error, result.test_loss = evaluate(model, eval_data, device)
    if checkpoint is not None and not checkpoint.keep:
        checkpoint.remove()
    return result


# ---------------------------------------------------------------------------------- training
def train(model: nn.Module, cfg: TrainConfig, loader, masks=None, start_step: int = 0,
          end_step: Optional[int] = None, optimizer=None, scheduler=None,
          on_step: Optional[Callable[[int, nn.Module, Any], None]] = None,
          checkpoint: Optional[Checkpoint] = None, progress: bool = True,
          eval_data=None) -> TrainResult:
    """Train ``model`` for global steps ``[start_step, end_step)`` (``end_step=None``: the config's
    total) on ``loader.batch(step)`` with cross-entropy. ``masks`` are applied to the weights
    first (m ⊙ w) and kept by the optimizer. A non-finite loss stops training with a
    :class:`NonFiniteLossError` naming the step and its lr. See the module docstring and
    docs/ARCHITECTURE.md."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"train: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train: cfg must be a TrainConfig, got {type(cfg).__name__}")
    loader = _resolve_loader(loader, cfg)
    device, ipe = loader.device, loader.iterations_per_epoch
    start, end = _step_range(cfg, ipe, start_step, end_step)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError("train: checkpoint must be a fastimp.training.Checkpoint")

    model.to(device)
    mask_by_name = _mask_dict(model, masks)
    _apply_masks(model, mask_by_name)
    made_sched = scheduler is None
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, mask_by_name)
    if scheduler is None:
        scheduler = make_scheduler(optimizer, cfg, ipe, start)

    losses = torch.zeros(end - start, dtype=torch.float32, device=device)
    step = start
    if checkpoint is not None and checkpoint.exists():
        step = _resume(checkpoint, model, optimizer, scheduler, start, end, cfg, losses, device)
    elif not made_sched and start and scheduler.last_epoch != start:
        _position(scheduler, start)

    lr_of = _multiplier_fn(cfg, ipe)
    guard = _FiniteGuard(losses, start, lambda s: cfg.lr * lr_of(s), step)
    bar = _Progress(progress, start, end, step)
    t0 = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for x, y in loader.steps(step, end):
            loss = _sgd_step(model, optimizer, x, y)
            scheduler.step()
            losses[step - start] = loss.detach()
            step += 1
            guard.after_step(step, loss.detach())
            if on_step is not None:
                on_step(step, model, optimizer)
            if checkpoint is not None and step % checkpoint.every == 0 and step < end:
                guard.flush(step)
                checkpoint.save(_checkpoint_state(model, optimizer, scheduler, step, start, end,
                                                  cfg, losses, device))
            if bar.due(step):
                bar.update(step, f"{float(loss.detach()):.4f}", scheduler.get_last_lr()[0])
        guard.flush(step)
    finally:
        bar.close()
    model.train(was_training)
    return _finish(model, losses, start, end, ipe, device, t0, eval_data, checkpoint)


def train_batched(models, cfg, loaders, masks=None, start_step=0, end_step=None, **kw):
    """Train N independent runs as one program -> ``list[TrainResult]``; run ``i`` equals
    ``train(models[i], cfg, loaders[i], masks[i], ...)`` to float tolerance. Keywords:
    ``train``'s (``on_step``, ``checkpoint``, ``progress``, ``eval_data``) and ``on_run_end``,
    ``batching``, ``max_batch_runs``, ``cuda_graph``, ``precision``, ``channels_last``; see
    :func:`fastimp.batched.engine.train_batched` and docs/ARCHITECTURE.md."""
    from fastimp.batched.engine import train_batched as impl
    return impl(models, cfg, loaders, masks, start_step, end_step, **kw)


@torch.no_grad()
def evaluate(model: nn.Module, data, device=None, batch_size: int = 1000) -> Tuple[float, float]:
    """``(error, loss)``: the fraction of examples misclassified and the mean cross-entropy.

    ``data``: a Loader / FolderLoader (one epoch), a ``Dataset`` (its test split, in order, no
    augmentation, ``batch_size`` at a time) or any iterable of (x, y) batches.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(data, Dataset):
        data = data.loader("test", batch_size, device=device)
    if isinstance(data, (Loader, FolderLoader)):
        batches: Iterable = data.epoch(0)
    else:
        batches = data
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    try:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            out = model(x)
            total_loss += F.cross_entropy(out.float(), y, reduction="sum").double()
            wrong += (out.argmax(1) != y).sum()
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the data has no examples")
    return float(wrong) / n, float(total_loss) / n
