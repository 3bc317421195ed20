"""The registry of model factories (OpenLTH style: a name -> a function that builds the model)."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

_FACTORIES: Dict[str, Callable[..., nn.Module]] = {}
_ALIASES: Dict[str, str] = {}


def register(name: str, *, aliases=()) -> Callable:
    """Decorator: ``@register("my_net")`` on ``fn(num_classes=..., **kw) -> nn.Module``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(fn):
            raise TypeError(f"register({name!r}): expected a callable factory, got {fn!r}")
        _FACTORIES[name] = fn
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def names() -> List[str]:
    """Registered model names (aliases not included)."""
    return sorted(_FACTORIES)


def canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    name = _ALIASES.get(name, name)
    if name not in _FACTORIES:
        known = ", ".join(names() + sorted(_ALIASES))
        raise ValueError(f"unknown model {name!r}; registered models: {known}")
    return name


def get(name: str, num_classes: Optional[int] = None, seed: Optional[int] = None,
        **kw) -> nn.Module:
    """Build model ``name`` on the CPU. ``seed`` makes the initialization reproducible without
    touching the global RNG; ``num_classes=None`` keeps the factory's default."""
    fn = _FACTORIES[canonical(name)]
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        kw["num_classes"] = num_classes
    if seed is None:
        return fn(**kw)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(**kw)


def positive_int(value, name: str) -> int:
    """``value`` checked as an int >= 1 (a model's width, depth, length ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def positive_ints(values, name: str) -> tuple:
    """``values`` checked as a list of ints >= 1 (e.g. an MLP's hidden widths)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name}: expected a list of ints >= 1, got {values!r}")
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name}: expected a list of ints >= 1, got {list(values)!r}")
    return values


def factory_signature(name: str) -> inspect.Signature:
    return inspect.signature(_FACTORIES[canonical(name)])
