"""fastimp: fast Iterative Magnitude Pruning and error-landscape analyses.

Top-level names load lazily so that ``import fastimp`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "backends": "fastimp._backend",
    "format_backends": "fastimp._backend",
    "MaskedSGD": "fastimp.optim",
    "Masks": "fastimp.masks",
    "prunable": "fastimp.masks",
    "WeightSpace": "fastimp.weight_space",
    "prune_magnitude": "fastimp.pruning",
    "prune_random": "fastimp.pruning",
    "error_barrier": "fastimp.landscape",
    "TrainConfig": "fastimp.training",
    "IMPConfig": "fastimp.imp",
    "load_run": "fastimp.imp",
    "Hessian": "fastimp.hessian",
    "intersection_threshold": "fastimp.theory",
    "max_pruning_ratio": "fastimp.theory",
    "adaptive_pruning_ratio": "fastimp.theory",
}
_SUBMODULES = ("ops", "kernels", "optim", "masks", "weight_space", "pruning", "models", "data",
               "durations", "training", "imp", "presets", "landscape", "hessian", "theory",
               "report", "cli")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        if name == "backends":
            module._load_ops()
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastimp.{name}")
    raise AttributeError(f"module 'fastimp' has no attribute {name!r}")


def __dir__():
    return __all__
