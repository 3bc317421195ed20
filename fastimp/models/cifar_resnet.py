"""CIFAR ResNets: He et al. (2016)'s ResNet-20 (16-32-64 channels, 3 stages x 3 basic blocks) and
the CIFAR ResNet-18 (3x3 stem, no max-pool, 64-128-256-512, 2 blocks per stage)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..batched.pack import pad_channels, register_packer
from .init import kaiming_init_
from .registry import positive_int, register


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.extra = planes - in_planes

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _PackedShortcutA(nn.Module):
    """Option A for N runs packed along the channels (``fastimp.batched``): pads each run's."""

    def __init__(self, n: int, extra: int):
        super().__init__()
        self.n, self.extra = n, extra

    def forward(self, x):
        return pad_channels(x[:, :, ::2, ::2], self.n, self.extra // 2,
                            self.extra - self.extra // 2)


@register_packer(_ShortcutA)
def _pack_shortcut_a(mods, n):
    return _PackedShortcutA(n, mods[0].extra)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Sequential()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem conv + BN + ReLU, stages of basic blocks, global average pool, linear."""

    def __init__(self, plan, num_classes: int = 10, shortcut: str = "B", in_channels: int = 3):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 conv + BN), "
                             f"got {shortcut!r}")
        width = plan[0][0]
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks = []
        in_planes = width
        for i, (planes, n) in enumerate(plan):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init_(self)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register("cifar_resnet_20", aliases=("resnet20",))
def cifar_resnet_20(num_classes: int = 10, shortcut: str = "B", width: int = 16) -> nn.Module:
    """ResNet-20 for CIFAR: 16-32-64 channels (``width`` scales them), 3 stages x 3 basic blocks,
    1x1 conv + BN shortcuts where the shape changes (option B, as OpenLTH's cifar_resnet_20);
    ``shortcut="A"`` for He et al.'s parameter-free zero padding. 0.27M parameters."""
    width = positive_int(width, "width")
    return CifarResNet([(width, 3), (2 * width, 3), (4 * width, 3)], num_classes, shortcut)


@register("cifar_resnet_18", aliases=("resnet18",))
def cifar_resnet_18(num_classes: int = 100, shortcut: str = "B", width: int = 64) -> nn.Module:
    """ResNet-18 for CIFAR: 3x3 stem, no max-pool, 64-128-256-512 channels x 2 basic blocks."""
    width = positive_int(width, "width")
    return CifarResNet([(width, 2), (2 * width, 2), (4 * width, 2), (8 * width, 2)], num_classes,
                       shortcut)
