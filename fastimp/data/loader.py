"""Batch loaders addressed by global step: deterministic, resumable, augmentation on the device.

Step ``s`` is batch ``s % ipe`` of epoch ``s // ipe`` (``ipe`` = iterations per epoch). An epoch's
order is ``torch.randperm`` from a CPU generator seeded by ``(seed, epoch)``, and its augmentation
draws (crop offsets and flips of every example) come from another seeded by ``(seed, epoch)``.
Nothing depends on what was drawn before, so starting at any step gives exactly the batches an
uninterrupted run sees, on any device.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch

from ..durations import iterations_per_epoch as _ipe

__all__ = ["Loader", "FolderLoader", "BatchedLoader", "random_crop_flip", "mix_seed"]

_MASK = (1 << 63) - 1
_PAD = 4


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finalizer over each), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


def random_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                     pad: int = 4) -> torch.Tensor:
    """Batched ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip`` on [B, C, H, W].

    ``offsets`` [B, 2] (top, left) in ``[0, 2 pad]`` of the zero-padded image; ``flips`` [B] bool.
    Output pixel (i, j) of image b is ``padded[b, :, top_b + i, left_b + j]``, mirrored along W
    where flipped: one gather from the strided view of all crops, no per-image loop.
    """
    b, c, h, w = x.shape
    if b == 0:
        return x.clone()
    dev = x.device
    offsets = offsets.to(dev)
    flips = flips.to(dev)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    windows = xp.unfold(2, h, 1).unfold(3, w, 1)          # [B, C, 2 pad + 1, 2 pad + 1, H, W] view
    out = windows[torch.arange(b, device=dev), :, offsets[:, 0], offsets[:, 1]]  # [B, C, H, W]
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


class Loader:
    """(x, y) batches of tensor data, addressed by global step.

    ``x`` [N, ...] (uint8 images are divided by 255), ``y`` [N] int64; ``mean``/``std`` per
    channel (dim 1) normalize after the scaling; ``augment``: None, ``"cifar"`` (random crop with
    zero padding 4 + horizontal flip, batched on ``device``) or ``callable(x, generator) -> x``.
    ``iterations_per_epoch = ceil(N / B)``, or ``floor`` with ``drop_last``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0,
                 augment: Union[None, str, Callable] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 device=None):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("Loader: x and y must be tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"Loader: x has {x.shape[0]} examples but y has {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Loader: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Loader: seed must be an int, got {seed!r}")
        if augment not in (None, "cifar") and not callable(augment):
            raise ValueError(f"Loader: augment must be None, 'cifar' or a callable, "
                             f"got {augment!r}")
        if augment == "cifar" and x.dim() != 4:
            raise ValueError(f"Loader: augment='cifar' needs images [N, C, H, W], "
                             f"got {tuple(x.shape)}")
        self.device = torch.device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.long)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.augment = augment
        self.num_examples = int(x.shape[0])
        self.iterations_per_epoch = _ipe(self.num_examples, batch_size, self.drop_last)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        self._mean = None if mean is None else torch.tensor(
            mean, dtype=torch.float32, device=self.device).reshape(shape)
        self._std = None if std is None else torch.tensor(
            std, dtype=torch.float32, device=self.device).reshape(shape)
        self._plan_epoch = None
        self._plan = None

    def __len__(self) -> int:
        return self.iterations_per_epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def __repr__(self) -> str:
        return (f"Loader(N={self.num_examples}, batch_size={self.batch_size}, "
                f"drop_last={self.drop_last}, shuffle={self.shuffle}, seed={self.seed}, "
                f"augment={self.augment!r}, device={self.device})")

    def order(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch`` (on ``device``)."""
        return self._epoch_plan(epoch)[0]

    def _epoch_plan(self, epoch: int):
        """(order, crop offsets, flips) of ``epoch``, drawn on the CPU and moved to the device
        once per epoch (so no step waits for a host-to-device copy)."""
        if self._plan_epoch != epoch:
            perm, offsets, flips = self._draw_plan(epoch)
            if offsets is not None:
                offsets, flips = offsets.to(self.device), flips.to(self.device)
            self._plan = (perm.to(self.device), offsets, flips)
            self._plan_epoch = epoch
        return self._plan

    def _draw_plan(self, epoch: int):
        """(order, crop offsets or None, flips or None) of ``epoch`` on the CPU."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x0EB0C, epoch))
            perm = torch.randperm(self.num_examples, generator=g)
        else:
            perm = torch.arange(self.num_examples)
        offsets = flips = None
        if self.augment == "cifar":
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0xA06, epoch))
            offsets = torch.randint(0, 2 * _PAD + 1, (self.num_examples, 2), generator=g)
            flips = torch.rand(self.num_examples, generator=g) < 0.5
        return perm, offsets, flips

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of global step ``step``."""
        return self.share(step, 0, self.batch_size)

    def share(self, step: int, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Examples ``[lo, hi)`` of the batch of global step ``step`` (a rank's share of it in
        data-parallel training), exactly as in ``batch(step)[lo:hi]``."""
        if callable(self.augment) and (lo, hi) != (0, self.batch_size):
            x, y = self.batch(step)  # its draws are for the whole batch
            return x[lo:hi], y[lo:hi]
        idx, offsets, flips = _step_plan(self, self._epoch_plan, step)
        idx = idx[lo:hi]
        if offsets is not None:
            offsets, flips = offsets[lo:hi], flips[lo:hi]
        x = self.x.index_select(0, idx)
        y = self.y.index_select(0, idx)
        if self.augment == "cifar":
            x = random_crop_flip(x, offsets, flips, pad=_PAD)
        elif self.augment is not None:
            x = self.augment(x, torch.Generator().manual_seed(mix_seed(self.seed, 0xA07, step)))
        return self._normalize(x), y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            x = x.float()
        if self._mean is not None:
            x = x.sub_(self._mean)
        if self._std is not None:
            x = x.div_(self._std)
        return x

    def steps(self, start_step: int = 0, end_step: Optional[int] = None,
              part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor,
                                                                        torch.Tensor]]:
        """Batches of global steps ``start_step, start_step + 1, ...`` (until ``end_step``);
        ``part=(rank, world)``: that rank's share of each (:func:`batch_share`)."""
        if part is None:
            return _steps(self.batch, start_step, end_step)
        return _steps(lambda s: self.share(s, *batch_share(self, s, *part)), start_step,
                      end_step)

    def epoch(self, e: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``e``."""
        n = self.iterations_per_epoch
        return self.steps(e * n, (e + 1) * n)


def batch_examples(loader, step: int) -> int:
    """Examples in the batch of global step ``step`` (the last one of an epoch may be short)."""
    ipe, B = loader.iterations_per_epoch, loader.batch_size
    if not loader.drop_last and step % ipe == ipe - 1:
        return loader.num_examples - (ipe - 1) * B
    return B


def batch_share(loader, step: int, rank: int, world: int) -> Tuple[int, int]:
    """``(lo, hi)``: rank ``rank`` of ``world``'s contiguous share of the batch of ``step``
    (sizes differ by at most one; the union of the shares is the batch)."""
    b = batch_examples(loader, step)
    return b * rank // world, b * (rank + 1) // world


class _SeededItems(torch.utils.data.Dataset):
    """``folder[i]`` drawn under ``torch.manual_seed(s)`` for an index ``(i, s)``, so the random
    transforms of every example are fixed by its seed, whatever worker loads it."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        i, s = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.folder[i]


class _BatchPlan:
    """The batch sampler of a :class:`FolderLoader`'s one DataLoader: the batches of whatever
    steps are asked for next (the DataLoader reads it anew for every pass, so its persistent
    workers serve every epoch and every resume)."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader:
    """The :class:`Loader` interface over an ImageFolder (ImageNet) through a torch DataLoader.

    Order from ``(seed, epoch)`` as in :class:`Loader`; the random transforms of the example at
    position p of epoch e run under ``torch.manual_seed(mix_seed(seed, e, p))``, so batches are
    the same whatever ``num_workers`` is and wherever a run resumes. One DataLoader per loader:
    ``num_workers`` workers (persistent between epochs when > 0), pinned memory on a CUDA device;
    ``steps(..., part=(rank, world))`` loads only that rank's share of every batch.
    """

    def __init__(self, folder, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, device=None, num_workers: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FolderLoader: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"FolderLoader: seed must be an int, got {seed!r}")
        self.folder = folder
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_workers = int(num_workers)
        self.num_examples = len(folder)
        self.iterations_per_epoch = _ipe(self.num_examples, batch_size, self.drop_last)
        self._plan = _BatchPlan()
        self._loader = None

    def __len__(self) -> int:
        return self.iterations_per_epoch

    def __iter__(self):
        return self.epoch(0)

    def __repr__(self) -> str:
        return (f"FolderLoader(N={self.num_examples}, batch_size={self.batch_size}, "
                f"drop_last={self.drop_last}, shuffle={self.shuffle}, seed={self.seed}, "
                f"device={self.device}, num_workers={self.num_workers})")

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x0EB0C, epoch))
        return torch.randperm(self.num_examples, generator=g)

    def _batches(self, epoch: int, first: int, last: int, part=None):
        order = self.order(epoch).tolist()
        b = self.batch_size
        out = []
        for i in range(first, last):
            lo, hi = i * b, min((i + 1) * b, self.num_examples)
            if part is not None:
                a, c = batch_share(self, epoch * self.iterations_per_epoch + i, *part)
                lo, hi = lo + a, lo + c
            out.append([(order[p], mix_seed(self.seed, 0xA06, epoch, p)) for p in range(lo, hi)])
        return out

    def batch(self, step: int):
        return self.share(step, 0, self.batch_size)

    def share(self, step: int, lo: int, hi: int):
        """Examples ``[lo, hi)`` of the batch of global step ``step``."""
        n = self.iterations_per_epoch
        if n == 0:
            raise ValueError(f"FolderLoader: {self.num_examples} examples make no batch of "
                             f"{self.batch_size} with drop_last=True")
        epoch, i = divmod(int(step), n)
        batch = self._batches(epoch, i, i + 1)[0][lo:hi]
        return next(iter(self._dataloader([batch])))

    def _dataloader(self, batches):
        if self._loader is None:
            kw = {}
            if self.num_workers > 0:
                kw.update(persistent_workers=True, prefetch_factor=4)
            self._loader = torch.utils.data.DataLoader(
                _SeededItems(self.folder), batch_sampler=self._plan,
                num_workers=self.num_workers, pin_memory=self.device.type == "cuda", **kw)
        self._plan.batches = batches
        for x, y in self._loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def steps(self, start_step: int = 0, end_step: Optional[int] = None, part=None):
        """Batches of global steps ``start_step, ...``; ``part=(rank, world)``: that rank's
        share of each."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        n = self.iterations_per_epoch
        if n == 0:
            raise ValueError(f"FolderLoader: {self.num_examples} examples make no batch of "
                             f"{self.batch_size} with drop_last=True")
        step = start_step
        while end_step is None or step < end_step:
            epoch, first = divmod(step, n)
            last = n if end_step is None else min(n, end_step - epoch * n)
            yield from self._dataloader(self._batches(epoch, first, last, part))
            step = epoch * n + last

    def epoch(self, e: int = 0):
        n = self.iterations_per_epoch
        return self.steps(e * n, (e + 1) * n)


class BatchedLoader:
    """The batches of N runs' loaders at one global step, together: ``batch(step) -> (x, y)``
    with ``x`` [b, N, ...] and ``y`` [b, N] (the run axis second, so that ``x.view(b, N * C,
    ...)`` packs the runs into the channel axis), ``x[:, i]`` = ``loaders[i].batch(step)[0]``.

    When every loader is a :class:`Loader` over the same tensors with the same batch size,
    normalization and augmentation ("cifar" or None), one gather, one crop + flip and one
    normalization serve all N runs (each keeps its own order and augmentation draws, stacked
    once per epoch); otherwise each loader makes its batch and they are stacked.
    """

    def __init__(self, loaders: Sequence):
        loaders = list(loaders)
        if not loaders:
            raise ValueError("BatchedLoader: expected at least one loader")
        first = loaders[0]
        for name in ("iterations_per_epoch", "batch_size", "device"):
            values = {str(getattr(ld, name)) for ld in loaders}
            if len(values) > 1:
                raise ValueError(f"BatchedLoader: the loaders differ in {name} ({sorted(values)})")
        self.loaders = loaders
        self.n = len(loaders)
        self.device = first.device
        self.batch_size = first.batch_size
        self.iterations_per_epoch = first.iterations_per_epoch
        self.fused = all(isinstance(ld, Loader) for ld in loaders) and all(
            ld.x is first.x and ld.y is first.y and ld.augment in (None, "cifar")
            and ld.augment == first.augment and ld.drop_last == first.drop_last
            and _same(ld._mean, first._mean) and _same(ld._std, first._std) for ld in loaders)
        self._plan_epoch = None
        self._plan = None

    def __len__(self) -> int:
        return self.iterations_per_epoch

    def _epoch_plan(self, epoch: int):
        """Every run's (order, offsets, flips) of ``epoch``, position-major: [M, N] / [M, N, 2]."""
        if self._plan_epoch != epoch:
            plans = [ld._draw_plan(epoch) for ld in self.loaders]
            order = torch.stack([p[0] for p in plans], 1).to(self.device)
            offsets = flips = None
            if plans[0][1] is not None:
                offsets = torch.stack([p[1] for p in plans], 1).to(self.device)
                flips = torch.stack([p[2] for p in plans], 1).to(self.device)
            self._plan = (order, offsets, flips)
            self._plan_epoch = epoch
        return self._plan

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x [b, N, ...], y [b, N]) of global step ``step`` for the N runs."""
        if not self.fused:
            xs, ys = zip(*(ld.batch(step) for ld in self.loaders))
            return torch.stack(xs, 1), torch.stack(ys, 1)
        first = self.loaders[0]
        idx, offsets, flips = _step_plan(first, self._epoch_plan, step)
        idx = idx.reshape(-1)                           # position-major: example b of run r
        b = idx.numel() // self.n
        x = first.x.index_select(0, idx)
        y = first.y.index_select(0, idx).view(b, self.n)
        if offsets is not None:
            x = random_crop_flip(x, offsets.reshape(-1, 2), flips.reshape(-1), pad=_PAD)
        x = first._normalize(x)
        return x.view(b, self.n, *x.shape[1:]), y

    def steps(self, start_step: int = 0,
              end_step: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The N runs' batches of global steps ``start_step, ...`` (until ``end_step``)."""
        return _steps(self.batch, start_step, end_step)


def _step_plan(loader: "Loader", epoch_plan, step: int):
    """The (order, crop offsets, flips) rows of global step ``step`` from ``epoch_plan(epoch)``
    (rows of one run's plan, or of the N runs' stacked plans)."""
    ipe, b = loader.iterations_per_epoch, loader.batch_size
    if ipe == 0:
        raise ValueError(f"Loader: {loader.num_examples} examples make no batch of {b} with "
                         "drop_last=True")
    epoch, i = divmod(int(step), ipe)
    order, offsets, flips = epoch_plan(epoch)
    sl = slice(i * b, (i + 1) * b)
    return order[sl], None if offsets is None else offsets[sl], \
        None if flips is None else flips[sl]


def _steps(batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], start_step: int,
           end_step: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")

    def gen():
        step = start_step
        while end_step is None or step < end_step:
            yield batch(step)
            step += 1
    return gen()


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))
