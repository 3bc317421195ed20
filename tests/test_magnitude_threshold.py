"""The global magnitude threshold op: every backend against the reference and a brute-force
oracle (poisoned outputs, ties, dtypes, non-finite weights), the typed backend contract, errors."""

import pytest
import torch

from conftest import need_backend
from fastimp import _backend
from fastimp.ops.magnitude_threshold import Threshold, magnitude_threshold, reference

BACKENDS = ["torch", "cpu", "triton"]


def _need(backend):
    need_backend("magnitude_threshold", backend)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_contract_is_typed_and_has_no_sentinel(backend):
    """impl(weights, masks, out, k, fraction) -> Threshold; k None means round(fraction * n)."""
    _need(backend)
    impl = _backend.resolve("magnitude_threshold", backend, "cpu")
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(s, generator=g) for s in [(127,), (128,), (129,)]]  # Triton block +-1
    for k, fraction in ((None, 0.3), (0, 0.9), (50, 0.0), (384, 0.0)):
        out = _poisoned(weights)
        res = impl(weights, None, out, k, fraction)
        assert isinstance(res, Threshold)
        want_k = round(fraction * 384) if k is None else k
        want, n, thr = _oracle(weights, None, want_k)
        assert res == Threshold(n, want_k, thr, 0)
        assert all(torch.equal(o, w) for o, w in zip(out, want))


def test_triton_histogram_memory_order_is_a_choice():
    _need("triton")
    from fastimp.kernels.magnitude_threshold import magnitude_threshold_triton
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(300, generator=g)]
    results = []
    for sem in ("relaxed", "acq_rel"):
        out = _poisoned(weights)
        results.append((magnitude_threshold_triton(weights, None, out, None, 0.4, sem=sem), out))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1][0], results[1][1][0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_refuse_2_pow_31_weights(backend):
    st = _backend.status("magnitude_threshold", backend, "cuda")
    if not st:
        pytest.skip(st.reason)
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    w = [torch.empty(2 ** 31, dtype=torch.float16, device="cuda").normal_()]
    with pytest.raises(ValueError, match="2\\^31"):
        magnitude_threshold(w, None, fraction=0.5, backend=backend)


def test_auto_hands_more_weights_than_the_kernels_count_to_an_unlimited_backend(monkeypatch):
    """Above KERNEL_MAX_WEIGHTS (2^31 - 1: the Triton and CUDA kernels count in 32 bits), "auto"
    skips those two in its order instead of failing (here on the CPU, with Triton put first and
    the limit lowered)."""
    import fastimp.ops.magnitude_threshold as mt
    op = mt._OP
    monkeypatch.setitem(op.auto, "cpu", ("triton", "cuda", "cpu", "torch"))
    calls = []
    for name in ("triton", "cuda"):
        monkeypatch.setitem(op.impls, name,
                            lambda *a, _n=name: calls.append(_n) or mt.reference(*a))
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(7, 5, generator=gen), torch.randn(30, generator=gen)]
    want = magnitude_threshold(weights, None, fraction=0.4, backend="torch")
    monkeypatch.setattr(mt, "KERNEL_MAX_WEIGHTS", 64)
    got = magnitude_threshold(weights, None, fraction=0.4, out=_poisoned(weights))
    assert calls == [] and (got.n, got.k, got.threshold) == (want.n, want.k, want.threshold)
    assert all(torch.equal(a, b) for a, b in zip(got.masks, want.masks))
    monkeypatch.setattr(mt, "KERNEL_MAX_WEIGHTS", 65)  # 65 weights: the order's first again
    first = [b for b in ("triton", "cuda") if _backend.status("magnitude_threshold", b, "cpu")]
    got = magnitude_threshold(weights, None, fraction=0.4)
    assert calls == first[:1] and got.threshold == want.threshold


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the reference
def test_out_may_be_the_masks(backend, dtype):
    """out=masks prunes in place (every backend, also where float64 falls back to the
    reference), with the result of separate outputs."""
    _need(backend)
    gen = torch.Generator().manual_seed(40)
    ws = [torch.randn(s, generator=gen, dtype=dtype) for s in [(500,), (20, 30), (1,)]]
    masks = [torch.rand(w.shape, generator=gen) > 0.3 for w in ws]
    want = magnitude_threshold(ws, masks, fraction=0.3, backend=backend)
    inplace = [m.clone() for m in masks]
    got = magnitude_threshold(ws, inplace, fraction=0.3, out=inplace, backend=backend)
    assert all(o is m for o, m in zip(got.masks, inplace))
    assert (got.n, got.k, got.threshold) == (want.n, want.k, want.threshold)
    for a, b in zip(got.masks, want.masks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_overlaps_of_out_are_refused(backend):
    _need(backend)
    gen = torch.Generator().manual_seed(41)
    ws = [torch.randn(300, generator=gen), torch.randn(300, generator=gen)]
    masks = [torch.rand(300, generator=gen) > 0.3 for _ in ws]
    out = [torch.empty(300, dtype=torch.bool) for _ in ws]
    shifted = torch.rand(301, generator=gen) > 0.3  # mask 0 and an output one element on
    cases = [
        ("out.*tensors 0 and 1", masks, [out[0], out[0]]),  # one output twice
        ("masks.*out.*tensor 1 of 'masks' and tensor 0 of 'out'", masks, [masks[1], out[1]]),
        ("weights.*out", masks, [ws[0].view(torch.bool)[:300], out[1]]),  # bytes of a weight
        ("masks.*out.*tensor 0 of each", [shifted[:300], masks[1]], [shifted[1:], out[1]]),
    ]
    for match, ms, o in cases:
        before = [m.clone() for m in masks] + [w.clone() for w in ws]
        with pytest.raises(ValueError, match=match):
            magnitude_threshold(ws, ms, fraction=0.3, out=o, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(masks + ws, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views(backend, dtype):
    """Weights, masks and outputs as views one element into their storage (not 16-byte
    aligned); the element before each output is not written."""
    _need(backend)
    gen = torch.Generator().manual_seed(42)
    sizes = [1, 127, 129, 300]
    ws = [torch.randn(n + 1, generator=gen).to(dtype)[1:] for n in sizes]
    masks = [(torch.rand(n + 1, generator=gen) > 0.3)[1:] for n in sizes]
    stores = [torch.full((n + 1,), True) for n in sizes]
    out = [s[1:] for s in stores]
    assert all(t.data_ptr() % 16 for t in ws + masks + out)
    for t in out:
        t.view(torch.uint8).fill_(7)
    sel = magnitude_threshold(ws, masks, fraction=0.3, out=out, backend=backend)
    want, n, thr = _oracle(ws, masks, round(0.3 * sum(int(m.sum()) for m in masks)))
    assert (sel.n, sel.threshold) == (n, thr)
    for o, w, s in zip(out, want, stores):
        assert torch.equal(o, w) and bool(s[0])
