"""Global magnitude threshold (every backend vs the reference and a brute-force oracle),
prune_magnitude vs torch.nn.utils.prune, prune_random, and the errors."""
import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastimp
from fastimp import _backend
from fastimp.masks import Masks
from fastimp.ops.magnitude_threshold import magnitude_threshold, reference
from fastimp.pruning import prune_magnitude, prune_random

BACKENDS = ["torch", "cpu", "triton"]


def _need(backend):
    st = _backend.status("magnitude_threshold", backend, "cpu")
    if not st:
        if backend == "cpu" and os.environ.get("FASTIMP_REQUIRE_EXT") == "1":
            pytest.fail(f"cpu backend missing: {st.reason}")
        pytest.skip(st.reason)


def _oracle(weights, masks, k):
    """Brute force: sort (|w| in float64, tensor, flat index) over the unmasked positions."""
    items = []
    for t, w in enumerate(weights):
        a = w.detach().abs().double().reshape(-1).tolist()
        m = None if masks is None else masks[t].reshape(-1).tolist()
        items += [(v, t, i) for i, v in enumerate(a) if m is None or m[i]]
    items.sort()
    pruned = {(t, i) for _, t, i in items[:k]}
    out = []
    for t, w in enumerate(weights):
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        m = None if masks is None else masks[t].reshape(-1)
        for i in range(w.numel()):
            keep[i] = (m is None or bool(m[i])) and (t, i) not in pruned
        out.append(keep.reshape(w.shape))
    return out, len(items), (items[k - 1][0] if k > 0 else float("-inf"))


def _poisoned(weights):
    out = [torch.empty(w.shape, dtype=torch.bool) for w in weights]
    for o in out:
        o.view(torch.uint8).fill_(7)
    return out


SHAPES = [(0,), (1,), (3, 5), (129,), (4, 3, 3, 3), (2, 3, 1, 1, 1), (257,)]


def _check(backend, weights, masks, k=None, fraction=None):
    out = _poisoned(weights)
    sel = magnitude_threshold(weights, masks, k, fraction=fraction, out=out, backend=backend)
    n_expect = sum(int(m.sum()) for m in masks) if masks is not None else sum(
        w.numel() for w in weights)
    k_expect = k if k is not None else round(fraction * n_expect)
    want, n, thr = _oracle(weights, masks, k_expect)
    assert (sel.n, sel.k) == (n, k_expect)
    assert sel.threshold == thr
    for o, w in zip(out, want):
        assert set(o.view(torch.uint8).unique().tolist()) <= {0, 1}
        assert torch.equal(o, w)
    assert sum(int(o.sum()) for o in out) == n - k_expect
    return sel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("fraction", [0.0, 1e-3, 0.02, 0.2, 0.5, 0.97, 0.999])
def test_random_weights_vs_oracle(backend, sparse, fraction):
    _need(backend)
    g = torch.Generator().manual_seed(int(fraction * 1000) + 7 * sparse)
    weights = [torch.randn(s, generator=g) * (0.1 + i) for i, s in enumerate(SHAPES)]
    masks = [torch.rand(s, generator=g) < 0.6 for s in SHAPES] if sparse else None
    _check(backend, weights, masks, fraction=fraction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_k_every_count(backend):
    _need(backend)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=g) for s in [(5,), (0,), (2, 3)]]
    masks = [torch.rand(w.shape, generator=g) < 0.7 for w in weights]
    n = sum(int(m.sum()) for m in masks)
    for k in range(n + 1):
        _check(backend, weights, masks, k=k)
    with pytest.raises(ValueError, match="'k'"):
        magnitude_threshold(weights, masks, n + 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["all_equal", "quantized", "signed_zeros"])
