"""The masked SGD op: every backend against a float64 reference, one step at a time, on odd sizes,
every dtype and option, with new momentum buffers poisoned (NaN) before the kernel writes them."""
import itertools
import math

import pytest
import torch

from fastimp import _backend
from fastimp.ops import masked_sgd as ms

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance per dtype: fp32 within 1e-6; low precision: a couple of ulps of one rounding.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11}

OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, decoupled=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False, decoupled=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False, decoupled=False),
    dict(momentum=0.875, dampening=0.25, weight_decay=1e-2, nesterov=False, maximize=True, decoupled=False),
    dict(momentum=0.875, dampening=0.0, weight_decay=5e-2, nesterov=True, maximize=False, decoupled=True),
    dict(momentum=0.0, dampening=0.0, weight_decay=5e-2, nesterov=False, maximize=True, decoupled=True),
]


def available(device="cpu"):
    return [b for b in ("torch", "cpu", "cuda", "triton")
            if _backend.status("masked_sgd", b, torch.device(device).type)]


def sizes_for(backend):
    # 0, 1, odd, not a multiple of any block; the C++ kernel also gets several of its chunks.
    base = [(0,), (1,), (3, 5), (131,), (2, 3, 7)]
    return base + ([(16384 * 2 + 3,), (64, 3, 3, 3)] if backend in ("cpu", "cuda") else [(300,)])


def ref64(p, g, b, m, first, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
          decoupled):
    """Independent float64 statement of the formula in fastimp.ops.masked_sgd."""
    p, g = p.double(), g.double()
    d = -g if maximize else g
    if weight_decay and not decoupled:
        d = d + weight_decay * p
    bn = None
    if momentum:
        bn = d.clone() if first else momentum * b.double() + (1 - dampening) * d
        d = d + momentum * bn if nesterov else bn
    if weight_decay and decoupled:
        p = (1 - lr * weight_decay) * p
    p = p - lr * d
    if m is not None:
        p = torch.where(m.bool(), p, torch.zeros_like(p))
        bn = None if bn is None else torch.where(m.bool(), bn, torch.zeros_like(bn))
    return p, bn


def assert_close_scaled(out, ref, dtype, what):
    if out.numel() == 0:
        return
    tol = TOL[dtype]
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs()
    bound = tol * ref.abs() + tol * scale + 1e-30
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert bool((err <= bound).all()), (
        f"{what}: max abs err {err.max().item():.3g} (scale {scale:.3g}, tol {tol:.1g})")


def make_case(sizes, dtype, momentum, gen, with_masks=True):
    params, grads, bufs, masks, init = [], [], [], [], []
    for k, s in enumerate(sizes):
        params.append(torch.randn(s, generator=gen).to(dtype))
        grads.append(torch.randn(s, generator=gen).to(dtype))
        first = momentum != 0 and k % 2 == 0
        init.append(first)
        if momentum == 0:
            bufs.append(None)
        elif first:
            bufs.append(torch.full(s, float("nan"), dtype=dtype))  # poisoned: must be overwritten
        else:
            bufs.append(torch.randn(s, generator=gen).to(dtype))
        masks.append((torch.rand(s, generator=gen) > 0.3) if with_masks and k % 3 != 1 else None)
    return params, grads, bufs, masks, init


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("backend", available())
def test_backend_matches_float64_reference(backend, opt, dtype):
    kw = dict(OPTIONS[opt], lr=0.05)
    gen = torch.Generator().manual_seed(1000 * opt + DTYPES.index(dtype))
    params, grads, bufs, masks, init = make_case(sizes_for(backend), dtype, kw["momentum"], gen)
    expected = [ref64(p, g, b, m, f, **kw) for p, g, b, m, f in zip(params, grads, bufs, masks, init)]
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    impl(params, grads, bufs, masks, init, **kw)
    for i, (p, (pe, be)) in enumerate(zip(params, expected)):
        assert_close_scaled(p, pe, dtype, f"param {i} {tuple(p.shape)}")
        if be is not None:
            assert_close_scaled(bufs[i], be, dtype, f"buf {i} {tuple(p.shape)}")
        if masks[i] is not None:
            assert bool((p[~masks[i]] == 0).all())
            if bufs[i] is not None:
                assert bool((bufs[i][~masks[i]] == 0).all())


@pytest.mark.parametrize("backend", available())
def test_masked_coordinates_exactly_zero_even_if_nonfinite(backend):
    p = torch.randn(37)
    g = torch.randn(37)
    m = torch.rand(37) > 0.5
    m[0], m[1] = False, True
    p[0], g[0] = float("inf"), float("nan")  # a masked coordinate holding garbage
    b = torch.randn(37)
    b[0] = float("nan")
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    impl([p], [g], [b], [m], [False], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3,
         nesterov=False, maximize=False, decoupled=False)
    assert bool((p[~m] == 0).all()) and bool((b[~m] == 0).all())
    assert torch.isfinite(p[m]).all() and torch.isfinite(b[m]).all()


