"""The ops registered with torch.library: opcheck of each (schema, fake impl, mutations) for
every backend (triton under the interpreter on the CPU; cuda and triton on a GPU), and a training
step with MaskedSGD under torch.compile(fullgraph=True) (no graph break) on the CPU and the
GPU."""
import pytest
import torch

from fastimp import _backend
from fastimp.optim import MaskedSGD
import fastimp.ops  # noqa: F401  (registers the ops)

# triton: on CPU tensors under the Triton interpreter (tests/conftest.py sets it)
BACKENDS = [b for b in ("torch", "cpu", "triton") if _backend.status("masked_sgd", b, "cpu")]


def _sgd_args(backend, momentum, lr_tensor, device="cpu"):
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4), (0,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    bufs = [torch.randn(s, generator=g) for s in shapes] if momentum else []
    masks = [torch.rand(shapes[0], generator=g) > 0.5, None, torch.ones(0, dtype=torch.bool)]
    lr = torch.tensor(0.1) if lr_tensor else None
    to = lambda xs: [None if t is None else t.to(device) for t in xs]  # noqa: E731
    return (to(params), to(grads), to(bufs), to(masks), [False, True, False], 0.1,
            None if lr is None else lr.to(device), momentum, 0.0, 1e-3, False, False, False,
            backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_masked_sgd(backend, momentum):
    torch.library.opcheck(torch.ops.fastimp.masked_sgd_.default,
                          _sgd_args(backend, momentum, lr_tensor=momentum != 0))


def _threshold_args(device="cpu"):
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(7, generator=g), torch.randn(2, 3, generator=g)]
    masks = [torch.rand(7, generator=g) > 0.3, torch.ones(2, 3, dtype=torch.bool)]
    out = [torch.empty(7, dtype=torch.bool), torch.empty(2, 3, dtype=torch.bool)]
    return ([t.to(device) for t in weights], [t.to(device) for t in masks],
            [t.to(device) for t in out])


def _points_args(backend, device="cpu"):
    g = torch.Generator().manual_seed(2)
    D, J, K = 11, 2, 3
    args = (torch.randn(D, generator=g), torch.randn(J, D, generator=g),
            torch.randn(K, J, generator=g), torch.rand(D, generator=g) > 0.5,
            torch.zeros(J), torch.ones(J), torch.empty(K, D))
    return tuple(t.to(device) for t in args) + (backend,)


def _opcheck_threshold(backend, device="cpu"):
    weights, masks, out = _threshold_args(device)
    torch.library.opcheck(torch.ops.fastimp.magnitude_threshold.default,
                          (weights, masks, out, None, 0.4, backend))
    torch.library.opcheck(torch.ops.fastimp.magnitude_threshold.default,
                          (weights, [], out, 3, 0.0, backend))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu", "triton")
                                     if _backend.status("magnitude_threshold", b, "cpu")])
def test_opcheck_magnitude_threshold(backend):
    _opcheck_threshold(backend)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu", "triton")
                                     if _backend.status("weight_points", b, "cpu")])
def test_opcheck_weight_points(backend):
    torch.library.opcheck(torch.ops.fastimp.weight_points_.default, _points_args(backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_on_the_gpu(backend):
    """The three ops' CUDA and Triton backends on CUDA tensors (weight_points has no CUDA
    backend)."""
    ran = 0
    if _backend.status("masked_sgd", backend, "cuda"):
        for momentum in (0.0, 0.9):
            torch.library.opcheck(torch.ops.fastimp.masked_sgd_.default,
                                  _sgd_args(backend, momentum, momentum != 0, "cuda"))
        ran += 1
    if _backend.status("magnitude_threshold", backend, "cuda"):
        _opcheck_threshold(backend, "cuda")
        ran += 1
    if _backend.status("weight_points", backend, "cuda"):
        torch.library.opcheck(torch.ops.fastimp.weight_points_.default,
                              _points_args(backend, "cuda"))
        ran += 1
    if not ran:
        pytest.skip(f"{backend} unavailable on CUDA")


def _model_and_data(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    masks = {model[0].weight: torch.rand(16, 8) > 0.5}
    model.to(device)
    return model, x.to(device), y.to(device), {p: m.to(device) for p, m in masks.items()}


def _compiled_matches_eager(device="cpu", backend="auto", compiler="aot_eager"):
    """forward, backward (where this torch's dynamo traces it) and MaskedSGD.step with a tensor
    lr, compiled with fullgraph=True (a graph break raises), against the same steps eager."""
    import torch._dynamo
    runs = {}
    for mode in ("eager", "compiled"):
        model, x, y, masks = _model_and_data(device)
        opt = MaskedSGD(model.parameters(), lr=torch.tensor(0.1, device=device), momentum=0.9,
                        weight_decay=1e-3, masks=masks, backend=backend)
        traced_backward = hasattr(torch._dynamo.config, "trace_autograd_ops")

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        def opt_step():
            opt.step()

        if mode == "compiled":
            torch._dynamo.reset()
            if traced_backward:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    fn = torch.compile(step, fullgraph=True, backend=compiler)
                    losses = [fn() for _ in range(3) if not _zero(model)]
            else:  # older torch: forward and backward eager, the optimizer step compiled
                fn = torch.compile(opt_step, fullgraph=True, backend=compiler)
                losses = []
                for _ in range(3):
                    _zero(model)
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    fn()
                    losses.append(loss.detach())
        else:
            losses = [step() for _ in range(3) if not _zero(model)]
        runs[mode] = (losses, [p.detach().clone() for p in model.parameters()], opt)
    (le, pe, _), (lc, pc, opt) = runs["eager"], runs["compiled"]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(le, lc))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(pe, pc))
    w, m = list(opt.masks.items())[0]
    assert bool((w[~m] == 0).all())


def test_compiled_training_step_has_no_graph_break_and_matches_eager():
    _compiled_matches_eager()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compiled_training_step_on_the_gpu(backend):
    """The same on CUDA through Inductor, with MaskedSGD on the CUDA or the Triton kernel."""
    if not _backend.status("masked_sgd", backend, "cuda"):
        pytest.skip(f"{backend} unavailable")
    _compiled_matches_eager("cuda", backend, "inductor")


def test_compiled_optimizer_step_with_inductor():
    """The optimizer step alone through Inductor (the custom op survives functionalization)."""
    import torch._dynamo
    torch._dynamo.reset()
    model, x, y, masks = _model_and_data()
    ref_model, _, _, _ = _model_and_data()
    opt = MaskedSGD(model.parameters(), lr=torch.tensor(0.05), momentum=0.9, masks=masks)
    ref = MaskedSGD(ref_model.parameters(), lr=0.05, momentum=0.9,
                    masks={ref_model[0].weight: masks[model[0].weight]})
    fn = torch.compile(lambda: opt.step(), fullgraph=True)
    for _ in range(2):
        for m_ in (model, ref_model):
            _zero(m_)
            torch.nn.functional.cross_entropy(m_(x), y).backward()
        fn()
        ref.step()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7)
               for a, b in zip(model.parameters(), ref_model.parameters()))


def _zero(model) -> bool:
    for p in model.parameters():
        p.grad = None
    return False