def test_ties_broken_by_position(backend, kind):
    _need(backend)
    g = torch.Generator().manual_seed(11)
    shapes = [(7,), (3, 11), (1,), (130,)]
    if kind == "all_equal":
        weights = [torch.full(s, -0.375) for s in shapes]
    elif kind == "quantized":
        weights = [torch.randint(-3, 4, s, generator=g).float() * 0.25 for s in shapes]
    else:
        weights = [torch.where(torch.rand(s, generator=g) < 0.5, torch.tensor(0.0),
                               torch.tensor(-0.0)) for s in shapes]
        weights[2] = torch.tensor([1.0])
    masks = [torch.rand(s, generator=g) < 0.8 for s in shapes]
    n = sum(int(m.sum()) for m in masks)
    for k in [1, 2, n // 3, n // 2 + 1, n - 1]:
        _check(backend, weights, masks, k=k)
        _check(backend, weights, None, k=k)


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("ties", [False, True])
def test_large_tensors_many_chunks_vs_reference(backend, ties):
    """Tensors spanning several of the C++ kernel's 65536-element chunks (ties ranked across
    chunks and threads); the reference itself is checked against the oracle above."""
    _need(backend)
    g = torch.Generator().manual_seed(21)
    shapes = [(70001,), (3,), (2, 100003)]
    if ties:
        weights = [torch.randint(-6, 7, s, generator=g).float() for s in shapes]
    else:
        weights = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < 0.7 for s in shapes]
    for fraction in (0.01, 0.3, 0.77):
        want = magnitude_threshold(weights, masks, fraction=fraction, backend="torch")
        out = _poisoned(weights)
        got = magnitude_threshold(weights, masks, fraction=fraction, out=out, backend=backend)
        assert (got.n, got.k, got.threshold) == (want.n, want.k, want.threshold)
        assert all(torch.equal(a, b) for a, b in zip(out, want.masks))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(backend, dtype):
    _need(backend)
    g = torch.Generator().manual_seed(5)
    weights = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in SHAPES]
    masks = [torch.rand(s, generator=g) < 0.9 for s in SHAPES]
    for fraction in (0.1, 0.6):
        _check(backend, weights, masks, fraction=fraction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_tiny_values(backend):
    _need(backend)
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(40, generator=g) * 1e-38,  # subnormal float32
               torch.randn(33, generator=g).half(), torch.randn(17, generator=g).bfloat16(),
               torch.tensor([3e38, -3e38, 0.0])]
    for fraction in (0.05, 0.5, 0.95):
        _check(backend, weights, None, fraction=fraction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_weights_rejected(backend):
    _need(backend)
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = [torch.randn(10), torch.randn(5)]
        w[1][3] = bad
        with pytest.raises(ValueError, match="NaN or inf.*tensor 1"):
            magnitude_threshold(w, None, fraction=0.5, backend=backend)
        masks = [torch.ones(10, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
        masks[1][3] = False  # a masked NaN is ignored
        _check(backend, [w[0], torch.where(masks[1], w[1], torch.tensor(0.0))], masks,
               fraction=0.5)
        sel = magnitude_threshold(w, masks, fraction=0.5, backend=backend)
        assert sel.n == 14 and not bool(sel.masks[1][3])


def test_reference_is_poison_proof_and_float64_exact():
    a = torch.tensor([1.0, 1.0 + 2 ** -40, 1.0 - 2 ** -40], dtype=torch.float64)
    out = [torch.ones(3, dtype=torch.bool)]
    n, k, thr, bad = reference([a], None, out, 1, 0.0)
    assert (n, k, bad) == (3, 1, 0) and thr == 1.0 - 2 ** -40
    assert out[0].tolist() == [True, True, False]


def test_op_argument_errors():
    w = [torch.randn(4)]
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_threshold(w, None)
    with pytest.raises(ValueError, match="'fraction'"):
        magnitude_threshold(w, None, fraction=1.0)
    with pytest.raises(ValueError, match="'k'"):
        magnitude_threshold(w, None, -1)
    with pytest.raises(ValueError, match="'masks'"):
        magnitude_threshold(w, [torch.ones(5, dtype=torch.bool)], 1)
    with pytest.raises(ValueError, match="'masks'"):
        magnitude_threshold(w, [torch.ones(4)], 1)
    with pytest.raises(TypeError, match="'weights'"):
        magnitude_threshold([torch.arange(4)], None, 1)
    with pytest.raises(ValueError, match="'out'"):
        magnitude_threshold(w, None, 1, out=[torch.ones(4)])


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_vs_cpu_reference(backend, dtype):
    st = _backend.status("magnitude_threshold", backend, "cuda")
    if not st:
        pytest.skip(st.reason)
    g = torch.Generator().manual_seed(31)
    shapes = SHAPES + [(70001,), (3, 100003)]
    for ties in (False, True):
        if ties:
            weights = [torch.randint(-6, 7, s, generator=g).to(dtype) for s in shapes]
        else:
            weights = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        masks = [torch.rand(s, generator=g) < 0.7 for s in shapes]
        for fraction in (0.0, 0.01, 0.3, 0.999):
            want = magnitude_threshold(weights, masks, fraction=fraction, backend="torch")
            out = [torch.empty(s, dtype=torch.bool, device="cuda") for s in shapes]
            got = magnitude_threshold([w.cuda() for w in weights], [m.cuda() for m in masks],
                                      fraction=fraction, out=out, backend=backend)
            assert (got.n, got.k, got.threshold) == (want.n, want.k, want.threshold)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(out, want.masks))