@pytest.mark.parametrize("backend", available())
def test_entry_point_groups_devices_and_dtypes_and_creates_buffers(backend):
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    sizes = [(5,), (0,), (1,), (9, 2), (17,)]
    params = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(sizes, dtypes)]
    grads = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(sizes, dtypes)]
    masks = [torch.rand(s, generator=gen) > 0.5 if i % 2 else None for i, s in enumerate(sizes)]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False,
              maximize=False, decoupled=False)
    expected = [ref64(p, g, None, m, True, **kw) for p, g, m in zip(params, grads, masks)]
    bufs = ms.masked_sgd_(params, grads, None, masks, backend=backend, **kw)
    for p, b, (pe, be), dt in zip(params, bufs, expected, dtypes):
        assert b is not None and b.dtype == dt and b.shape == p.shape
        assert_close_scaled(p, pe, dt, "param")
        assert_close_scaled(b, be, dt, "buf")


def test_entry_point_without_momentum_returns_no_buffers():
    p, g = torch.randn(4), torch.randn(4)
    assert ms.masked_sgd_([p], [g], lr=0.1) == [None]


def test_entry_point_rejects_bad_lists_and_dtypes():
    with pytest.raises(ValueError, match="grads"):
        ms.masked_sgd_([torch.zeros(2)], [], lr=0.1)
    with pytest.raises(ValueError, match="masks"):
        ms.masked_sgd_([torch.zeros(2)], [torch.zeros(2)], None, [None, None], lr=0.1)
    with pytest.raises(TypeError, match="float32"):
        ms.masked_sgd_([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)],
                       lr=0.1)


@pytest.mark.skipif(not _backend.status("masked_sgd", "cpu", "cpu"), reason="no compiled cpu backend")
def test_cpu_kernel_checks_its_arguments():
    from fastimp import _ext
    p, g = torch.zeros(4), torch.zeros(4)
    args = (0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match="bufs"):
        _ext._C.masked_sgd_cpu([p], [g], [None], [None], [False], *args)
    with pytest.raises(ValueError, match="grads"):
        _ext._C.masked_sgd_cpu([p], [torch.zeros(5)], [torch.zeros(4)], [None], [False], *args)
    with pytest.raises(ValueError, match="masks"):
        _ext._C.masked_sgd_cpu([p], [g], [torch.zeros(4)], [torch.zeros(4)], [False], *args)


@pytest.mark.skipif(not _backend.status("masked_sgd", "cpu", "cpu"), reason="no compiled cpu backend")
def test_non_dense_layouts_fall_back_to_the_reference():
    # A mask in another memory format than its (channels_last) param: still correct.
    p = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    m = torch.rand(2, 3, 5, 5) > 0.5  # contiguous
    kw = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, decoupled=False)
    pe, _ = ref64(p, g, None, m, True, **kw)
    ms.masked_sgd_([p], [g], None, [m], backend="cpu", **kw)
    assert_close_scaled(p, pe, torch.float32, "channels_last param")


def test_auto_order_prefers_compiled_cpu_kernel():
    name = _backend.resolve_name("masked_sgd", "auto", "cpu")
    assert name == ("cpu" if _backend.status("masked_sgd", "cpu", "cpu") else "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backends_match_reference(dtype):
    for backend in ("cuda", "triton"):
        if not _backend.status("masked_sgd", backend, "cuda"):
            continue
        for opt in range(len(OPTIONS)):
            kw = dict(OPTIONS[opt], lr=0.05)
            gen = torch.Generator().manual_seed(opt)
            sizes = [(0,), (1,), (3, 5), (131,), (40000,), (70000, 3), (64, 3, 3, 3)]
            case = make_case(sizes, dtype, kw["momentum"], gen)
            expected = [ref64(p, g, b, m, f, **kw) for p, g, b, m, f in zip(*case)]
            dev = [[None if t is None else t.cuda() for t in xs] for xs in case[:4]]
            _backend.resolve("masked_sgd", backend, "cuda")(*dev, case[4], **kw)
            for i, (pe, be) in enumerate(expected):
                assert_close_scaled(dev[0][i].cpu(), pe, dtype, f"{backend} param {i}")
                if be is not None:
                    assert_close_scaled(dev[2][i].cpu(), be, dtype, f"{backend} buf {i}")


@pytest.mark.parametrize("backend", available())
def test_size_one_dims_may_carry_any_stride(backend):
    p = torch.randn(1, 5)
    g = torch.empty_strided((1, 5), (1, 1)).copy_(torch.randn(1, 5))  # contiguous, other stride
    m = torch.tensor([[True, False, True, True, False]])
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, decoupled=False)
    pe, be = ref64(p, g, None, m, True, **kw)
    bufs = ms.masked_sgd_([p], [g], None, [m], backend=backend, **kw)
    assert_close_scaled(p, pe, torch.float32, "param")
    assert_close_scaled(bufs[0], be, torch.float32, "buf")
