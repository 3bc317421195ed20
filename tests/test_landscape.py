"""fastimp.landscape: batched evaluation equals the one-model-at-a-time reference
(load_state_dict + evaluate) for paths, planes and extrapolation; barrier quantities."""
import math

import pytest
import torch
from torch import nn

from fastimp.landscape import (BarrierCurve, StateLayout, barrier_matrix, error_barrier, evaluate,
                               evaluate_loop, gram_schmidt, imp_step_plane, path_through, plane,
                               pruning_plane)

TOL = dict(rtol=1e-5, atol=2e-5)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def _resnet(seed):
    try:
        import fastimp.models as models
        return models.get("resnet20", num_classes=5, seed=seed, width=4)
    except (ImportError, ValueError, KeyError, TypeError):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                             nn.ReLU(), _Block(4), _Block(4), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 5))


def _trained_like(make, seed, shape):
    """A model with non-trivial BN statistics (a few train-mode forwards)."""
    m = make(seed)
    g = torch.Generator().manual_seed(seed)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, *shape, generator=g))
    return m.eval()


def _data(shape, n=(7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, *shape, generator=g), torch.randint(0, 5, (k,), generator=g)) for k in n]


def _clipped_state(layout, origin, dirs, c, lo=0.0, hi=1.0):
    """theta with clamped coefficients on the non-prunable coordinates, in float64."""
    o = origin.double()
    full = o.clone()
    clip = o.clone()
    for j, u in enumerate(dirs):
        full += c[j] * u.double()
        clip += min(max(c[j], lo), hi) * u.double()
    return layout.state_dict(torch.where(layout.prunable, full, clip).float())


MODELS = [("mlp", _mlp, (12,)), ("cnn_bn", _cnn, (3, 6, 6)), ("resnet", _resnet, (3, 8, 8))]


@pytest.mark.parametrize("name,make,shape", MODELS)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_path_with_extrapolation_matches_loop(name, make, shape, batching):
    a, b = _trained_like(make, 1, shape), _trained_like(make, 2, shape)
    data = _data(shape)
    layout = StateLayout(a)
    wa, wb = layout.flatten(a), layout.flatten(b)
    betas = [-0.5, 0.0, 0.3, 0.5, 1.0, 1.25]
    ev = evaluate(a, wa, (wb - wa)[None], torch.tensor(betas)[:, None], data,
                  clip=([0.0], [1.0]), chunk_size=4, batching=batching)
    ref = evaluate_loop(a, [_clipped_state(layout, wa, [wb - wa], [t]) for t in betas], data)
    assert ev.n == ref.n == 13
    torch.testing.assert_close(ev.loss, ref.loss, **TOL)
    torch.testing.assert_close(ev.error, ref.error, **TOL)
    # the end points are the models themselves
    assert math.isclose(ev.loss[1], evaluate_loop(a, [a.state_dict()], data).loss[0], rel_tol=1e-5)


@pytest.mark.parametrize("name,make,shape", MODELS[1:])
def test_bn_reset_matches_loop(name, make, shape):
    a, b = _trained_like(make, 3, shape), _trained_like(make, 4, shape)
    data, train = _data(shape, seed=1), _data(shape, n=(8, 8, 5), seed=2)
    layout = StateLayout(a)
    wa, wb = layout.flatten(a), layout.flatten(b)
    betas = [-0.25, 0.5, 1.5]
    states = [_clipped_state(layout, wa, [wb - wa], [t]) for t in betas]
    ref = evaluate_loop(a, states, data, bn="reset", train_data=train, bn_batches=2)
    for batching in ("vmap", "loop"):
        ev = evaluate(a, wa, (wb - wa)[None], torch.tensor(betas)[:, None], data, bn="reset",
                      train_data=train, bn_batches=2, clip=([0.0], [1.0]), batching=batching)
        torch.testing.assert_close(ev.loss, ref.loss, **TOL)
    interp = evaluate(a, wa, (wb - wa)[None], torch.tensor(betas)[:, None], data,
                      clip=([0.0], [1.0]))
    assert not torch.allclose(interp.loss, ref.loss, rtol=1e-3)  # reset really changes things


