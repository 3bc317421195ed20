"""fastimp.hessian against the exact Hessian (torch.autograd.functional.hessian) and PyHessian."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastimp.hessian import Hessian, HVPOperator, SpectralDensity

METHODS = ["auto", "forward-over-reverse", "double-backward"]


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3 * 6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def convbn(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = ConvBN().double()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.5, 0.5)
    return m.to(dtype)


def data_for(model, n=37, bs=10, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model, nn.Sequential) else (n, 2, 8)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


_EXACT = {}


def exact_hessian(model, x, y, masks=None, weight_decay=0.0):
    """The full-batch Hessian over the free coordinates, by torch.autograd.functional.hessian
    (cached per model and data: the tests reuse a few)."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    sizes = [p.numel() for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    key = (type(model).__name__, tuple(n for n, _ in model.named_buffers()), w0.sum().item(),
           w0.numel(), x.sum().item(), x.shape, y.sum().item(), weight_decay)
    if key not in _EXACT:
        buffers = dict(model.named_buffers())
        model.eval()

        def loss(w):
            params, off = {}, 0
            for (n, p), s in zip(named, sizes):
                params[n] = w[off:off + s].view_as(p)
                off += s
            out = F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)
            return out + 0.5 * weight_decay * (w * w).sum()

        _EXACT[key] = torch.autograd.functional.hessian(loss, w0,
                                                        vectorize=True)
    H = _EXACT[key]
    keep = torch.cat([masks[n].reshape(-1) if masks and n in masks
                      else torch.ones(s, dtype=torch.bool) for n, s in zip(names, sizes)])
    return H[keep][:, keep]


def random_masks(model, seed=3, density=0.6):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() > 1}


@pytest.mark.parametrize("method,arch,masked", [
    (m, "mlp", masked) for m in METHODS for masked in (False, True)] + [
    ("forward-over-reverse", "convbn", True), ("double-backward", "convbn", False)])
def test_hvp_matches_exact_hessian(method, arch, masked):
    model = mlp() if arch == "mlp" else convbn()
    x, y, batches = data_for(model, n=27)    # batches of 10, 10, 7: weighted by size
    masks = random_masks(model) if masked else None
    H = exact_hessian(model, x, y, masks)
    op = HVPOperator(model, F.cross_entropy, batches, masks, method=method, probes_per_pass=40)
    assert op.D_A == H.shape[0]
    dense = op.dense()
    assert torch.isfinite(dense).all()
    torch.testing.assert_close(dense, H, rtol=1e-10, atol=1e-12)


def test_hvp_single_pair_and_batch_size_split():
    model = mlp()
    x, y, _ = data_for(model)
    H = exact_hessian(model, x, y)
    for bs in (None, 4, 37, 100):
        op = HVPOperator(model, None, (x, y), batch_size=bs, probes_per_pass=128)
        torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)


