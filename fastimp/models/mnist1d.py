"""Small models for MNIST-1D (inputs [N, 40]; Greydanus' MLP and 1-D conv net)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .init import kaiming_init_
from .registry import positive_int, positive_ints, register


class MLP(nn.Module):
    def __init__(self, in_features: int = 40, hidden=(100, 100), num_classes: int = 10):
        super().__init__()
        dims = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fc = nn.Linear(dims[-1], num_classes)
        kaiming_init_(self)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.fc(x)


class ConvNet1d(nn.Module):
    """Three 1-D convolutions (stride 2, ``channels`` wide) with ReLU, then a linear layer."""

    def __init__(self, length: int = 40, channels: int = 32, num_classes: int = 10):
        super().__init__()
        self.length = length
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k, p in ((5, 1), (3, 1), (3, 1)):
            n = (n + 2 * p - k) // 2 + 1
        self.fc = nn.Linear(channels * n, num_classes)
        kaiming_init_(self)

    def forward(self, x):
        x = x.view(x.shape[0], -1, self.length)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


@register("mnist1d_mlp")
def mnist1d_mlp(num_classes: int = 10, hidden=(100, 100), in_features: int = 40) -> nn.Module:
    """MLP 40 -> 100 -> 100 -> num_classes with ReLU."""
    return MLP(positive_int(in_features, "in_features"), positive_ints(hidden, "hidden"),
               positive_int(num_classes, "num_classes"))


@register("mnist1d_conv")
def mnist1d_conv(num_classes: int = 10, channels: int = 32, length: int = 40) -> nn.Module:
    """1-D conv net: 3 conv layers (``channels`` wide, stride 2) + linear."""
    if positive_int(length, "length") < 3:  # three stride-2 convolutions leave one position
        raise ValueError(f"length: expected an int >= 3, got {length!r}")
    return ConvNet1d(length, positive_int(channels, "channels"),
                     positive_int(num_classes, "num_classes"))
