"""Everything about an IMP command that can be checked before anything is written: where the run
goes, the model and its keyword arguments, the dataset, rewind steps against the length of
training T, the pruning schedule, and the run already in the folder (its ``config.json`` readable
and of the same hyperparameters). A rejected command leaves the output folder byte-identical and
creates no ``imp_<hash>`` folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastimp.imp.config import IMPConfig


@dataclass
class Preflight:
    """What :func:`check` found: the run folder, the config merged with the folder's, the loaded
    dataset, a CPU model of the architecture (expected shapes) and T (steps of training)."""
    folder: Path
    merged: IMPConfig
    dataset: Any
    model: torch.nn.Module
    total_steps: int


def read_config(folder: Path):
    """The IMPConfig in ``folder/config.json``, or None when there is none (verified)."""
    from fastimp.imp import verify
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    fix = ("restore it, or delete it and rerun the same `fastimp imp` command to rewrite it "
           "(with that command's rewind steps, seeds and levels)")
    return verify.read_config(path, fix)


def merge_config(old, config: IMPConfig, folder: Path) -> IMPConfig:
    """Union of ``config``'s rewind steps / seeds / levels with those of the folder's ``old``."""
    if old is None:
        return config
    if old.hashed_dict() != config.hashed_dict():
        raise ValueError(f"{folder} holds a run with different hyperparameters (its config.json "
                         "was edited, or a hash collision); use another --out")
    seeds = old.replicate_seeds + [s for s in config.replicate_seeds
                                   if s not in old.replicate_seeds]
    return config.replace(rewind_steps=sorted(set(old.rewind_steps) | set(config.rewind_steps)),
                          seeds=None if seeds == list(range(len(seeds))) else seeds,
                          replicates=len(seeds), levels=max(old.levels, config.levels))


def build_model(name: str, model_kwargs, num_classes: int) -> torch.nn.Module:
    """``models.get(name, num_classes, seed=0, **model_kwargs)``; whatever goes wrong building
    it is a ValueError naming ``model_kwargs``, the model and the cause."""
    from fastimp import models
    from fastimp.models.registry import canonical
    canonical(name)  # an unknown model says so
    try:
        return models.get(name, num_classes=num_classes, seed=0, **model_kwargs)
    except Exception as exc:  # noqa: BLE001 -- a user's factory may raise anything
        if isinstance(exc, TypeError) and "argument" in str(exc):
            raise ValueError(f"IMPConfig.model_kwargs: model {name!r} does not take "
                             f"{model_kwargs} ({exc})") from None
        raise ValueError(f"IMPConfig.model_kwargs: model {name!r} cannot be built with "
                         f"{model_kwargs} ({' '.join(str(exc).split()) or type(exc).__name__})"
                         ) from None


def _build(config: IMPConfig, num_classes: int) -> torch.nn.Module:
    return build_model(config.model, config.model_kwargs, num_classes)


def _load_dataset(config: IMPConfig, device):
    from fastimp.imp.retraining import load_dataset
    try:
        return load_dataset(config, device=device)
    except TypeError as exc:
        raise ValueError(f"IMPConfig.dataset_kwargs: dataset {config.dataset!r} does not take "
                         f"{config.dataset_kwargs} ({exc})") from None


def check_schedule(config: IMPConfig, n_prunable: int) -> None:
    """Every level must leave at least one weight: k = round(f·n) < n (``fastimp.pruning``)."""
    if config.pruning_fraction == "adaptive":
        return
    n = n_prunable
    for level in range(1, config.levels + 1):
        k = round(config.pruning_fraction * n)
        if n and k >= n:
            raise ValueError(f"IMPConfig.levels: pruning {config.pruning_fraction} per level "
                             f"removes the last of the model's {n_prunable} prunable weights at "
                             f"level {level}; use at most {level - 1} levels")
        n -= k


def check(config: IMPConfig, out_dir, device, eps=None) -> Preflight:
    """Validate the command ``run(config, out_dir, eps=eps)`` without writing anything; see
    module doc."""
    from fastimp import training
    from fastimp._io import folder_path
    from fastimp.imp.matching import check_eps
    from fastimp.masks import prunable
    check_eps(eps)
    out = folder_path(out_dir, "out_dir (--out)", "(the run goes to OUT/imp_<hash>/)")
    folder = out / config.folder_name()
    merged = merge_config(read_config(folder), config, folder)
    dataset = _load_dataset(config, device)
    model = _build(config, dataset.num_classes)
    n_prunable = sum(p.numel() for p in prunable(model).values())
    if n_prunable == 0:
        raise ValueError(f"IMPConfig.model: {config.model!r} has no prunable weights (conv or "
                         "linear layers)")
    loader = training.make_loader(dataset, config.train, device=str(device))
    T = config.train.total_steps(loader.iterations_per_epoch)
    for tau in merged.rewind_steps:
        if tau > T:
            raise ValueError(f"IMPConfig.rewind_steps (--rewind-step): {tau} is past the end of "
                             f"training (T = {T} steps)")
    check_schedule(merged, n_prunable)
    return Preflight(folder, merged, dataset, model, T)