def test_chunking_and_backends_agree():
    a, b = _trained_like(_cnn, 5, (3, 6, 6)), _trained_like(_cnn, 6, (3, 6, 6))
    data = _data((3, 6, 6))
    layout = StateLayout(a)
    wa, wb = layout.flatten(a), layout.flatten(b)
    C = torch.linspace(-1, 2, 7)[:, None]
    ref = evaluate(a, wa, (wb - wa)[None], C, data, chunk_size=7, backend="torch")
    for cs in (1, 3):
        for be in ("auto", "torch"):
            ev = evaluate(a, wa, (wb - wa)[None], C, data, chunk_size=cs, backend=be)
            torch.testing.assert_close(ev.loss, ref.loss, rtol=1e-6, atol=1e-6)
    again = evaluate(a, wa, (wb - wa)[None], C, data, chunk_size=3)
    assert torch.equal(again.loss, evaluate(a, wa, (wb - wa)[None], C, data, chunk_size=3).loss)


@pytest.mark.parametrize("name,make,shape", MODELS)
def test_plane_matches_loop(name, make, shape):
    p0, p2 = _trained_like(make, 7, shape), _trained_like(make, 8, shape)
    layout = StateLayout(p0)
    w0, w2 = layout.flatten(p0), layout.flatten(p2)
    g = torch.Generator().manual_seed(0)
    keep = {n: torch.rand(p.shape, generator=g) > 0.3 for n, p in p0.named_parameters()
            if layout.prunable[[o for (nn_, _, o, _, _) in layout.entries if nn_ == n][0]]}
    data = _data(shape)
    res = imp_step_plane(p0, p0, keep, p2, data, grid=4)
    assert res.error.shape == (4, 4)
    torch.testing.assert_close(res.basis_gram, torch.eye(2, dtype=torch.float64), atol=1e-9, rtol=0)
    w1 = w0 * torch.where(layout.prunable, torch.cat([
        keep[n].reshape(-1).float() if n in keep else torch.ones(k)
        for (n, _, _, k, _) in layout.entries]), torch.ones(layout.D))
    P = layout.D_params
    d1, d2 = (w1 - w0).double(), (w2 - w0).double()
    e1, e2 = gram_schmidt(d1[:P], d2[:P])
    # the three points' coordinates reproduce their distances
    assert math.isclose(float(res.points[1].norm()), float(d1[:P].norm()), rel_tol=1e-9)
    assert math.isclose(float(res.points[2].norm()), float(d2[:P].norm()), rel_tol=1e-9)
    states = []
    for y in res.ys.tolist():
        for x in res.xs.tolist():
            A = torch.tensor([[d1[:P] @ e1, d2[:P] @ e1], [d1[:P] @ e2, d2[:P] @ e2]])
            a1, a2 = torch.linalg.solve(A, torch.tensor([x, y], dtype=torch.float64)).tolist()
            st = _clipped_state(layout, w0, [d1, d2], [a1, a2])
            # prunable coordinates lie at p0 + x e1 + y e2
            flat = layout.flatten(st).double()[:P]
            mask = layout.prunable[:P]
            expect = (w0.double()[:P] + x * e1 + y * e2)
            assert torch.allclose(flat[mask], expect[mask], atol=1e-5)
            states.append(st)
    ref = evaluate_loop(p0, states, data)
    torch.testing.assert_close(res.loss.reshape(-1), ref.loss, **TOL)
    torch.testing.assert_close(res.error.reshape(-1), ref.error, **TOL)


def test_pruning_plane_fig6():
    m = _trained_like(_mlp, 9, (12,))
    layout = StateLayout(m)
    g = torch.Generator().manual_seed(1)
    mag = {n: p.abs() > p.abs().flatten().kthvalue(max(1, int(0.2 * p.numel()))).values
           for n, p in m.named_parameters() if n.endswith("weight")}
    rnd = {n: torch.rand(p.shape, generator=g) > 0.2 for n, p in m.named_parameters()
           if n.endswith("weight")}
    res = pruning_plane(m, m, mag, rnd, _data((12,)), grid=3)
    assert res.points[0].tolist() == [0.0, 0.0]
    assert res.xs[0] == -res.xs[-1] and res.ys[0] == -res.ys[-1]  # centred, same scale
    assert torch.isfinite(res.loss).all()


