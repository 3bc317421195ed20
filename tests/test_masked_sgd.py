"""The masked SGD op: every backend against a float64 reference, one step at a time, on odd sizes
(0, 1, the Triton block - 1, block, block + 1), misaligned views, every dtype and option, with new
momentum buffers poisoned (NaN) before the kernel writes them; input checks, lr as a tensor, the
cached device tables."""

import pytest
import torch

from fastimp import _backend
from fastimp.ops import masked_sgd as ms

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Relative tolerance per dtype: fp32 within 1e-6, fp64 within 1e-13; low precision: a couple of
# ulps of one rounding.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11,
       torch.float64: 1e-13}

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
    # 0, 1, odd, not a multiple of any block; the C++ kernel also gets several of its chunks,
    # the Triton kernel (block 128 under the interpreter) block - 1, block, block + 1.
    base = [(0,), (1,), (3, 5), (131,), (2, 3, 7)]
    if backend in ("cpu", "cuda"):
        return base + [(16384 * 2 + 3,), (64, 3, 3, 3)]
    if backend == "triton":
        return base + [(127,), (128,), (129,), (300,)]
    return base + [(300,)]


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
    for dt in (torch.int32, torch.complex64):
        with pytest.raises(TypeError, match="params.*float64"):
            ms.masked_sgd_([torch.zeros(2, dtype=dt)], [torch.zeros(2, dtype=dt)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ms.masked_sgd_([torch.zeros(2)], [torch.zeros(2)], lr=torch.ones(2))


def bad_inputs():
    """(name, params, grads, bufs, masks, the argument the error must name)."""
    p = torch.randn(10)
    cases = [
        ("bf16 grad for an fp32 param", [p], [torch.randn(10).bfloat16()], [torch.zeros(10)],
         [None], "grads"),
        ("grad shorter than its param", [p], [torch.randn(9)], [torch.zeros(10)], [None],
         "grads"),
        ("grad on another device", [p], [torch.empty(10, device="meta")], [torch.zeros(10)],
         [None], "grads"),
        ("buffer of another shape", [p], [torch.randn(10)], [torch.zeros(5, 2)], [None],
         "bufs"),
        ("buffer of another dtype", [p], [torch.randn(10)], [torch.zeros(10).double()], [None],
         "bufs"),
        ("float mask", [p], [torch.randn(10)], [torch.zeros(10)], [torch.ones(10)], "masks"),
        ("mask shorter than its param", [p], [torch.randn(10)], [torch.zeros(10)],
         [torch.ones(9, dtype=torch.bool)], "masks"),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(bad_inputs())),
                         ids=[c[0] for c in bad_inputs()])
@pytest.mark.parametrize("backend", available())
def test_every_backend_checks_its_inputs(backend, case):
    name, params, grads, bufs, masks, arg = bad_inputs()[case]
    before = params[0].clone()
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    with pytest.raises(ValueError, match=arg):
        impl(params, grads, bufs, masks, [False], lr=0.1, momentum=0.9, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, decoupled=False)
    assert torch.equal(params[0], before), f"{name}: the param was written"


@pytest.mark.skipif(not _backend.status("masked_sgd", "cpu", "cpu"), reason="no compiled cpu backend")
def test_cpu_kernel_checks_its_arguments():
    from fastimp import _ext
    p, g = torch.zeros(4), torch.zeros(4)
    args = (0.1, None, 0.9, 0.0, 0.0, False, False, False)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", available())
def test_misaligned_views(backend, dtype):
    """Params, grads, buffers and masks that start 1 element into their storage (not 16-byte
    aligned: the Triton kernel's unaligned variant)."""
    kw = dict(OPTIONS[2], lr=0.05)
    gen = torch.Generator().manual_seed(17)
    n = 200
    base = [torch.randn(n + 1, generator=gen).to(dtype) for _ in range(3)]
    p, g, b = (t[1:] for t in base)
    m = (torch.rand(n + 1, generator=gen) > 0.3)[1:]
    assert p.data_ptr() % 16 != 0
    pe, be = ref64(p, g, b, m, False, **kw)
    before = base[0][0].item()
    _backend.resolve("masked_sgd", backend, "cpu")([p], [g], [b], [m], [False], **kw)
    assert_close_scaled(p, pe, dtype, "param")
    assert_close_scaled(b, be, dtype, "buf")
    assert base[0][0].item() == before  # the element before the view is not written


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", available())
def test_lr_tensor_gives_the_float_result(backend, lr_dtype):
    """A one-element lr tensor (read on the device by the triton and cuda kernels) gives the
    result of the same number passed as a float, bit for bit."""
    gen = torch.Generator().manual_seed(8)
    lr_t = torch.tensor(0.0625, dtype=lr_dtype)  # exact in both dtypes
    for dtype in (torch.float32, torch.float64):
        case = make_case([(5,), (131,), (1,)], dtype, 0.9, gen)
        twin = [[None if t is None else t.clone() for t in xs] for xs in case[:4]]
        kw = dict(OPTIONS[4])
        impl = _backend.resolve("masked_sgd", backend, "cpu")
        impl(*case, lr=0.0625, **kw)
        impl(*twin, case[4], lr=lr_t, **kw)
        for a, b in zip(case[0] + case[2], twin[0] + twin[2]):
            assert torch.equal(a, b)


def test_device_tables_are_cached_and_rebuilt_when_tensors_change():
    if not _backend.status("masked_sgd", "triton", "cpu"):
        pytest.skip("no Triton")
    gen = torch.Generator().manual_seed(12)
    params = [torch.randn(s, generator=gen) for s in [(7,), (130,)]]
    masks = [torch.rand(p.shape, generator=gen) > 0.5 for p in params]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref = [p.clone() for p in params]
    start = ms.TABLES.builds

    def step(grads, masks, bufs, rbufs):
        bufs = ms.masked_sgd_(params, grads, bufs, masks, backend="triton", **kw)
        rbufs = ms.masked_sgd_(ref, [g.clone() for g in grads], rbufs, masks, backend="torch",
                               **kw)
        for a, r in zip(params + bufs, ref + rbufs):
            assert torch.allclose(a, r, rtol=1e-6, atol=1e-7)
        return bufs, rbufs

    grads = [torch.randn(p.shape, generator=gen) for p in params]
    bufs, rbufs = step(grads, masks, None, None)  # new buffers (init): one table
    for _ in range(3):  # the same tensors (buffers now old): the same table, reused
        bufs, rbufs = step(grads, masks, bufs, rbufs)
    assert ms.TABLES.builds - start == 1
    grads = [torch.randn(p.shape, generator=gen) for p in params]  # new grad tensors
    bufs, rbufs = step(grads, masks, bufs, rbufs)
    assert ms.TABLES.builds - start == 2
    masks = [masks[0], ~masks[1]]  # a new mask tensor
    bufs, rbufs = step(grads, masks, bufs, rbufs)
    assert ms.TABLES.builds - start == 3
    bufs, rbufs = step(grads, [None, masks[1]], bufs, rbufs)  # a mask removed
    assert ms.TABLES.builds - start == 4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_after_warm_up(backend):
    """One eager step builds the tables; the captured step replays with the lr tensor updated in
    place between replays, and matches eager steps of the reference."""
    if not _backend.status("masked_sgd", backend, "cuda"):
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(5)
    sizes = [(3, 5), (40000,), (1,)]
    params = [torch.randn(s, generator=gen).cuda() for s in sizes]
    grads = [torch.randn(s, generator=gen).cuda() for s in sizes]
    masks = [(torch.rand(s, generator=gen) > 0.3).cuda() for s in sizes]
    ref = [p.clone() for p in params]
    lr = torch.tensor(0.1, device="cuda")
    kw = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    bufs = ms.masked_sgd_(params, grads, None, masks, lr=lr, backend=backend, **kw)
    rbufs = ms.masked_sgd_(ref, grads, None, masks, lr=0.1, backend="torch", **kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ms.masked_sgd_(params, grads, bufs, masks, lr=lr, backend=backend, **kw)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    ms.masked_sgd_(ref, grads, rbufs, masks, lr=0.1, backend="torch", **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ms.masked_sgd_(params, grads, bufs, masks, lr=lr, backend=backend, **kw)
    for value in (0.05, 0.025):
        lr.fill_(value)
        graph.replay()
        ms.masked_sgd_(ref, grads, rbufs, masks, lr=value, backend="torch", **kw)
    torch.cuda.synchronize()
    for a, r in zip(params + bufs, ref + rbufs):
        assert torch.allclose(a, r, rtol=1e-6, atol=1e-6)
    # new tensors during capture: a clear error instead of a host-to-device copy
    other = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match="before CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ms.masked_sgd_(params, other, bufs, masks, lr=lr, backend=backend, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    """One fp16 tensor of 2^31 + 5 elements (about 13 GiB with its grad, buffer and mask),
    checked on samples against the reference."""
    if not _backend.status("masked_sgd", backend, "cuda"):
        pytest.skip(f"{backend} unavailable")
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + n + 4 * 2 ** 30:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    g = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    b = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    m = torch.rand(n, device="cuda", generator=gen) > 0.5
    idx = torch.cat([torch.arange(0, 1000), torch.arange(2 ** 31 - 1000, n),
                     torch.randint(0, n, (10000,), generator=torch.Generator().manual_seed(1))])
    idx = idx.cuda()
    kw = dict(OPTIONS[1], lr=0.05)
    pe, be = ref64(p[idx].cpu(), g[idx].cpu(), b[idx].cpu(), m[idx].cpu(), False, **kw)
    _backend.resolve("masked_sgd", backend, "cuda")([p], [g], [b], [m], [False], **kw)
    assert_close_scaled(p[idx].cpu(), pe, torch.float16, "param")
    assert_close_scaled(b[idx].cpu(), be, torch.float16, "buf")


def views_at_the_same_addresses():
    """(name, make(p, g, b, m) -> the bad (params, grads, bufs, masks), the argument named):
    tensors that share the addresses of a valid call's tensors but not their dtype or shape."""
    return [
        ("grad: a shorter view", lambda p, g, b, m: ([p], [g[:9]], [b], [m]), "grads"),
        ("grad: an int32 view", lambda p, g, b, m: ([p], [g.view(torch.int32)], [b], [m]),
         "grads"),
        ("grad: another shape", lambda p, g, b, m: ([p], [g.view(2, 5)], [b], [m]), "grads"),
        ("buffer: an int32 view", lambda p, g, b, m: ([p], [g], [b.view(torch.int32)], [m]),
         "bufs"),
        ("buffer: a shorter view", lambda p, g, b, m: ([p], [g], [b[:3]], [m]), "bufs"),
        ("mask: an int8 view", lambda p, g, b, m: ([p], [g], [b], [m.view(torch.int8)]),
         "masks"),
        ("mask: a shorter view", lambda p, g, b, m: ([p], [g], [b], [m[:9]]), "masks"),
        ("param: a shorter view", lambda p, g, b, m: ([p[:9]], [g], [b], [m]), "grads"),
    ]


@pytest.mark.parametrize("case", range(len(views_at_the_same_addresses())),
                         ids=[c[0] for c in views_at_the_same_addresses()])
@pytest.mark.parametrize("backend", available())
def test_checks_run_on_every_call_not_only_the_first(backend, case):
    """A valid call (which caches the ``cuda``/``triton`` device table), then a bad call over
    tensors at the same addresses: the same error as a first call, and nothing written."""
    name, make, arg = views_at_the_same_addresses()[case]
    gen = torch.Generator().manual_seed(31)
    p, g, b = (torch.randn(10, generator=gen) for _ in range(3))
    m = torch.rand(10, generator=gen) > 0.3
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, decoupled=False)
    impl([p], [g], [b], [m], [False], **kw)  # valid: builds (and caches) the table
    errors = []
    for attempt in range(2):  # a bad call after a valid one, twice (the second after a miss)
        before = [t.clone() for t in (p, g, b, m)]
        with pytest.raises((ValueError, TypeError), match=arg) as err:
            impl(*make(p, g, b, m), [False], **kw)
        errors.append(err.type)
        assert all(torch.equal(x, y) for x, y in zip((p, g, b, m), before)), f"{name}: written"
    for first in available():  # a first call's error, in every backend
        fresh = torch.randn(10), torch.randn(10), torch.randn(10), torch.rand(10) > 0.3
        with pytest.raises((ValueError, TypeError), match=arg) as err:
            _backend.resolve("masked_sgd", first, "cpu")(*make(*fresh), [False], **kw)
        assert errors == [err.type, err.type], f"{name}: {backend} and {first} disagree"


@pytest.mark.parametrize("backend", available())
def test_a_mask_at_the_same_address_with_other_strides(backend):
    """After a call with a channels_last mask, a mask over the same memory with contiguous
    strides (another logical mask) is read as itself, not as the cached one."""
    torch.manual_seed(0)
    shape = (2, 3, 4, 5)
    p0 = torch.randn(shape).to(memory_format=torch.channels_last)
    g = torch.randn(shape).to(memory_format=torch.channels_last)
    m = (torch.rand(shape) > 0.5).to(memory_format=torch.channels_last)
    m2 = torch.as_strided(m, shape, torch.empty(shape).stride())
    assert m2.data_ptr() == m.data_ptr() and not torch.equal(m2, m)
    kw = dict(lr=0.5, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, decoupled=False)
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    p = p0.clone(memory_format=torch.channels_last)
    impl([p], [g], [None], [m], [False], **kw)
    p.copy_(p0)
    impl([p], [g], [None], [m2], [False], **kw)
    pe, _ = ref64(p0, g, None, m2, False, **kw)
    assert_close_scaled(p, pe, torch.float32, "param")


def overlapping_arguments():
    """(name, make(p, g, b, m) -> (params, grads, bufs, masks), the arguments named)."""
    return [
        ("grad as its own momentum buffer", lambda p, g, b, m: ([p], [g], [g], [m]),
         "'grads' and 'bufs'"),
        ("param as its grad", lambda p, g, b, m: ([p], [p], [b], [m]), "'params' and 'grads'"),
        ("param as its buffer", lambda p, g, b, m: ([p], [g], [p], [m]), "'params' and 'bufs'"),
        ("mask over the param's bytes",
         lambda p, g, b, m: ([p], [g], [b], [p.view(torch.uint8)[:p.numel()]]),
         "'params' and 'masks'"),
        ("buffer overlapping its grad by one element",
         lambda p, g, b, m: ([p[1:]], [b[:-1]], [b[1:]], [m[1:]]), "'grads' and 'bufs'"),
    ]


@pytest.mark.parametrize("case", range(len(overlapping_arguments())),
                         ids=[c[0] for c in overlapping_arguments()])
@pytest.mark.parametrize("backend", available())
def test_overlapping_arguments_are_refused(backend, case):
    """A param or buffer (written) sharing memory with its grad, buffer or mask: the result
    would depend on the backend's order of reads and writes, so every backend refuses it."""
    name, make, names = overlapping_arguments()[case]
    gen = torch.Generator().manual_seed(32)
    p, g, b = (torch.randn(10, generator=gen) for _ in range(3))
    m = torch.rand(10, generator=gen) > 0.3
    before = [t.clone() for t in (p, g, b, m)]
    impl = _backend.resolve("masked_sgd", backend, "cpu")
    with pytest.raises(ValueError, match=f"{names}.*overlap in memory"):
        impl(*make(p, g, b, m), [False], lr=0.1, momentum=0.9, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, decoupled=False)
    assert all(torch.equal(x, y) for x, y in zip((p, g, b, m), before)), f"{name}: written"
    with pytest.raises(ValueError, match=f"{names}.*overlap in memory"):  # the public op too
        ms.masked_sgd_(*make(p, g, b, m), lr=0.1, momentum=0.9, backend=backend)
