"""pytest-benchmark suite of training steps (``pytest benchmarks/test_bench_training.py``): the
same two loops as ``python -m benchmarks --only training`` (ResNet-20, CIFAR-shaped synthetic
data, batch 128, 50% sparse), so ``--benchmark-compare`` can track them across commits. Never part
of ``make test``."""
import pytest
import torch

from benchmarks.bench_training import (_baseline_seconds_per_step, _fastimp_seconds_per_step,
                                       _random_masks, _workers)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 50 if DEVICE == "cuda" else 3


@pytest.fixture(scope="module")
def setup():
    from fastimp import data, models
    ds = data.get("synthetic", train_size=4096, test_size=16, device=DEVICE)
    return ds, ds.train.x.cpu(), ds.train.y.cpu(), _random_masks(models.get("cifar_resnet_20"))


@pytest.mark.parametrize("impl", ["torch DataLoader + SGD + mask mul", "fastimp train"])
def test_training_steps(benchmark, setup, impl):
    ds, x, y, masks = setup
    if impl == "fastimp train":
        def run():
            return _fastimp_seconds_per_step(ds, masks, STEPS, 2, DEVICE)
    else:
        def run():
            return _baseline_seconds_per_step(x, y, masks, STEPS, 2, _workers(), DEVICE)
    benchmark.group = f"training resnet20 {DEVICE}"
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
