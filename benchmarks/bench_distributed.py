"""What spreading work over torch.distributed ranks costs or gains on this machine: 2 processes
under ``torchrun`` (gloo on the CPU, NCCL on GPUs) against one process with the same cores.

- data-parallel training (``fastimp.distributed.data_parallel.train``: DDP, each rank its half of
  the global batch) against ``fastimp.training.train`` on the whole batch;
- a landscape grid split over the ranks (``evaluate(..., distributed=True)``) against one
  process;
- Hutchinson probes of the Hessian split over the ranks against one process.

On the CPU the ranks get one torch thread each and the one process is measured with one thread
and with as many as the ranks have together (the same cores used two ways; tiny models often run
faster on one thread, so the better of the two is the baseline). The ranks' time excludes process
startup (each rank times its own work after a warm-up; the slowest rank counts).
``python -m benchmarks --only distributed``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

from benchmarks.common import Table

NPROC = 2


def _threads(device: str, ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // ranks) if device == "cpu" else 1


def _cases(quick: bool) -> Dict[str, Dict]:
    steps = 20 if quick else 60
    return {
        "train mnist1d_mlp (hidden 100, 100), batch 100": dict(
            kind="train", model="mnist1d_mlp", dataset="mnist1d", kw={}, batch=100,
            steps=steps),
        "train mnist1d_conv (the mnist1d preset), batch 100": dict(
            kind="train", model="mnist1d_conv", dataset="mnist1d", kw={}, batch=100,
            steps=steps),
        "train cifar_resnet_20, batch 128 (32x32 synthetic)": dict(
            kind="train", model="cifar_resnet_20", dataset="synthetic",
            kw={"shape": [3, 32, 32], "train_size": 2048}, batch=128,
            steps=max(4, steps // 6)),
        "plane 11x11 of mnist1d_conv on 1000 test examples": dict(
            kind="plane", model="mnist1d_conv", grid=11),
        "Hessian trace, 32 probes, mnist1d_mlp on 2000 examples": dict(
            kind="trace", model="mnist1d_mlp", samples=32),
    }


def _work(case: Dict, device: str, distributed: bool) -> float:
    """Seconds of the case's timed part on this rank."""
    from fastimp import data, models, training
    if case["kind"] == "train":
        from fastimp.distributed import data_parallel as dp
        ds = data.get(case["dataset"], device=device, **case["kw"])
        cfg = training.TrainConfig(steps=case["steps"] + 3, batch_size=case["batch"], lr=0.05,
                                   momentum=0.9, weight_decay=5e-4, milestones=())
        model = models.get(case["model"], num_classes=ds.num_classes, seed=0).to(device)
        loader = training.make_loader(ds, cfg, device=device)

        def go(a, b):
            if distributed:
                dp.train(model, cfg, loader, None, a, b)
            else:
                training.train(model, cfg, loader, start_step=a, end_step=b, progress=False)
        go(0, 3)
        t0 = time.perf_counter()
        go(3, 3 + case["steps"])
        return (time.perf_counter() - t0) / case["steps"]
    ds = data.get("mnist1d", device=device)
    model = models.get(case["model"], num_classes=10, seed=0).to(device)
    if case["kind"] == "plane":
        from fastimp.landscape.evaluate import evaluate
        from fastimp.landscape.space import StateLayout
        layout = StateLayout(model)
        w0 = layout.flatten(model)
        g = torch.Generator().manual_seed(0)
        U = torch.randn(2, layout.D, generator=g).to(w0) * 0.01
        n = case["grid"]
        C = torch.stack(torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n),
                                       indexing="ij"), -1).reshape(-1, 2)
        test = list(ds.loader("test", 500, device=device))
        evaluate(model, w0, U, C[:2], test, distributed=distributed)
        t0 = time.perf_counter()
        evaluate(model, w0, U, C, test, distributed=distributed)
        return time.perf_counter() - t0
    from fastimp.hessian import Hessian
    batches = list(ds.loader("train", 500, shuffle=False, augment=False, device=device))[:4]
    hess = Hessian(model, None, batches, probes_per_pass=8, distributed=distributed)
    hess.trace(n_samples=8 * NPROC)  # every rank's first vmapped (forward-mode) product
    t0 = time.perf_counter()
    hess.trace(n_samples=case["samples"])
    return time.perf_counter() - t0


def _ranks(name: str, case: Dict, device: str, quick: bool) -> float:
    """The case under torchrun with NPROC ranks: the slowest rank's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(_threads(device, NPROC)))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={NPROC}", "-m", "benchmarks.bench_distributed", name, device,
               "quick" if quick else "full", out]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        times = [json.load(open(f"{out}.{r}")) for r in range(NPROC)]
    return max(times)


def tables(device: str, quick: bool) -> List[Table]:
    threads = torch.get_num_threads()
    if device == "cuda" and torch.cuda.device_count() < NPROC:
        table = Table(f"{NPROC} ranks under torchrun: needs {NPROC} GPUs, this machine has "
                      f"{torch.cuda.device_count()} (NCCL takes one card per rank)")
        return [table]
    table = Table(f"{NPROC} ranks under torchrun ({'gloo' if device == 'cpu' else 'NCCL'}, "
                  f"{_threads(device, NPROC)} thread(s) each) vs one process on {device}")
    counts = sorted({1, _threads(device, 1)}) if device == "cpu" else [threads]
    try:
        for name, case in _cases(quick).items():
            unit = "per step" if case["kind"] == "train" else "per call"
            best = None
            for n in counts:
                torch.set_num_threads(n)
                t = _work(case, device, distributed=False)
                impl = f"one process, {n} thread{'s' if n > 1 else ''}"
                table.add(name, impl, t, extra=unit)
                if best is None or t < best[1]:
                    best = (impl, t)
            two = _ranks(name, case, device, quick)
            table.add(name, f"{NPROC} ranks", two, baseline=best[0], extra=unit)
    finally:
        torch.set_num_threads(threads)
    return [table]


def _rank_main(argv: List[str]) -> None:
    from fastimp import distributed
    name, device, mode, out = argv
    distributed.init()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seconds = _work(_cases(mode == "quick")[name], distributed.device(device), True)
    with open(f"{out}.{distributed.rank()}", "w") as f:
        json.dump(seconds, f)
    distributed.shutdown()


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
