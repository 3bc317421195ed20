"""MaskedSGD against the real torch.optim.SGD followed by the mask multiply, over long trajectories,
for every backend; and the torch.optim.Optimizer behaviour it promises (groups, closures, state
dicts with masks, lr schedulers, GradScaler, errors)."""
import io

import pytest
import torch

import fastimp
from fastimp import _backend
from fastimp.optim import MaskedSGD

BACKENDS = [b for b in ("torch", "cpu", "triton") if _backend.status("masked_sgd", b, "cpu")]

CONFIGS = {
    "plain": dict(),
    "momentum-wd": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
    "dampening-maximize": dict(momentum=0.8, dampening=0.3, weight_decay=1e-3, maximize=True),
    "decoupled": dict(momentum=0.875, weight_decay=5e-2, decoupled_weight_decay=True),
}


def _params(sizes, gen, dtype=torch.float32):
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes]


def _reference_step(sgd, params, masks, decoupled_wd, lr):
    """torch.optim.SGD.step() then p.mul_(m), buf.mul_(m); decoupled decay applied first."""
    with torch.no_grad():
        if decoupled_wd:
            for p in params:
                if p.grad is not None:
                    p.mul_(1 - lr * decoupled_wd)
    sgd.step()
    with torch.no_grad():
        for p in params:
            if p.grad is None or p not in masks:
                continue
            p.mul_(masks[p])
            buf = sgd.state[p].get("momentum_buffer")
            if buf is not None:
                buf.mul_(masks[p])