def test_barrier_quantities_on_hand_made_curves():
    b = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    c = BarrierCurve(b, torch.tensor([0.1, 0.3, 0.5, 0.4, 0.3], dtype=torch.float64),
                     torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    # chord 0.1 -> 0.3: at 0.5 chord is 0.2, error 0.5 -> 0.3; at 0.75: 0.25 vs 0.4 -> 0.15
    assert math.isclose(c.barrier, 0.3)
    assert math.isclose(c.max_error, 0.5)
    assert math.isclose(c.midpoint_error, 0.5)
    assert math.isclose(c.loss_barrier, 2.0)
    convex = BarrierCurve(b, torch.tensor([0.4, 0.2, 0.1, 0.2, 0.3], dtype=torch.float64),
                          torch.zeros(5, dtype=torch.float64))
    assert convex.barrier == 0.0 and math.isclose(convex.max_error, 0.4)
    no_mid = BarrierCurve(torch.tensor([0.0, 0.4, 0.6, 1.0]), torch.tensor([0.0, 0.2, 0.4, 0.0]),
                          torch.zeros(4))
    assert math.isclose(no_mid.midpoint_error, 0.3, rel_tol=1e-6)
    outside = BarrierCurve(torch.tensor([-1.0, 0.0, 1.0, 2.0]), torch.tensor([0.9, 0.1, 0.1, 0.9]),
                           torch.zeros(4))
    assert outside.barrier == 0.0 and math.isclose(outside.max_error, 0.1, rel_tol=1e-6)
    with pytest.raises(ValueError, match="end points"):
        _ = BarrierCurve(torch.tensor([0.2, 0.5]), torch.zeros(2), torch.zeros(2)).barrier


def test_error_barrier_inputs_and_consistency():
    a, b = _trained_like(_cnn, 10, (3, 6, 6)), _trained_like(_cnn, 11, (3, 6, 6))
    data = _data((3, 6, 6))
    layout = StateLayout(a)
    r_models = error_barrier(a, a, b, data)
    r_states = error_barrier(a, a.state_dict(), b.state_dict(), data)
    r_flat = error_barrier(a, layout.flatten(a), layout.flatten(b), data)
    assert r_models.betas.tolist() == [round(0.1 * i, 1) for i in range(11)]
    torch.testing.assert_close(r_models.loss, r_states.loss)
    torch.testing.assert_close(r_models.loss, r_flat.loss)
    ref = evaluate_loop(a, [_clipped_state(layout, layout.flatten(a),
                                           [layout.flatten(b) - layout.flatten(a)], [t])
                            for t in r_models.betas.tolist()], data)
    torch.testing.assert_close(r_models.loss, ref.loss, **TOL)
    # parameters-only flat vectors: buffers come from the model argument
    P = layout.D_params
    r_p = error_barrier(a, layout.flatten(a)[:P], layout.flatten(a)[:P], data, betas=[0.5])
    assert r_p.barrier == 0.0 and torch.allclose(r_p.loss, r_p.loss[0].expand(3))
    ext = error_barrier(a, a, b, data, betas=[-0.5, 1.5])
    assert ext.betas.tolist() == [-0.5, 0.0, 1.0, 1.5]


def test_path_and_matrix():
    sols = [_trained_like(_mlp, s, (12,)) for s in (20, 21, 22)]
    data = _data((12,))
    path = path_through(sols[0], sols, data, betas=[0.5], levels=[0, 1, 2])
    assert len(path.segments) == 2 and path.positions().tolist() == [0, 0.5, 1, 1, 1.5, 2]
    single = error_barrier(sols[0], sols[1], sols[2], data, betas=[0.5])
    torch.testing.assert_close(path.segments[1].loss, single.loss, **TOL)
    M = barrier_matrix(sols[0], sols, data, betas=[0.25, 0.5, 0.75])
    assert M.max_error.shape == (3, 3) and torch.equal(M.max_error, M.max_error.T)
    c02 = error_barrier(sols[0], sols[0], sols[2], data, betas=[0.25, 0.5, 0.75])
    assert math.isclose(M.max_error[0, 2], c02.max_error, rel_tol=1e-6)
    assert math.isclose(M.barrier[0, 2], c02.barrier, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(M.midpoint_error[0, 2], c02.midpoint_error, rel_tol=1e-6)
    assert M.barrier[0, 0] == 0


def test_bad_input():
    m = _mlp(0)
    data = _data((12,))
    w = StateLayout(m).flatten(m)
    with pytest.raises(ValueError, match="bn"):
        evaluate(m, w, w[None], torch.zeros(1, 1), data, bn="recompute")
    with pytest.raises(TypeError, match="train_data"):
        evaluate(m, w, w[None], torch.zeros(1, 1), data, bn="reset")
    with pytest.raises(ValueError, match="coeffs"):
        evaluate(m, w, w[None], torch.zeros(1, 2), data)
    with pytest.raises(ValueError, match="directions"):
        evaluate(m, w, torch.zeros(1, 3), torch.zeros(1, 1), data)
    with pytest.raises(TypeError, match="data"):
        evaluate(m, w, w[None], torch.zeros(1, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="flat vector"):
        error_barrier(m, w[:5], w, data)
    with pytest.raises(ValueError, match="collinear"):
        plane(m, w, 2 * w, 3 * w, data, grid=3)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate(m, w, w[None], torch.zeros(1, 1), data, chunk_size=0)


# --- the commands on a tiny IMP run folder ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    imp = pytest.importorskip("fastimp.imp")
    from fastimp.training import TrainConfig
    train = TrainConfig(steps=24, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        schedule="step", milestones=(12, 18), gamma=0.1)
    cfg = imp.IMPConfig(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=2,
                        rewind_steps=[0], replicates=1, model_kwargs={"hidden": [16]})
    return imp.run(cfg, tmp_path_factory.mktemp("runs"), progress=False)


def test_barrier_command(tiny_run):
    import json

    from fastimp.cli import main
    assert main(["barrier", str(tiny_run.dir), "--max-examples", "200", "--betas", "0.5"]) == 0
    d = tiny_run.analysis_dir
    res = json.loads((d / "barrier.json").read_text())
    assert (d / "barrier_path.png").stat().st_size > 0 and (d / "barrier_matrix.png").exists()
    path = res["paths"]["0"]
    assert path["levels"] == [0, 1, 2] and len(path["segments"]) == 2
    # the end points of the path are the solutions, evaluated one at a time
    from fastimp.landscape.runs import load_data
    data = load_data(tiny_run, "test", 200)
    model = tiny_run.build_model()
    ref = evaluate_loop(model, [tiny_run.solution(L) for L in (0, 1, 2)], data)
    got = [path["segments"][0]["error"][0], path["segments"][1]["error"][0],
           path["segments"][1]["error"][-1]]
    assert got == pytest.approx(ref.error.tolist(), abs=1e-9)
    mid = error_barrier(model, tiny_run.solution(0), tiny_run.solution(1), data, betas=[0.5])
    assert path["segments"][0]["midpoint_error"] == pytest.approx(mid.midpoint_error, abs=1e-9)
    M = torch.tensor(res["matrix"]["max_error"])
    assert M.shape == (3, 3) and torch.allclose(M, M.T)
    assert res["matching"]["dense_error"] == pytest.approx(ref.error[0].item(), abs=1e-9)


def test_plane_commands_and_report(tiny_run):
    import json

    from fastimp.cli import main
    assert main(["plane", str(tiny_run.dir), "--level", "0", "--grid", "5",
                 "--max-examples", "200"]) == 0
    assert main(["plane", str(tiny_run.dir), "--level", "1", "--kind", "pruning", "--grid", "3",
                 "--max-examples", "200"]) == 0
    d = tiny_run.analysis_dir
    res = json.loads((d / "plane_imp_tau0_L0.json").read_text())
    assert len(res["error"]) == 5 and len(res["error"][0]) == 5
    assert (d / "plane_imp_tau0_L0.png").exists() and (d / "plane_pruning_tau0_L1.png").exists()
    # the projection's coordinates: its distance to w(0) is |w(0) - m(1) ⊙ w(0)|
    w0 = tiny_run.solution(0)
    m1 = tiny_run.mask(1)
    R = torch.sqrt(sum(((w0[n] * (~m1[n]).float()) ** 2).sum() for n in m1)).item()
    assert res["points"][1][0] == pytest.approx(R, rel=1e-5)
    assert res["points"][1][1] == pytest.approx(0, abs=1e-9 * R)
    with pytest.raises(ValueError, match="level"):
        from fastimp.landscape.runs import plane_analysis
        plane_analysis(tiny_run, 2, grid=3)  # no level 3
    pytest.importorskip("fastimp.report")
    assert main(["report", str(tiny_run.dir)]) == 0
    md = (tiny_run.dir / "report" / "report.md").read_text()
    assert "## Fig. 3" in md and "fig3_plane_imp_tau0_L0.png" in md
    assert "## Fig. 6" in md and "fig6_plane_pruning_tau0_L1.png" in md


def test_empty_and_iterator_data():
    m = _mlp(1)
    w = StateLayout(m).flatten(m)
    data = _data((12,))
    ev = evaluate(m, w, w[None], torch.zeros(0, 1), data)
    assert ev.error.shape == (0,) and ev.n == 0
    once = evaluate(m, w, w[None], torch.tensor([[0.0], [0.5]]), iter(data), chunk_size=1)
    twice = evaluate(m, w, w[None], torch.tensor([[0.0], [0.5]]), data, chunk_size=1)
    assert torch.equal(once.loss, twice.loss)


@pytest.mark.gpu
def test_cuda_equals_cpu():
    a, b = _trained_like(_cnn, 30, (3, 6, 6)), _trained_like(_cnn, 31, (3, 6, 6))
    data = _data((3, 6, 6))
    cpu = error_barrier(a, a, b, data, betas=[-0.5, 0.5, 1.5])
    gpu = error_barrier(a, a, b, data, betas=[-0.5, 0.5, 1.5], device="cuda")
    torch.testing.assert_close(gpu.loss, cpu.loss, rtol=1e-4, atol=1e-4)


def test_auto_batching_policy():
    from fastimp.landscape import auto_batching
    assert auto_batching(_mlp(0), "cpu", 512) == "loop"
    assert auto_batching(_mlp(0), "cpu", 16) == "vmap"
    assert auto_batching(_cnn(0), "cpu", 512) == "loop"
    assert auto_batching(_cnn(0), "cpu", 8) == "vmap"
    assert auto_batching(_cnn(0), "cuda", 512) == "vmap"
    with pytest.raises(ValueError, match="batching"):
        evaluate(_mlp(0), StateLayout(_mlp(0)).flatten(_mlp(0)), torch.zeros(0, 293),
                 torch.zeros(1, 0), _data((12,)), batching="grouped")


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_repeated_calls_leave_the_model_alone_and_follow_new_origins(batching):
    """evaluate() keeps a private working copy per model: the user's model is never written, and
    a second call with other weights must not see the first call's."""
    model = _trained_like(_cnn, 3, (3, 6, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = StateLayout(model)
    data = _data((3, 6, 6))
    for seed in (4, 5):
        other = _trained_like(_cnn, seed, (3, 6, 6))
        w = layout.flatten(other)
        got = evaluate(model, w, torch.zeros(1, layout.D), torch.zeros(2, 1), data,
                       batching=batching)
        ref = evaluate_loop(model, [other.state_dict()], data)
        torch.testing.assert_close(got.loss[0], ref.loss[0], **TOL)
        assert got.error[0] == ref.error[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
