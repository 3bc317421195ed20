"""BatchNorm over the global batch of a data-parallel step.

With a plain BatchNorm every rank would normalize with the statistics of its own share of the
batch, which differ from those of the whole batch that one process sees. During data-parallel
training fastimp replaces every BatchNorm by one that reduces the batch statistics over the ranks
first: ``torch.nn.SyncBatchNorm`` for CUDA tensors, and :class:`GlobalBatchNorm` (the same
mathematics written with a differentiable all-reduce) for
CPU tensors, where SyncBatchNorm refuses to run. The forward pass, the gradients and the running
statistics then equal those of one process on the whole batch (to float rounding); with gradient
accumulation, those of one process on the union of the ranks' i-th micro-batches. The model gets
its own BatchNorm modules back afterwards (:func:`synchronized`).
"""
from __future__ import annotations

import contextlib
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x, differentiable: every rank's loss depends on y, so the gradient of the
    summed loss with respect to x is Σ_ranks dL_r/dy (an all-reduce of the incoming gradients)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch over every rank: the
    per-channel count, sum and sum of squares (float64) are all-reduced (differentiably), then
    mean = S / n and var = SS / n - mean² (biased, for normalizing; the running variance gets the
    unbiased n / (n - 1) of it, as torch's). Evaluation mode is plain BatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        xf, xd = x.float(), x.double()  # the sums in float64: S / n - mean² cancels digits
        count = torch.full((1,), float(x.numel() // max(x.shape[1], 1)) if x.numel() else 0.0,
                           dtype=torch.float64, device=x.device)
        stats = torch.cat([count, xd.sum(dims), (xd * xd).sum(dims)])
        stats = _AllReduceSum.apply(stats)
        C = x.shape[1]
        n = stats[0]
        mean = stats[1:1 + C] / n
        var = (stats[1 + C:] / n - mean * mean).clamp_min(0)
        mean, var = mean.float(), var.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)
                unbiased = var * float(n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _replace(model: nn.Module, cls) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Swap every BatchNorm child for ``cls`` sharing its parameters and buffers; returns
    (parent, name, original) to undo it."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BN):
                new = cls(child.num_features, child.eps, child.momentum, child.affine,
                          child.track_running_stats)
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                if child.track_running_stats:
                    new.running_mean, new.running_var = child.running_mean, child.running_var
                    new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(parent, name, new)
                swapped.append((parent, name, child))
    return swapped


@contextlib.contextmanager
def synchronized(model: nn.Module, device):
    """Within it, ``model``'s BatchNorm layers normalize with the global batch's statistics
    (SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` on the CPU); the same parameters and
    buffers are used, and the original modules are put back on exit. A model without BatchNorm
    is untouched. Needs an initialized process group."""
    if isinstance(model, _BN):
        raise ValueError("model: a bare BatchNorm module cannot be synchronized in place")
    cls = nn.SyncBatchNorm if torch.device(device).type == "cuda" else GlobalBatchNorm
    swapped = _replace(model, cls)
    try:
        yield model
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)
