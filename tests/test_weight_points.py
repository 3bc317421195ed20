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