def run_pair(config, backend, sizes, steps, seed=0, mask_dtype=torch.bool, drop_grads=True,
             device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    init = [t.to(device) for t in _params(sizes, gen, dtype)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    raw = {i: (torch.rand(s, generator=gen) > 0.35).to(device) for i, s in enumerate(sizes)
           if i % 3 != 2}
    masks_ours = {ours[i]: m.to(mask_dtype) for i, m in raw.items()}
    masks_theirs = {theirs[i]: m.float() for i, m in raw.items()}
    cfg = dict(config)
    decoupled = cfg.pop("decoupled_weight_decay", False)
    lr = 0.05
    opt = MaskedSGD(ours, lr=lr, masks=masks_ours, backend=backend, decoupled_weight_decay=decoupled,
                    **cfg)
    wd = cfg.pop("weight_decay", 0) if decoupled else 0
    sgd = torch.optim.SGD(theirs, lr=lr, foreach=False, **cfg)
    for step in range(steps):
        for i, s in enumerate(sizes):
            g = torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
            # some params get no grad on some steps (their buffers must stay untouched)
            skip = drop_grads and (i + step) % 5 == 0
            ours[i].grad = None if skip else g.clone()
            theirs[i].grad = None if skip else g.clone()
        opt.step()
        _reference_step(sgd, theirs, masks_theirs, wd, lr)
    return opt, sgd, ours, theirs


def assert_trajectory_close(opt, sgd, ours, theirs, rtol):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.numel() == 0:
            continue
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= rtol * scale, f"param {i} {tuple(a.shape)}: err {err:.3g} scale {scale:.3g}"
        ba, bb = opt.state[a].get("momentum_buffer"), sgd.state[b].get("momentum_buffer")
        assert (ba is None) == (bb is None)
        if ba is not None:
            s = bb.abs().max().item()
            assert (ba - bb).abs().max().item() <= rtol * s, f"buf {i}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_trajectory_equals_torch_sgd_then_mask(backend, config):
    if backend == "triton":  # the interpreter is slow: tiny tensors, fewer steps
        sizes, steps = [(0,), (1,), (3, 5), (37,), (2, 70)], 40
    else:
        sizes, steps = [(0,), (1,), (3, 5), (37,), (129, 7), (16384 * 2 + 5,), (8, 3, 3, 3)], 200
    opt, sgd, ours, theirs = run_pair(CONFIGS[config], backend, sizes, steps)
    assert_trajectory_close(opt, sgd, ours, theirs, rtol=1e-6)
    for p, m in opt.masks.items():
        assert bool((p[~m] == 0).all())
        buf = opt.state[p].get("momentum_buffer")
        if buf is not None:
            assert bool((buf[~m] == 0).all())


@pytest.mark.parametrize("config", ["momentum-wd", "dampening-maximize", "decoupled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_trajectory_equals_torch_sgd(backend, config):
    """float64 params (issue 12): computed in float64, as torch.optim.SGD does."""
    sizes = [(1,), (3, 5), (37,), (2, 70)] + ([(16384 * 2 + 5,)] if backend == "cpu" else [])
    steps = 30
    opt, sgd, ours, theirs = run_pair(CONFIGS[config], backend, sizes, steps,
                                      dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in ours)
    assert_trajectory_close(opt, sgd, ours, theirs, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
def test_trajectory_on_gpu(backend, config):
    if backend != "auto" and not _backend.status("masked_sgd", backend, "cuda"):
        pytest.skip(f"{backend} backend not available on cuda")
    sizes = [(0,), (1,), (3, 5), (37,), (129, 7), (70000,), (64, 3, 3, 3)]
    opt, sgd, ours, theirs = run_pair(CONFIGS[config], backend, sizes, 200, device="cuda")
    assert_trajectory_close(opt, sgd, ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.float16])
def test_mask_dtypes_are_equivalent(mask_dtype):
    opt, sgd, ours, theirs = run_pair(CONFIGS["nesterov"], "auto", [(17,), (4, 9)], 30,
                                      mask_dtype=mask_dtype)
    assert_trajectory_close(opt, sgd, ours, theirs, rtol=1e-6)
    assert all(m.dtype == torch.bool for m in opt.masks.values())


def test_masked_weights_zero_even_when_they_start_nonzero():
    p = torch.nn.Parameter(torch.randn(50) + 3)  # nonzero at every masked coordinate
    m = torch.rand(50) > 0.5
    opt = MaskedSGD([p], lr=0.1, momentum=0.9, masks={p: m})
    p.grad = torch.randn(50)
    opt.step()
    assert bool((p[~m] == 0).all()) and bool((opt.state[p]["momentum_buffer"][~m] == 0).all())
    assert bool((p[m] != 0).all())


def test_param_without_grad_is_untouched_including_its_buffer():
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = MaskedSGD([a, b], lr=0.1, momentum=0.9, masks={b: torch.rand(6) > 0.5})
    a.grad, b.grad = torch.randn(6), torch.randn(6)
    opt.step()
    b_before, buf_before = b.detach().clone(), opt.state[b]["momentum_buffer"].clone()
    b.grad = None
    a.grad = torch.randn(6)
    opt.step()
    assert torch.equal(b, b_before) and torch.equal(opt.state[b]["momentum_buffer"], buf_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_params_follow_fp32_math(backend, dtype):
    """bf16/fp16 params: each step is the fp32-math update rounded once; compare with a float64
    simulation that rounds p and buf to the dtype after every step, like the kernels."""
    gen = torch.Generator().manual_seed(5)
    sizes = [(1,), (33,), (5, 7)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]
    sim = [p.detach().double() for p in ps]
    bufs = [None] * len(ps)
    masks = {ps[0]: torch.tensor([True]), ps[2]: torch.rand(5, 7, generator=gen) > 0.4}
    mlist = [masks.get(p) for p in ps]
    opt = MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True, masks=masks,
                    backend=backend)
    eps = torch.finfo(dtype).eps
    for _ in range(10):
        for i, p in enumerate(ps):
            g = torch.randn(sizes[i], generator=gen).to(dtype)
            p.grad = g
            d = g.double() + 1e-2 * sim[i]
            bufs[i] = d.clone() if bufs[i] is None else 0.9 * bufs[i] + d
            d = d + 0.9 * bufs[i]
            sim[i] = sim[i] - 0.05 * d
            if mlist[i] is not None:
                sim[i] = sim[i] * mlist[i]
                bufs[i] = bufs[i] * mlist[i]
            sim[i] = sim[i].to(dtype).double()
            bufs[i] = bufs[i].to(dtype).double()
        opt.step()
        for i, p in enumerate(ps):
            assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype
            scale = sim[i].abs().max().item()
            err = (p.double() - sim[i]).abs().max().item()
            assert err <= 4 * eps * scale, f"param {i}: {err:.3g} > 4 ulp of {scale:.3g}"
            sim[i] = p.detach().double()  # re-sync: rounding ties may differ by one ulp
            bufs[i] = opt.state[p]["momentum_buffer"].double()


def test_param_groups_closure_and_zero_grad():
    gen = torch.Generator().manual_seed(7)
    w1 = torch.randn(4, 3, generator=gen)
    w2 = torch.randn(3, generator=gen)
    x = torch.randn(16, 3, generator=gen)
    m1 = torch.rand(4, 3, generator=gen) > 0.3

    def setup(cls, **extra):
        a, b = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())
        groups = [{"params": [a], "lr": 0.1, "momentum": 0.9},
                  {"params": [b], "lr": 0.01, "weight_decay": 1e-2}]
        return a, b, cls(groups, lr=0.5, **extra)

    a1, b1, ours = setup(MaskedSGD)
    a1_mask = {a1: m1}
    ours.set_masks(a1_mask)
    a2, b2, sgd = setup(torch.optim.SGD)
    for _ in range(25):
        def closure(a=a1, b=b1, opt=ours):
            opt.zero_grad()
            loss = ((x @ a.t()).tanh().sum(1) - x @ b).pow(2).mean()
            loss.backward()
            return loss

        def closure2(a=a2, b=b2, opt=sgd):
            opt.zero_grad()
            loss = ((x @ a.t()).tanh().sum(1) - x @ b).pow(2).mean()
            loss.backward()
            return loss
        l1 = ours.step(closure)
        l2 = sgd.step(closure2)
        with torch.no_grad():
            a2.mul_(m1)
            sgd.state[a2]["momentum_buffer"].mul_(m1)
        assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a1, a2, rtol=1e-5, atol=1e-6) and torch.allclose(b1, b2, rtol=1e-5, atol=1e-6)
    assert ours.param_groups[0]["lr"] == 0.1 and ours.param_groups[1]["momentum"] == 0
    ours.zero_grad()
    assert a1.grad is None


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("scheduler", ["step", "cosine", "onecycle"])
def test_lr_schedulers_drive_it_like_sgd(scheduler, lr_kind):
    """lr a float, or a 0-dim float64 tensor that the scheduler updates in place."""
    def make(opt):
        if scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.3)
        if scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=30)

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(40, generator=gen)
    m = torch.rand(40, generator=gen) > 0.5
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    lr = torch.tensor(0.1, dtype=torch.float64) if lr_kind == "tensor" else 0.1
    ours = MaskedSGD([a], lr=lr, momentum=0.9, masks={a: m})
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    s1, s2 = make(ours), make(sgd)
    for _ in range(30):
        g = torch.randn(40, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        sgd.step()
        with torch.no_grad():
            b.mul_(m)
            sgd.state[b]["momentum_buffer"].mul_(m)
        s1.step()
        s2.step()
        assert float(ours.param_groups[0]["lr"]) == sgd.param_groups[0]["lr"]
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) == (lr_kind == "tensor")
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_unscales_and_skips_inf_steps():
    scaler1 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(20, generator=gen)
    m = torch.rand(20, generator=gen) > 0.5
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = MaskedSGD([a], lr=0.1, momentum=0.9, masks={a: m})
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    skipped = 0
    for step in range(12):
        x = torch.randn(20, generator=gen)
        if step == 5:
            x[3] = float("inf")  # an overflowing step: both must skip it
        for p, opt, scaler in ((a, ours, scaler1), (b, sgd, scaler2)):
            opt.zero_grad()
            scaler.scale((p * x).sum()).backward()
            before = p.detach().clone()
            scaler.step(opt)
            scaler.update()
            if step == 5:
                assert torch.equal(p, before)
                skipped += 1
        with torch.no_grad():
            b.mul_(m)
            if "momentum_buffer" in sgd.state[b]:
                sgd.state[b]["momentum_buffer"].mul_(m)
        assert scaler1.get_scale() == scaler2.get_scale()
    assert skipped == 2
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_keeps_masks_and_continues_identically():
    gen = torch.Generator().manual_seed(17)
    sizes = [(6, 5), (7,)]
    init = _params(sizes, gen)
    grads = [[torch.randn(s, generator=gen) for s in sizes] for _ in range(20)]
    m = torch.rand(6, 5, generator=gen) > 0.5

    def train(ps, opt, gs):
        for step_grads in gs:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    ps = [torch.nn.Parameter(t.clone()) for t in init]
    full = MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, masks={ps[0]: m})
    train(ps, full, grads)

    qs = [torch.nn.Parameter(t.clone()) for t in init]
    first = MaskedSGD(qs, lr=0.05, momentum=0.9, weight_decay=1e-3, masks={qs[0]: m})
    train(qs, first, grads[:10])
    blob = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [q.detach().clone() for q in qs]}, blob)
    blob.seek(0)
    saved = torch.load(blob)
    rs = [torch.nn.Parameter(t) for t in saved["params"]]
    resumed = MaskedSGD(rs, lr=1.0)  # hyperparameters and masks come from the state dict
    resumed.load_state_dict(saved["opt"])
    assert set(resumed.masks) == {rs[0]} and torch.equal(resumed.masks[rs[0]], m)
    assert resumed.masks[rs[0]].dtype == torch.bool
    assert resumed.param_groups[0]["lr"] == 0.05
    train(rs, resumed, grads[10:])
    for a, b in zip(ps, rs):
        assert torch.equal(a, b)


