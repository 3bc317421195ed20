"""Model registry: ``register(name)``, ``get(name, num_classes=None, seed=None, **kw)``, ``names()``.

Registered: ``cifar_resnet_20`` (``resnet20``), ``cifar_resnet_18`` (``resnet18``), ``resnet50``,
``mnist1d_mlp``, ``mnist1d_conv``. Users add their own with ``@fastimp.models.register("name")``.
"""
from __future__ import annotations

from .registry import get, names, register

from . import cifar_resnet, imagenet_resnet, mnist1d  # noqa: F401,E402  (registers the models)

__all__ = ["get", "names", "register"]
