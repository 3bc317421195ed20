"""Datasets and batch loaders: ``get(name, root=None, device="cpu", download=False, **kw)``.

Names: ``mnist1d`` (generated locally), ``cifar10``, ``cifar100`` (torchvision's on-disk format),
``imagenet`` (ImageFolder), ``synthetic`` (any shape, for benchmarks).
"""
from .datasets import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN,
                       IMAGENET_STD, Dataset, Split, default_root, get, names, register)
from .loader import BatchedLoader, FolderLoader, Loader, mix_seed, random_crop_flip

__all__ = ["get", "names", "register", "Dataset", "Split", "Loader", "FolderLoader",
           "BatchedLoader", "random_crop_flip", "mix_seed", "default_root", "CIFAR10_MEAN",
           "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
