"""ImageNet ResNet-50 from torchvision (random initialization, ``weights=None``)."""
from __future__ import annotations

from torch import nn

from .registry import register


@register("resnet50", aliases=("imagenet_resnet_50",))
def resnet50(num_classes: int = 1000, **kw) -> nn.Module:
    """``torchvision.models.resnet50(weights=None, num_classes=num_classes, **kw)``."""
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - torchvision is in the [data] extra
        raise ImportError("resnet50 needs torchvision: pip install 'fastimp[data]'") from e
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kw)
