"""Training throughput on CIFAR-shaped data with ResNet-20: fastimp's engine (device-resident
data, batched crop + flip on the device, MaskedSGD, ``fastimp.training.train``) against the loop
users write today: a torchvision-style ``DataLoader`` over a ``TensorDataset`` with per-image
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``Normalize`` and
``torch.optim.SGD`` followed by a mask multiply. Both train the same 50%-sparse ResNet-20 with
batch size 128, lr 0.1, momentum 0.9, weight decay 1e-4, measured alternately (best of two) in
one run.
"""
from __future__ import annotations

import os
import time
from typing import List

import torch
import torch.nn.functional as F

from benchmarks.common import Table, sync

BATCH = 128


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


class _TransformedTensors(torch.utils.data.Dataset):
    """TensorDataset of uint8 [N, 3, 32, 32] images with per-image torchvision transforms."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def _baseline_loader(x, y, workers: int, device):
    from torchvision import transforms as T
    from fastimp.data import CIFAR10_MEAN, CIFAR10_STD
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                    T.ConvertImageDtype(torch.float32), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    ds = _TransformedTensors(x, y, tf)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=workers > 0, drop_last=False)


def _random_masks(model, density=0.5, seed=0):
    from fastimp.masks import prunable
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in prunable(model).items()}


def _baseline_seconds_per_step(x, y, masks_by_name, steps, warmup, workers, device):
    from fastimp import models
    model = models.get("cifar_resnet_20", seed=0).to(device)
    params = dict(model.named_parameters())
    masks = [(params[n], m.to(device)) for n, m in masks_by_name.items()]
    with torch.no_grad():
        for p, m in masks:
            p.mul_(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = _baseline_loader(x, y, workers, device)
    model.train()

    def batches():
        while True:
            yield from loader

    it = batches()

    def run(n):
        for _ in range(n):
            xb, yb = next(it)
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)

    run(warmup)
    sync(device)
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    return (time.perf_counter() - t0) / steps


def _fastimp_seconds_per_step(dataset, masks_by_name, steps, warmup, device):
    from fastimp import models
    from fastimp.training import TrainConfig, make_loader, train
    model = models.get("cifar_resnet_20", seed=0)
    cfg = TrainConfig(steps=warmup + steps, batch_size=BATCH, lr=0.1, momentum=0.9,
                      weight_decay=1e-4, milestones=())
    loader = make_loader(dataset, cfg, device=device)
    train(model, cfg, loader, masks=masks_by_name, end_step=warmup, progress=False)
    sync(device)
    t0 = time.perf_counter()
    train(model, cfg, loader, masks=masks_by_name, start_step=warmup, progress=False)
    sync(device)
    return (time.perf_counter() - t0) / steps


def _loader_seconds_per_batch(dataset, x, y, workers, steps, device):
    """The data pipelines alone: batches per second delivered on the device."""
    from fastimp.training import TrainConfig, make_loader
    ours = make_loader(dataset, TrainConfig(batch_size=BATCH), device=device)
    for _ in ours.steps(0, 3):
        pass
    sync(device)
    t0 = time.perf_counter()
    for xb, _ in ours.steps(3, 3 + steps):
        pass
    sync(device)
    t_ours = (time.perf_counter() - t0) / steps
    base = _baseline_loader(x, y, workers, device)
    it = iter(base)
    for _ in range(3):
        next(it)
    t0 = time.perf_counter()
    n = 0
    while n < steps:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(base)
            continue
        xb = xb.to(device, non_blocking=True)
        n += 1
    sync(device)
    return t_ours, (time.perf_counter() - t0) / steps


def tables(device, quick: bool) -> List[Table]:
    from fastimp import data, models
    device = str(device)
    cuda = torch.device(device).type == "cuda"
    n = 4096 if quick else 50000
    steps = (30 if quick else 300) if cuda else (3 if quick else 20)
    warmup = 10 if cuda else 2
    workers = _workers()
    dataset = data.get("synthetic", shape=(3, 32, 32), num_classes=10, train_size=n,
                       test_size=16, device=device)
    x_cpu, y_cpu = dataset.train.x.cpu(), dataset.train.y.cpu()
    masks = _random_masks(models.get("cifar_resnet_20"), 0.5)

    t = Table(f"Training throughput: ResNet-20, CIFAR-shaped synthetic data (N={n}), batch "
              f"{BATCH}, 50% sparse, {device}")
    case = f"{steps} steps"
    base, ours = float("inf"), float("inf")
    for _ in range(2):  # alternate and keep the best of each: shared machines are noisy
        base = min(base, _baseline_seconds_per_step(x_cpu, y_cpu, masks, steps, warmup, workers,
                                                    device))
        ours = min(ours, _fastimp_seconds_per_step(dataset, masks, steps, warmup, device))
    t.add(case, f"torch DataLoader ({workers} workers) + SGD + mask mul", base,
          extra=f"{1 / base:.1f} steps/s")
    t.add(case, "fastimp train (device loader + MaskedSGD)", ours,
          baseline=f"torch DataLoader ({workers} workers) + SGD + mask mul",
          extra=f"{1 / ours:.1f} steps/s")

    lt = Table(f"Data pipeline alone: batches of {BATCH} CIFAR-shaped images delivered on "
               f"{device} (random crop pad 4 + flip + normalize)")
    nb = (50 if quick else 300) if cuda else (10 if quick else 50)
    t_ours, t_base = _loader_seconds_per_batch(dataset, x_cpu, y_cpu, workers, nb, device)
    lt.add(f"{nb} batches", f"torch DataLoader ({workers} workers)", t_base,
           extra=f"{1 / t_base:.0f} batches/s")
    lt.add(f"{nb} batches", "fastimp Loader", t_ours,
           baseline=f"torch DataLoader ({workers} workers)", extra=f"{1 / t_ours:.0f} batches/s")
    return [t, lt]
