"""fastimp.ops.weight_points: every backend against the float64 reference."""
import pytest
import torch

from fastimp._backend import status
from fastimp.ops.weight_points import reference, weight_points

BACKENDS = ["torch", "cpu", "triton"]


def _available(backend, device="cpu"):
    st = status("weight_points", backend, device)
    if not st:
        pytest.skip(f"{backend}: {st.reason}")


def _case(K, J, D, dtype, seed, device="cpu", clip_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    origin = torch.randn(D, generator=g, dtype=torch.float64)
    U = torch.randn(J, D, generator=g, dtype=torch.float64)
    C = torch.randn(K, J, generator=g, dtype=torch.float64) * 1.5
    clip = torch.rand(D, generator=g) < clip_frac
    lo = -torch.rand(J, generator=g, dtype=torch.float64)
    hi = torch.rand(J, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (origin, U, C, clip, lo, hi)], dtype


def _ref64(origin, U, C, clip, lo, hi):
    out = torch.empty(C.shape[0], origin.numel(), dtype=torch.float64)
    reference(origin.cpu(), U.cpu(), C.cpu(), clip.cpu(), lo.cpu(), hi.cpu(), out)
    return out


def _explicit(origin, U, C, clip, lo, hi):
    """The formula written out per coordinate (independent of the reference's vectorization)."""
    K, J = C.shape
    out = origin.expand(K, -1).clone()
    for k in range(K):
        for j in range(J):
            c = float(C[k, j])
            cc = min(max(c, float(lo[j])), float(hi[j]))
            out[k] += torch.where(clip, torch.full_like(origin, cc), torch.full_like(origin, c)) * U[j]
    return out


SHAPES = [(0, 2, 5), (3, 2, 0), (1, 1, 1), (4, 0, 7), (5, 2, 1029), (2, 3, 2048 + 17), (9, 1, 333)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, dtype, shape):
    _available(backend)
    K, J, D = shape
    if backend == "triton" and K * D > 20000:
        pytest.skip("keep the Triton interpreter small")
    (origin, U, C, clip, lo, hi), _ = _case(K, J, D, dtype, seed=K * 1000 + J * 100 + D)
    expected = _ref64(origin, U, C, clip, lo, hi)
    out = torch.full((K, D), float("nan"), dtype=dtype)
    got = weight_points(origin.to(dtype), U.to(dtype), C.to(dtype), clip=clip, lo=lo.to(dtype),
                        hi=hi.to(dtype), out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    scale = origin.abs() + C.abs().sum(1, keepdim=True) @ U.abs().max(0, keepdim=True).values \
        if J else origin.abs().expand(K, -1)
    tol = (1e-6 if dtype == torch.float32 else 1e-13) * (scale + 1e-30)
    assert ((out.double() - expected).abs() <= tol).all()


def test_reference_is_the_formula():
    (origin, U, C, clip, lo, hi), _ = _case(4, 3, 50, torch.float64, seed=7, clip_frac=0.5)
    assert torch.allclose(_ref64(origin, U, C, clip, lo, hi), _explicit(origin, U, C, clip, lo, hi),
                          rtol=0, atol=1e-12)


def test_clipping_keeps_nonprunable_in_the_hull():
    """A path a + beta (b - a): clipped coordinates stay at a (beta < 0) or b (beta > 1)."""
    a, b = torch.randn(10), torch.randn(10)
    clip = torch.arange(10) < 4
    betas = torch.tensor([[-0.5], [0.3], [1.5]])
    out = weight_points(a, (b - a)[None], betas, clip=clip, lo=[0.0], hi=[1.0], backend="torch")
    assert torch.allclose(out[0, :4], a[:4]) and torch.allclose(out[2, :4], b[:4])
    assert torch.allclose(out[1], a + 0.3 * (b - a))
    assert torch.allclose(out[0, 4:], a[4:] - 0.5 * (b - a)[4:])
    assert torch.allclose(out[2, 4:], a[4:] + 1.5 * (b - a)[4:])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_default_is_unclipped_and_deterministic(backend):
    _available(backend)
    (origin, U, C, _, _, _), _ = _case(3, 2, 100, torch.float32, seed=3)
    o, U, C = origin.float(), U.float(), C.float()
    r1 = weight_points(o, U, C, backend=backend)
    r2 = weight_points(o, U, C, backend=backend)
    assert torch.equal(r1, r2)
    assert torch.allclose(r1.double(), o.double() + C.double() @ U.double(), rtol=0, atol=1e-5)


def test_bad_input():
    o, U, C = torch.randn(5), torch.randn(2, 5), torch.randn(3, 2)
    with pytest.raises(ValueError, match="directions"):
        weight_points(o, torch.randn(2, 4), C)
    with pytest.raises(ValueError, match="coeffs"):
        weight_points(o, U, torch.randn(3, 3))
    with pytest.raises(TypeError, match="origin"):
        weight_points(o.int(), U, C)
    with pytest.raises(TypeError, match="coeffs"):
        weight_points(o, U, C.double())
    with pytest.raises(ValueError, match="clip"):
        weight_points(o, U, C, clip=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="out"):
        weight_points(o, U, C, out=torch.empty(3, 4))
    with pytest.raises(ValueError, match="lo"):
        weight_points(o, U, C, lo=[1.0, 0.0], hi=[0.0, 1.0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_matches_reference(backend):
    (origin, U, C, clip, lo, hi), _ = _case(7, 2, 5000, torch.float32, seed=11)
    expected = _ref64(origin, U, C, clip, lo, hi)
    dev = "cuda"
    out = torch.full((7, 5000), float("nan"), device=dev)
    weight_points(origin.float().to(dev), U.float().to(dev), C.float().to(dev), clip=clip.to(dev),
                  lo=lo.float().to(dev), hi=hi.float().to(dev), out=out, backend=backend)
    assert torch.allclose(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_triton_grid_puts_coordinate_blocks_on_axis_0():
    """Axis 1 holds at most 65,535 programs: the 2^27 coordinates of a large model go on axis 0,
    and more than 65,535 points are split over launches."""
    from fastimp.kernels.weight_points import MAX_GRID_Y, grid
    (k0, kn, g), = grid(7, 2 ** 27, 1024)
    assert (k0, kn) == (0, 7) and g == (2 ** 17, 7)
    launches = grid(2 * MAX_GRID_Y + 3, 10, 1024)
    assert [(k0, kn) for k0, kn, _ in launches] == [(0, MAX_GRID_Y), (MAX_GRID_Y, MAX_GRID_Y),
                                                    (2 * MAX_GRID_Y, 3)]
    assert all(g[1] <= MAX_GRID_Y for _, _, g in launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_points_split_over_launches(dtype):
    """K points in launches of max_k (row slices of coeffs and out, not 16-byte aligned)."""
    _available("triton")
    from fastimp.kernels.weight_points import weight_points_triton
    (origin, U, C, clip, lo, hi), _ = _case(7, 3, 50, dtype, seed=4)
    expected = _ref64(origin, U, C, clip, lo, hi)
    out = torch.full((7, 50), float("nan"), dtype=dtype)
    weight_points_triton(origin.to(dtype), U.to(dtype), C.to(dtype), clip, lo.to(dtype),
                         hi.to(dtype), out, block=32, max_k=3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_cuda_large_slice_beyond_the_old_grid_limit(backend):
    """D = 2^27 + 3 coordinates (above the 67.1 M limit of coordinate blocks on axis 1) and
    K * D > 2^31 (64-bit offsets), checked on sampled coordinates."""
    D, J, K = 2 ** 27 + 3, 2, 17
    free, _ = torch.cuda.mem_get_info()
    if free < (K + J + 2) * D * 4 + 2 * 2 ** 30:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    origin = torch.randn(D, device="cuda", generator=g)
    U = torch.randn(J, D, device="cuda", generator=g)
    C = torch.randn(K, J, device="cuda", generator=g)
    clip = torch.rand(D, device="cuda", generator=g) < 0.3
    lo, hi = torch.tensor([-0.5, 0.0], device="cuda"), torch.tensor([0.5, 1.0], device="cuda")
    out = torch.full((K, D), float("nan"), device="cuda")
    weight_points(origin, U, C, clip=clip, lo=lo, hi=hi, out=out, backend=backend)
    idx = torch.cat([torch.arange(0, 100), torch.arange(D - 100, D),
                     torch.randint(0, D, (1000,))]).cuda()
    want = _ref64(origin[idx].double(), U[:, idx].double(), C.double(), clip[idx],
                  lo.double(), hi.double())
    assert torch.allclose(out[:, idx].double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out[-1, -5:]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_overlapping_an_input_is_refused(backend):
    """``out`` (written) sharing memory with an input: a ValueError naming both, nothing
    written, in every backend."""
    _available(backend)
    K, J, D = 3, 2, 50
    gen = torch.Generator().manual_seed(9)
    store = torch.randn(K * D + D, generator=gen)
    directions, coeffs = torch.randn(J, D, generator=gen), torch.randn(K, J, generator=gen)
    cases = [("origin", store[K * D - 10:K * D - 10 + D], directions, coeffs),  # out's tail
             ("directions", store[K * D:], store[D:D + J * D].view(J, D), coeffs),
             ("coeffs", store[K * D:], directions, store[:K * J].view(K, J))]
    for name, origin, dirs, cs in cases:
        before = store.clone()
        with pytest.raises(ValueError, match=f"'{name}' and 'out'.*overlap in memory"):
            weight_points(origin, dirs, cs, out=store[:K * D].view(K, D), backend=backend)
        assert torch.equal(store, before)


def _offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` as a contiguous view starting one element into its storage (not 16-byte
    aligned: Triton's unaligned specialization)."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
    return flat[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_misaligned_views(backend, dtype):
    """Every input and the output as views one element into their storage; the element before
    the output is not written."""
    _available(backend)
    K, J, D = 3, 2, 1029
    (origin, U, C, clip, lo, hi), _ = _case(K, J, D, dtype, seed=77)
    expected = _ref64(origin, U, C, clip, lo, hi)
    args = [_offset(t.to(dtype)) for t in (origin, U, C)]
    store = torch.full((K * D + 1,), float("nan"), dtype=dtype)
    out = store[1:].view(K, D)
    assert all(t.data_ptr() % 16 for t in args + [out])
    weight_points(*args, clip=_offset(clip), lo=_offset(lo.to(dtype)), hi=_offset(hi.to(dtype)),
                  out=out, backend=backend)
    assert torch.isnan(store[0])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