def test_loads_a_torch_sgd_state_dict():
    p = torch.nn.Parameter(torch.randn(5))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(5)
    sgd.step()
    q = torch.nn.Parameter(p.detach().clone())
    ours = MaskedSGD([q], lr=0.1, momentum=0.9)
    ours.load_state_dict(sgd.state_dict())
    assert torch.equal(ours.state[q]["momentum_buffer"], sgd.state[p]["momentum_buffer"])
    assert ours.param_groups[0]["decoupled_weight_decay"] is False


def test_set_masks_replaces_and_clears():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = MaskedSGD([a, b], lr=0.1, masks={a: torch.tensor([1, 0, 1], dtype=torch.uint8)})
    assert set(opt.masks) == {a}
    opt.set_masks({b: torch.tensor([1.0, 1.0, 0.0, 1.0])})
    assert set(opt.masks) == {b} and "mask" not in opt.state.get(a, {})
    opt.set_masks(None)
    assert opt.masks == {} and len(opt.state) == 0


def test_masks_keyed_by_name_with_named_parameters():
    model = torch.nn.Linear(3, 2)
    m = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    opt = MaskedSGD(model.named_parameters(), lr=0.1, masks={"weight": m})
    assert torch.equal(opt.masks[model.weight], m)


def test_works_with_fastimp_masks_for_params():
    masks_mod = pytest.importorskip("fastimp.masks")
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    masks = masks_mod.Masks.ones(model)
    opt = MaskedSGD(model.parameters(), lr=0.1, masks=masks.for_params(model))
    assert set(opt.masks) == {model[0].weight, model[2].weight}


