"""pytest-benchmark suite for global magnitude pruning (``pytest benchmarks/test_bench_pruning.py``):
fastimp.prune_magnitude vs torch.cat + torch.kthvalue vs torch.nn.utils.prune.global_unstructured
on torchvision ResNet-18 (no pretrained weights). Not run by ``make test``."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastimp
from benchmarks.bench_pruning import FRACTION, _cat_kthvalue

pytest.importorskip("pytest_benchmark")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_prune_magnitude(benchmark, resnet18, backend):
    masks = benchmark(fastimp.prune_magnitude, resnet18, FRACTION, backend=backend)
    assert masks.remaining() == masks.total() - round(FRACTION * masks.total())


def test_cat_kthvalue(benchmark, resnet18):
    weights = [p.detach() for p in fastimp.prunable(resnet18).values()]
    masks = benchmark(_cat_kthvalue, weights, None)
    assert len(masks) == len(weights)


def test_global_unstructured(benchmark, resnet18):
    def setup():
        m = copy.deepcopy(resnet18)
        params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        return (params,), {}

    benchmark.pedantic(lambda params: prune.global_unstructured(
        params, pruning_method=prune.L1Unstructured, amount=FRACTION), setup=setup, rounds=3)
