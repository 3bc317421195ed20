"""``python -m benchmarks.batched_fidelity [--imp-only | --drift-only]``: how closely batched runs
(``train_batched``, IMP ``batch_runs="auto"``) follow runs trained one at a time, where exact
equality cannot be the yardstick.

- ``drift``: fp32 CIFAR ResNet-20 runs after 50 steps from init, packed against ``train()``, next
  to a plain ``train()`` whose initial weights were moved by 1e-7 (relative): both differ from the
  reference by the same O(1), i.e. 50 fp32 steps amplify any float reordering (the float64 test in
  tests/test_batched.py shows the packed arithmetic itself is exact).
- ``imp``: the mnist1d preset's IMP (13 levels x 3 replicates) with ``batch_runs=1`` and with the
  default, per-level test errors side by side against the replicates' spread.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fastimp import models
from fastimp.data import Loader
from fastimp.training import TrainConfig, train, train_batched

RUNS = 3


def _rel_error(a, b) -> float:
    """The largest relative L2 difference over the floating tensors of two state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).norm() / (sa[k].double().norm() + 1e-30))
               for k in sa if sa[k].is_floating_point())


def drift(width: int, batch: int, side: int, n: int, steps: int = 50) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    # a learnable 4-class task: which of two channels are brighter than average
    bright = x.float().mean((2, 3)) > 127.5
    y = bright[:, 0].long() + 2 * bright[:, 1].long()
    loaders = [Loader(x, y, batch, seed=s, augment="cifar", mean=[0.5] * 3, std=[0.25] * 3)
               for s in range(RUNS)]
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      milestones=())

    def make(seed):
        return models.get("cifar_resnet_20", num_classes=4, width=width, seed=seed)
    masks = []
    for s in range(RUNS):
        gm = torch.Generator().manual_seed(100 + s)
        masks.append({k: torch.rand(p.shape, generator=gm) < 0.7
                      for k, p in make(0).named_parameters() if p.dim() > 1})
    ref = [make(s) for s in range(RUNS)]
    for i in range(RUNS):
        train(ref[i], cfg, loaders[i], masks[i], progress=False)
    packed = [make(s) for s in range(RUNS)]
    train_batched(packed, cfg, loaders, masks, progress=False, batching="packed")
    moved = make(0)
    gp = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gp) * (p.norm() / p.numel() ** 0.5) * 1e-7)
    train(moved, cfg, loaders[0], masks[0], progress=False)
    return {"packed": [_rel_error(ref[i], packed[i]) for i in range(RUNS)],
            "moved": _rel_error(ref[0], moved)}


def imp_errors() -> None:
    from fastimp.imp import run
    from fastimp.presets import get as preset
    cfg = preset("mnist1d")
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, batch_runs in (("batch_runs=1", 1), ("batch_runs='auto'", "auto")):
            t0 = time.perf_counter()
            r = run(cfg.replace(batch_runs=batch_runs), f"{tmp}/{batch_runs}", progress=False)
            seconds[label] = time.perf_counter() - t0
            rows[label] = {(x["level"], x["replicate"]): x for x in r.results()}
    (a, ra), (b, rb) = rows.items()
    print(f"| level | weights remaining | {a}: test error | {b}: test error | difference |")
    print("|---:|---:|---:|---:|---:|")
    levels = sorted({k[0] for k in ra})
    reps = sorted({k[1] for k in ra})
    for lv in levels:
        ea = [100 * ra[(lv, i)]["test_error"] for i in reps]
        eb = [100 * rb[(lv, i)]["test_error"] for i in reps]
        print(f"| {lv} | {100 * ra[(lv, reps[0])]['weights_remaining']:.1f}% | "
              f"{statistics.mean(ea):.2f} ± {statistics.stdev(ea):.2f} | "
              f"{statistics.mean(eb):.2f} ± {statistics.stdev(eb):.2f} | "
              f"{statistics.mean(eb) - statistics.mean(ea):+.2f} |")
    per_run = [abs(ra[k]["test_error"] - rb[k]["test_error"]) * 100 for k in ra]
    spread = statistics.mean(statistics.stdev(100 * ra[(lv, i)]["test_error"] for i in reps)
                             for lv in levels)
    print(f"\nmean |difference| of a run's test error: {statistics.mean(per_run):.2f} points; "
          f"mean std over the replicates of a level ({a}): {spread:.2f} points")
    print(" ".join(f"{k}: {v:.1f} s" for k, v in seconds.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batched_fidelity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--imp-only", action="store_true")
    p.add_argument("--drift-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.imp_only:
        print("| ResNet-20 width, batch, image side, examples | packed vs train(), per run | "
              "train() from init moved by 1e-7 |\n|---|---|---:|")
        for width, batch, side, n in ((4, 8, 8, 40), (16, 32, 16, 256), (16, 64, 16, 512)):
            d = drift(width, batch, side, n)
            print(f"| {width}, {batch}, {side}, {n} | "
                  f"{', '.join(f'{e:.2g}' for e in d['packed'])} | {d['moved']:.2g} |", flush=True)
    if not args.drift_only:
        imp_errors()


if __name__ == "__main__":
    main()