def test_top_level_export_and_backend_choice():
    assert fastimp.MaskedSGD is MaskedSGD
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="backend"):
        MaskedSGD([p], lr=0.1, backend="fortran")


def test_deterministic():
    runs = [run_pair(CONFIGS["nesterov"], "auto", [(33,), (5, 4)], 20, seed=3)[2] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=0.1, momentum=-0.5), "momentum"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (dict(lr=0.1, nesterov=True), "Nesterov"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedSGD([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_bad_masks():
    p = torch.nn.Parameter(torch.randn(2, 3))
    with pytest.raises(ValueError, match="shape"):
        MaskedSGD([p], lr=0.1, masks={p: torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="device"):
        MaskedSGD([p], lr=0.1, masks={p: torch.ones(2, 3, dtype=torch.bool, device="meta")})
    with pytest.raises(ValueError, match="0/1"):
        MaskedSGD([p], lr=0.1, masks={p: torch.full((2, 3), 0.5)})
    with pytest.raises(ValueError, match="0/1"):
        MaskedSGD([p], lr=0.1, masks={p: torch.full((2, 3), 2, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="0/1"):
        MaskedSGD([p], lr=0.1, masks={p: torch.full((2, 3), -1, dtype=torch.int32)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        MaskedSGD([p], lr=0.1, masks={p: [[1, 1, 1], [1, 1, 1]]})
    int_mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.int32)  # the one rule: 0/1 of any
    opt = MaskedSGD([p], lr=0.1, masks={p: int_mask})                    # numeric dtype, or bool
    assert torch.equal(opt.masks[p], int_mask.bool())
    other = torch.nn.Parameter(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not a parameter"):
        MaskedSGD([p], lr=0.1, masks={other: torch.ones(2, 3)})
    with pytest.raises(ValueError, match="no parameter named"):
        MaskedSGD([p], lr=0.1, masks={"weight": torch.ones(2, 3)})


def test_sparse_complex_and_integer_rejected_float64_accepted():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MaskedSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="complex"):
        MaskedSGD([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=0.1)
    with pytest.raises(TypeError, match="float64"):
        MaskedSGD([torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)],
                  lr=0.1)
    MaskedSGD([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=0.1)
    p = torch.nn.Parameter(torch.randn(3))
    opt = MaskedSGD([p], lr=0.1)
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.9 refuses a grad of another dtype unless told
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad"):
        opt.step()


def test_accepts_torch_sgd_only_keywords():
    p = torch.nn.Parameter(torch.randn(3))
    MaskedSGD([p], lr=0.1, foreach=True)
    MaskedSGD([p], lr=0.1, fused=False)
    with pytest.raises(ValueError, match="differentiable"):
        MaskedSGD([p], lr=0.1, differentiable=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_step_follows_every_change(backend, monkeypatch):
    """Steps over the same tensors reuse the prepared step (no per-parameter list building);
    new masks, buffers, grads, param storage or a cleared state are seen at the next step."""
    gen = torch.Generator().manual_seed(21)
    w = [torch.randn(s, generator=gen) for s in [(33,), (4, 5)]]
    ours = [torch.nn.Parameter(t.clone()) for t in w]
    theirs = [torch.nn.Parameter(t.clone()) for t in w]
    masks = [torch.rand(t.shape, generator=gen) > 0.4 for t in w]
    opt = MaskedSGD(ours, lr=0.05, momentum=0.9, masks={ours[0]: masks[0]}, backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.05, momentum=0.9)
    mask_of = {0: masks[0]}
    calls = []
    full_path = MaskedSGD._group_lists
    monkeypatch.setattr(MaskedSGD, "_group_lists",
                        lambda self, *a: calls.append(1) or full_path(self, *a))

    def step(new_grads=True):
        if new_grads:
            for a, b in zip(ours, theirs):
                g = torch.randn(a.shape, generator=gen)
                if a.grad is None:
                    a.grad, b.grad = g.clone(), g.clone()
                else:  # the same grad tensors, new values (zero_grad(set_to_none=False))
                    a.grad.copy_(g)
                    b.grad.copy_(g)
        opt.step()
        sgd.step()
        with torch.no_grad():
            for i, m in mask_of.items():
                theirs[i].mul_(m)
                sgd.state[theirs[i]]["momentum_buffer"].mul_(m)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

    step()
    step()
    n = len(calls)
    for _ in range(3):
        step()
    assert len(calls) == n, "steps over the same tensors rebuilt the lists"
    mask_of[1] = masks[1]
    opt.set_masks({ours[0]: masks[0], ours[1]: masks[1]})  # new masks
    step()
    with torch.no_grad():  # a new buffer put in the state directly
        for p, q in zip(ours, theirs):
            opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone() * 0.5
            sgd.state[q]["momentum_buffer"].mul_(0.5)
    step()
    for p, q in zip(ours, theirs):  # grads set to None, then new grad tensors
        p.grad, q.grad = None, None
    step()
    with torch.no_grad():  # new param storage (as module.to() does)
        for p, q in zip(ours, theirs):
            p.data = p.data.clone()
    step()
    for p in ours:  # momentum restarts in both (the masks stay in MaskedSGD's state)
        del opt.state[p]["momentum_buffer"]
    sgd.state.clear()
    step()
    step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_step_sees_a_grad_with_other_strides_at_the_same_address(backend):
    """A new grad over the old grad's memory but laid out otherwise (channels_last): torch's grad
    setter checks shape, dtype and device, not strides, so the cached step must."""
    gen = torch.Generator().manual_seed(22)
    shape = (2, 3, 4, 5)
    w = torch.randn(shape, generator=gen)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = MaskedSGD([ours], lr=0.1, momentum=0.9, backend=backend)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.9)
    g = torch.randn(shape, generator=gen)
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step(), sgd.step()
    other = torch.empty(shape).to(memory_format=torch.channels_last).stride()
    ours.grad = ours.grad.as_strided(shape, other)  # the same memory, other strides
    theirs.grad = ours.grad.clone()
    opt.step(), sgd.step()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_deepcopy_and_pickle_keep_the_backend():
    import copy
    import pickle
    p = torch.nn.Parameter(torch.randn(3))
    opt = MaskedSGD([p], lr=0.1, momentum=0.9, backend="torch")
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.backend == "torch"
        assert twin.param_groups[0]["momentum"] == 0.9