def test_weight_decay_adds_identity():
    model = mlp()
    x, y, batches = data_for(model)
    H = exact_hessian(model, x, y, weight_decay=0.3)
    op = HVPOperator(model, None, batches, weight_decay=0.3, probes_per_pass=128)
    torch.testing.assert_close(op.dense(), H, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_uses_batch_statistics_and_leaves_model_alone():
    model = convbn()
    x, y, _ = data_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = torch.func.replace_all_batch_norm_modules_(convbn()).train()
    H = exact_hessian(ref.eval(), x, y)  # replaced BN has no running stats: batch stats always
    op = HVPOperator(model, None, (x, y), batchnorm="train", probes_per_pass=128)
    dense = op.dense()
    torch.testing.assert_close(dense, H, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dense, exact_hessian(convbn(), x, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.train()
    op_eval = HVPOperator(model, None, (x, y))
    op_eval.matvec(torch.ones(op_eval.D_A, dtype=torch.float64))
    assert model.training  # eval mode only during the product


@pytest.mark.parametrize("arch,dtype,rtol,masked", [
    ("convbn", torch.float64, 1e-6, False), ("mlp", torch.float64, 1e-6, True),
    ("mlp", torch.float32, 1e-4, False), ("convbn", torch.float32, 1e-4, True)])
def test_top_eigenvalues_match_exact(arch, dtype, rtol, masked):
    build = mlp if arch == "mlp" else convbn
    model = build(dtype)
    x, y, batches = data_for(model, n=64, bs=32, dtype=dtype)
    masks = random_masks(model) if masked else None
    H = exact_hessian(build(torch.float64), x.double(), y, masks)
    exact = torch.linalg.eigvalsh(H).flip(0)[:5]
    hess = Hessian(model, F.cross_entropy, batches, masks, seed=0)
    vals, vecs = hess.eigenvalues(top_n=5, max_iter=200,
                                  tol=1e-8 if dtype == torch.float64 else 1e-4)
    assert len(vals) == 5 and vals == sorted(vals, reverse=True)
    np.testing.assert_allclose(vals, exact.numpy(), rtol=rtol)
    # eigenvectors: parameter-shaped, zero on pruned coordinates, H v = λ v
    for lam, vec in zip(vals[:2], vecs[:2]):
        assert set(vec) == {n for n, _ in model.named_parameters()}
        if masked:
            for n, m in masks.items():
                assert (vec[n][~m] == 0).all()
        v = hess.op.from_params({n: t.unsqueeze(0) for n, t in vec.items()})[0].double()
        torch.testing.assert_close(H @ v, lam * v, atol=50 * rtol * abs(lam), rtol=0)


def test_eigenvalues_full_krylov_space_and_degenerate_spectrum():
    # D_A = 4 coordinates free: Lanczos exhausts the space, every eigenvalue is exact.
    torch.manual_seed(0)
    model = nn.Linear(2, 2, bias=False).double()
    x = torch.randn(20, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    H = exact_hessian(model, x, y)
    hess = Hessian(model, None, (x, y))
    vals, _ = hess.eigenvalues(top_n=4, max_iter=50, tol=1e-12)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(H).flip(0).numpy(), rtol=1e-8,
                               atol=1e-12)


def _rademacher_std(A: torch.Tensor) -> float:
    """Std of v^T A v for v = s / sqrt(D), s Rademacher: sqrt(2 Σ_{i≠j} A_ij²) / D."""
    off = A - torch.diag(torch.diag(A))
    return float(torch.sqrt(2 * (off ** 2).sum())) / A.shape[0]


def test_trace_hutchinson():
    model = mlp()
    x, y, batches = data_for(model)
    H = exact_hessian(model, x, y)
    hess = Hessian(model, None, batches, seed=0, probes_per_pass=100)
    n = 200
    samples = hess.trace(n_samples=n)
    assert len(samples) == n
    sigma = _rademacher_std(H) * H.shape[0] / math.sqrt(n)
    assert abs(np.mean(samples) - float(H.trace())) < 4 * sigma
    # probes per pass and method do not change the estimate (same probes, same seed)
    other = Hessian(model, None, batches, seed=0, probes_per_pass=7,
                    method="double-backward").trace(n_samples=10, seed=5)
    np.testing.assert_allclose(other, hess.trace(n_samples=10, seed=5), rtol=1e-10)
    # diagonal Hessian: Hutchinson is exact for every Rademacher probe
    d = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(6, dtype=torch.float64))

        def forward(self, x):
            return x * (self.w ** 2 * d).sum() / 4

    tr = Hessian(Quad(), lambda out, t: out.mean(), (torch.ones(3, 1, dtype=torch.float64),
                                                     torch.zeros(3))).trace(5)
    np.testing.assert_allclose(tr, [float(d.sum()) / 2] * 5, rtol=1e-12)


def test_density_moments_match_exact_spectrum():
    model = mlp()
    x, y, batches = data_for(model, n=50, bs=25)
    H = exact_hessian(model, x, y)
    ev = torch.linalg.eigvalsh(H)
    D = H.shape[0]
    n_runs, m = 24, 8
    dens = Hessian(model, None, batches, seed=0, probes_per_pass=24).density(
        iterations=m, n_runs=n_runs)
    assert dens.nodes.shape == (n_runs, m) and dens.D_A == D
    np.testing.assert_allclose(dens.weights.sum(1), 1.0, rtol=1e-10)
    assert dens.moment(0) == pytest.approx(1.0, rel=1e-12)
    Hk = torch.eye(D, dtype=torch.float64)
    for k in range(1, 5):                              # Gauss quadrature exact for k < 2m
        Hk = Hk @ H
        exact = float((ev ** k).mean())
        sigma = _rademacher_std(Hk) / math.sqrt(n_runs)
        assert abs(dens.moment(k) - exact) < 4 * sigma + 1e-12 * abs(exact), k
    # nodes lie within the spectrum (Cauchy interlacing)
    assert dens.nodes.min() >= ev.min() - 1e-8 and dens.nodes.max() <= ev.max() + 1e-8


def test_density_full_krylov_recovers_spectrum():
    model = mlp()
    x, y, batches = data_for(model)
    H = exact_hessian(model, x, y)
    ev = torch.linalg.eigvalsh(H).numpy()
    D = H.shape[0]
    dens = Hessian(model, None, (x, y), seed=1).density(iterations=D + 10, n_runs=1)
    assert dens.nodes.shape == (1, D)                  # capped at D_A
    for r in range(1):
        np.testing.assert_allclose(np.sort(dens.nodes[r]), ev, atol=1e-7)
        assert dens.weights[r].sum() == pytest.approx(1.0, rel=1e-12)


def test_density_float32_masked_and_deterministic():
    model = mlp(torch.float32)
    x, y, batches = data_for(model, n=40, bs=20, dtype=torch.float32)
    masks = random_masks(model)
    hess = Hessian(model, None, batches, masks)
    a = hess.density(iterations=12, n_runs=2, seed=7)
    b = Hessian(model, None, batches, masks).density(iterations=12, n_runs=2, seed=7)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.weights, b.weights)
    H = exact_hessian(mlp(), x.double(), y, masks)
    assert a.D_A == H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    np.testing.assert_allclose(a.nodes.max(), float(ev.max()), rtol=1e-4)


def test_spectral_density_io_smoothing_and_plot(tmp_path):
    nodes = np.array([[0.0, 1.0, 5.0], [0.5, 1.5, 4.0]])
    weights = np.array([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    d = SpectralDensity(nodes, weights, D_A=1000, meta={"iterations": 3})
    eig_list, w_list = d                                   # PyHessian's return shape
    assert eig_list == nodes.tolist() and w_list == weights.tolist()
    n, w = d.flat()
    assert w.sum() == pytest.approx(1.0) and n.shape == (6,)
    grid, phi = d.smoothed(sigma=0.05, num=4001)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, rel=1e-4)
    assert grid[np.argmax(phi)] == pytest.approx(0.5, abs=0.01)    # the heaviest node (0.3)
    with pytest.raises(ValueError, match="sigma"):
        d.smoothed(sigma=0)
    for suffix in (".npz", ".json"):
        p = d.save(tmp_path / f"density{suffix}")
        e = SpectralDensity.load(p)
        np.testing.assert_array_equal(e.nodes, nodes)
        np.testing.assert_array_equal(e.weights, weights)
        assert e.D_A == 1000 and e.meta == {"iterations": 3}
    png = tmp_path / "density.png"
    d.plot(png, sigma=0.1)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_subset_and_bad_input():
    model = mlp()
    x, y, batches = data_for(model)
    op = HVPOperator(model, None, batches, subset=11, seed=3)
    assert op.num_examples == 11
    op2 = HVPOperator(model, None, batches, subset=11, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(op.batches, op2.batches))
    with pytest.raises(ValueError, match="subset"):
        HVPOperator(model, None, batches, subset=100)
    with pytest.raises(ValueError, match="masks"):
        HVPOperator(model, None, batches, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks"):
        HVPOperator(model, None, batches, {"nope": torch.ones(3)})
    with pytest.raises(ValueError, match="method"):
        HVPOperator(model, None, batches, method="finite-differences")
    with pytest.raises(ValueError, match="batchnorm"):
        HVPOperator(model, None, batches, batchnorm="frozen")
    with pytest.raises(TypeError, match="data"):
        HVPOperator(model, None, 3)
    with pytest.raises(TypeError, match="model"):
        HVPOperator("model", None, batches)
    hess = Hessian(model, None, batches)
    with pytest.raises(ValueError, match="top_n"):
        hess.eigenvalues(top_n=hess.D_A + 1)
    with pytest.raises(ValueError, match="iterations"):
        hess.density(iterations=0)
    with pytest.raises(ValueError, match="n_samples"):
        hess.trace(n_samples=0)
    with pytest.raises(ValueError, match="V"):
        hess.op.matvec(torch.ones(3))


# -- PyHessian, the package users know --------------------------------------------------------

def _pyhessian_setup():
    pyhessian = pytest.importorskip("pyhessian")
    model = mlp(torch.float32)
    x, y, batches = data_for(model, n=64, bs=32, dtype=torch.float32)
    return pyhessian, model, batches, exact_hessian(mlp(), x.double(), y)


def test_eigenvalues_agree_with_pyhessian():
    pyhessian, model, batches, H = _pyhessian_setup()
    torch.manual_seed(0)
    ph = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    ph_vals, _ = ph.eigenvalues(maxIter=1000, tol=1e-6, top_n=2)
    vals, _ = Hessian(model, nn.CrossEntropyLoss(), batches).eigenvalues(top_n=2, tol=1e-7)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    np.testing.assert_allclose(vals, exact, rtol=1e-4)
    np.testing.assert_allclose(vals, ph_vals, rtol=1e-3)


def test_trace_agrees_with_pyhessian():
    pyhessian, model, batches, H = _pyhessian_setup()
    torch.manual_seed(0)
    ph = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    n = 64
    ph_samples = ph.trace(maxIter=n, tol=-1.0)             # tol < 0: exactly n samples
    samples = Hessian(model, nn.CrossEntropyLoss(), batches).trace(n_samples=n)
    assert len(ph_samples) == len(samples) == n
    sigma = _rademacher_std(H) * H.shape[0] / math.sqrt(n)
    assert abs(np.mean(samples) - np.mean(ph_samples)) < 4 * math.sqrt(2) * sigma
    assert abs(np.mean(samples) - float(H.trace())) < 4 * sigma
