"""Named IMP configurations: the paper's three settings (Appendix B of
``paper/unmasking-lottery-ticket.txt``, lines 243-249 of the text) and a small CPU default.

``get(name) -> IMPConfig`` (a fresh copy each call), ``names()``, ``register(name)`` to add one.
Every duration is in iterations (optimizer steps), as Appendix B gives them. Every preset sets
IMP-FT's retraining as Appendix B runs it ("The importance of iterative pruning and retraining"):
a constant lr of the peak lr / 100 with weight decay off (``finetune_lr``,
``finetune_weight_decay``; set them to None for the schedule's final lr and the run's decay).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from fastimp.imp.config import IMPConfig

_PRESETS: Dict[str, Callable[[], IMPConfig]] = {}


def register(name: str):
    """Decorator: ``@register("my-preset") def f() -> IMPConfig``."""
    def deco(fn):
        _PRESETS[name] = fn
        return fn
    return deco


def names() -> List[str]:
    return sorted(_PRESETS)


def get(name: str) -> IMPConfig:
    if name not in _PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; expected one of {names()}")
    return _PRESETS[name]()


def _train(**kw):
    from fastimp.training import TrainConfig
    return TrainConfig(**kw)


@register("cifar10-resnet20")
def cifar10_resnet20() -> IMPConfig:
    """Appendix B, "CIFAR-10 ResNet-20" (line 243): SGD, batch size 128, 62400 steps, lr 0.1,
    momentum 0.9, weight decay 1e-4, lr x 0.1 at 31200 and 46800; 12 rounds of 20% magnitude
    pruning; rewind steps 0, 250, 2000; 4 replicates. 62400 = 160 epochs of 390 = floor(50000/128),
    hence drop_last=True."""
    return IMPConfig(
        model="cifar_resnet_20", dataset="cifar10",
        train=_train(steps="62400it", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     schedule="step", milestones=("31200it", "46800it"), gamma=0.1,
                     drop_last=True),
        levels=12, pruning_fraction=0.2, pruning="magnitude", strategy="wr",
        rewind_steps=[0, 250, 2000], replicates=4, device="auto",
        finetune_lr=0.001, finetune_weight_decay=0.0)


@register("cifar100-resnet18")
def cifar100_resnet18() -> IMPConfig:
    """Appendix B, "CIFAR-100 ResNet-18" (line 245): SGD, batch size 128, 78125 steps, lr 0.1,
    momentum 0.9, weight decay 5e-4, lr / 5 (gamma 0.2) at 23438, 46875 and 62500; 15 rounds of 20%
    magnitude pruning; rewind steps 0, 400, 3200; 4 replicates. 78125 steps = 200 epochs of
    50000/128 examples, so every example is kept (drop_last=False)."""
    return IMPConfig(
        model="cifar_resnet_18", dataset="cifar100",
        train=_train(steps="78125it", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     schedule="step", milestones=("23438it", "46875it", "62500it"), gamma=0.2,
                     drop_last=False),
        levels=15, pruning_fraction=0.2, pruning="magnitude", strategy="wr",
        rewind_steps=[0, 400, 3200], replicates=4, device="auto",
        finetune_lr=0.001, finetune_weight_decay=0.0)


@register("imagenet-resnet50")
def imagenet_resnet50() -> IMPConfig:
    """Appendix B, "ImageNet ResNet-50" (line 247): decoupled SGD, batch size 2048, 15970 steps,
    lr 2.048, momentum 0.875, weight decay 5e-4, cosine decay with 5000 warm-up steps; 12 rounds of
    20% magnitude pruning; rewind steps 0, 1250, 5000; 4 replicates. Not reproduced: the "additional
    algorithms to speed up the training" of Leavitt (2022) (Composer's speed-up recipe). Made
    practical (docs/DISTRIBUTED.md): bf16 autocast (the paper's trainer used mixed precision),
    channels-last, at most 256 examples per forward/backward on a device (one GPU accumulates 8
    micro-batches per step; 8 GPUs under torchrun take 256 each), a DataLoader with workers."""
    return IMPConfig(
        model="resnet50", dataset="imagenet",
        train=_train(steps="15970it", batch_size=2048, lr=2.048, momentum=0.875,
                     # Composer's DecoupledSGDW (the paper's trainer) decays by
                     # (lr / initial_lr) * 5e-4; MaskedSGD's decoupled decay is lr * wd.
                     weight_decay=5e-4 / 2.048, decoupled_weight_decay=True, schedule="cosine",
                     milestones=(), warmup_steps="5000it", drop_last=True),
        levels=12, pruning_fraction=0.2, pruning="magnitude", strategy="wr",
        rewind_steps=[0, 1250, 5000], replicates=4, device="auto",
        finetune_lr=2.048 / 100, finetune_weight_decay=0.0,
        precision="bf16", per_device_batch=256, channels_last=True)


@register("mnist1d")
def mnist1d() -> IMPConfig:
    """Small CPU default (not from the paper): the MNIST-1D 1-D conv net (3 conv layers of 32
    channels + linear, 7.9k prunable weights), 600 steps of SGD (batch 100, lr 0.1 / 10 at 300 and
    450, momentum 0.9, weight decay 5e-4), 12 levels of 20% magnitude pruning (6.9% of the weights
    left), IMP-WR from step 0, 3 replicates (matching's eps is the std of the dense replicates),
    one CPU thread; IMP-FT at lr 0.001 (the peak / 100) without decay, as the paper's presets.
    ``make demo`` runs it; README.md gives its numbers."""
    return IMPConfig(
        model="mnist1d_conv", dataset="mnist1d",
        train=_train(steps="600it", batch_size=100, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     schedule="step", milestones=("300it", "450it"), gamma=0.1),
        levels=12, pruning_fraction=0.2, pruning="magnitude", strategy="wr",
        rewind_steps=[0], replicates=3, device="cpu", threads=1,
        finetune_lr=0.001, finetune_weight_decay=0.0)
