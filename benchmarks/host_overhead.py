"""``python -m benchmarks.host_overhead``: the host (CPU) time of ``MaskedSGD.step`` on the
Triton path with the kernel launch itself replaced by a no-op, on CPU tensors: what the Python
layer costs per step (grouping, table lookups, argument packing), the part the GPU cannot hide;
and of the public op ``masked_sgd_`` called directly over the same tensors (it checks its
arguments on every call; its device-table cache key holds what the checks read).
On a GPU, ``benchmarks.gpu_check`` (resnet_steps) measures the real host time, launch included.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # lets the triton backend resolve on CPU tensors

import torch  # noqa: E402

from benchmarks.bench_masked_sgd import _make, resnet_shapes  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    import fastimp.kernels.masked_sgd as k
    from fastimp.optim import MaskedSGD
    k.INTERPRETER = False  # pass arguments as for a GPU launch
    for name in ("masked_sgd_kernel", "_masked_sgd_kernel"):  # this tree's name, or older ones
        if hasattr(k, name):
            setattr(k, name, _NoLaunch())
    from fastimp.ops.masked_sgd import masked_sgd_
    torch.set_num_threads(1)
    print("| model | tensors | MaskedSGD.step | masked_sgd_ (direct call) |\n"
          "|---|---:|---:|---:|")
    for model in ("resnet18", "resnet50"):
        shapes = resnet_shapes(model)
        params, masks = _make(shapes, "cpu")
        opt = MaskedSGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, masks=masks,
                        backend="triton")
        opt.step()
        grads = [p.grad for p in params]
        mks = [masks.get(p) for p in params]
        bufs = masked_sgd_(params, grads, None, mks, lr=0.01, momentum=0.9, backend="triton")
        medians = []
        for step in (opt.step, lambda: masked_sgd_(params, grads, bufs, mks, lr=0.01,
                                                   momentum=0.9, weight_decay=5e-4,
                                                   backend="triton")):
            times = []
            for _ in range(300):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times) * 1e6)
        print(f"| {model} | {len(shapes)} | {medians[0]:.0f} us | {medians[1]:.0f} us |")


if __name__ == "__main__":
    main()
