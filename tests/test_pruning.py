"""prune_magnitude vs torch.nn.utils.prune, prune_random, and the errors (the threshold op
itself: tests/test_magnitude_threshold.py)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastimp
from conftest import need_backend
from fastimp.masks import Masks
from fastimp.pruning import prune_magnitude, prune_random

BACKENDS = ["torch", "cpu", "triton"]


def _need(backend):
    need_backend("magnitude_threshold", backend)


# --- prune_magnitude / prune_random -----------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv1d(8, 5, 2)
        self.fc = nn.Linear(20, 7)
        self.out = nn.Linear(7, 3, bias=False)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _torch_params(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d,
                                                                     nn.Linear))]


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
def test_prune_magnitude_matches_global_unstructured(backend):
    if backend != "auto":
        _need(backend)
    model = _net()
    ref = copy.deepcopy(model)
    masks = None
    for level, fraction in enumerate([0.2, 0.2, 0.35, 0.5]):
        masks = prune_magnitude(model, fraction, masks, backend=backend)
        prune.global_unstructured(_torch_params(ref), pruning_method=prune.L1Unstructured,
                                  amount=fraction)
        want = Masks.from_torch_prune(ref)
        assert masks == want, f"level {level + 1}"
        masks.apply_(model)  # pruned weights zero, as after IMP's training on the mask


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_prune_magnitude_layer_scope_matches_l1_unstructured(backend):
    _need(backend)
    model = _net(1)
    ref = copy.deepcopy(model)
    masks = None
    for fraction in (0.3, 0.3, 0.6):
        masks = prune_magnitude(model, fraction, masks, scope="layer", backend=backend)
        for m, name in _torch_params(ref):
            prune.l1_unstructured(m, name, amount=fraction)
        assert masks == Masks.from_torch_prune(ref)


def test_prune_magnitude_counts_and_inputs():
    model = _net(2)
    masks = prune_magnitude(model, 0.3)
    n0 = masks.total()
    assert masks.remaining() == n0 - round(0.3 * n0)
    masks2 = prune_magnitude(model, 0.3, masks)
    assert masks2.remaining() == masks.remaining() - round(0.3 * masks.remaining())
    assert not bool((masks2.flat() & ~masks.flat()).any())  # pruned stay pruned
    assert prune_magnitude(model, 0.0, masks2) == masks2
    # a weights mapping, float masks, and masks naming a subset of the parameters
    weights = {n: p.detach() for n, p in fastimp.prunable(model).items()}
    assert prune_magnitude(weights, 0.3, {n: m.float() for n, m in masks.items()}) == masks2
    sub = {"fc.weight": torch.ones(7, 20, dtype=torch.bool)}
    m_sub = prune_magnitude(model, 0.5, sub)
    assert list(m_sub) == ["fc.weight"] and m_sub.remaining() == 70
    inc = prune_magnitude(model, 0.5, include=["c1.weight", "c1.bias"])
    assert list(inc) == ["c1.weight", "c1.bias"]


def test_prune_magnitude_errors():
    model = _net()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="'fraction'"):
            prune_magnitude(model, bad)
    with pytest.raises(TypeError, match="'fraction'"):
        prune_magnitude(model, True)
    with pytest.raises(ValueError, match="'scope'"):
        prune_magnitude(model, 0.1, scope="row")
    with pytest.raises(ValueError, match="shape"):
        prune_magnitude(model, 0.1, {"fc.weight": torch.ones(20, 7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="binary"):
        prune_magnitude(model, 0.1, {"fc.weight": torch.full((7, 20), 2.0)})
    with pytest.raises(ValueError, match="no parameters named"):
        prune_magnitude(model, 0.1, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="nothing prunable"):
        prune_magnitude(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), 0.1)
    with pytest.raises(ValueError, match="nothing prunable"):
        prune_random({}, 0.1)
    with pytest.raises(TypeError, match="model_or_weights"):
        prune_magnitude([torch.ones(3)], 0.1)
    with torch.no_grad():
        model.fc.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf \\(in 'fc.weight' \\(1\\)\\)"):
        prune_magnitude(model, 0.1)


@pytest.mark.parametrize("prune", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_rule_for_fractions(prune, scope):
    """k = round(fraction * n) must leave a weight: 1.0 and 0.999999 fail alike; anything that
    leaves one passes, whatever the fraction."""
    fn = prune_magnitude if prune == "magnitude" else prune_random
    model = _net()
    n = {"global": sum(p.numel() for p in fastimp.prunable(model).values()),
         "layer": min(p.numel() for p in fastimp.prunable(model).values())}[scope]
    for f in (1.0, 0.999999, 1 - 0.4 / n):
        with pytest.raises(ValueError, match="rounds to all of them; at least one must remain"):
            fn(model, f, scope=scope)
    m = fn(model, 1 - 0.6 / n, scope=scope)  # rounds to n - 1
    counts = [c.remaining for c in m.per_layer().values()]
    assert (m.remaining() == 1) if scope == "global" else (min(counts) == 1)
    # what is already pruned does not count: 1.0 of nothing left is nothing to do
    none_left = {k: torch.zeros_like(v) for k, v in m.items()}
    assert fn(model, 1.0, none_left, scope=scope) == none_left


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_random(scope):
    model = _net(3)
    masks = prune_magnitude(model, 0.4)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    r1 = prune_random(model, 0.25, masks, scope=scope, generator=g(0))
    assert r1 == prune_random(model, 0.25, masks, scope=scope, generator=g(0))
    assert r1 != prune_random(model, 0.25, masks, scope=scope, generator=g(1))
    assert not bool((r1.flat() & ~masks.flat()).any())
    if scope == "global":
        assert r1.remaining() == masks.remaining() - round(0.25 * masks.remaining())
    else:
        for name, c in r1.per_layer().items():
            before = masks.per_layer()[name].remaining
            assert c.remaining == before - round(0.25 * before)
    # uniform: every unmasked weight is pruned about equally often
    hits = torch.zeros(masks.total())
    for s in range(200):
        hits += (~prune_random(model, 0.25, masks, scope=scope, generator=g(s)).flat()).float()
    live = masks.flat()
    assert float(hits[~live].min()) == 200  # already pruned stay pruned
    rate = hits[live] / 200
    assert abs(float(rate.mean()) - 0.25) < 0.01 and float(rate.std()) < 0.06


def test_prune_random_errors():
    model = _net()
    with pytest.raises(ValueError, match="'fraction'"):
        prune_random(model, 1.5)
    with pytest.raises(TypeError, match="'generator'"):
        prune_random(model, 0.1, generator=3)
