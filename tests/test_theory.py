"""fastimp.theory: Lemma 3.1's intersection threshold, the largest pruning ratio, ε (Appendix B)
and the adaptive pruning ratio (Appendix F)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastimp import theory
from fastimp.hessian import SpectralDensity


def test_intersection_threshold_hand_computed():
    # λ = (2, 0.5), ε = 1, R = 1: r² = (1, 4), terms 1/2 and 4/5, d* = 2 - 1.3 = 0.7
    assert theory.intersection_threshold([2.0, 0.5], eps=1.0, R=1.0) == pytest.approx(0.7)
    # λ = 8, ε = 1, R = 0.5: r² = 1/4, term = (1/4) / (1/4 + 1/4) = 1/2
    assert theory.intersection_threshold([8.0], eps=1.0, R=0.5) == pytest.approx(0.5)
    # R = 0: the subspace passes through the minimum, every direction counts, d* = 0
    assert theory.intersection_threshold([3.0, 1.0, 7.0], eps=0.1, R=0.0) == pytest.approx(0.0)
    # R -> ∞: nothing is hit, d* -> D^A
    assert theory.intersection_threshold([3.0, 1.0], eps=0.1, R=1e9) == pytest.approx(2.0)
    # array R
    d = theory.intersection_threshold([2.0, 0.5], 1.0, np.array([0.0, 1.0]))
    np.testing.assert_allclose(d, [0.0, 0.7])


def test_nonpositive_eigenvalues_count_as_flat():
    # λ <= 0: r = ∞, term = 1 whatever R is
    for R in (0.0, 1.0, 1e6):
        assert theory.intersection_threshold([0.0, -3.0], eps=0.5, R=R) == pytest.approx(0.0)
    assert theory.intersection_threshold([2.0, 0.0, -1e-3], eps=1.0, R=1.0) == pytest.approx(
        3 - (0.5 + 1 + 1))
    # continuity from above at λ = 0
    assert theory.intersection_threshold([1e-12], 1.0, 1.0) == pytest.approx(0.0, abs=1e-9)


def test_quadrature_input_scales_by_D_A():
    nodes, weights = np.array([2.0, 0.5]), np.array([0.25, 0.75])
    # each node stands for weight * D_A eigenvalues: 1000 * (1 - 0.25/2 - 0.75*0.8)
    d = theory.intersection_threshold((nodes, weights), eps=1.0, R=1.0, D_A=1000)
    assert d == pytest.approx(1000 * (1 - 0.25 * 0.5 - 0.75 * 0.8))
    # the same spectrum as explicit eigenvalues
    eig = np.array([2.0] * 250 + [0.5] * 750)
    assert theory.intersection_threshold(eig, 1.0, 1.0) == pytest.approx(d)
    # a SpectralDensity of two runs
    sd = SpectralDensity(np.array([[2.0, 0.5], [2.0, 0.5]]), np.array([[0.25, 0.75]] * 2), 1000)
    assert theory.intersection_threshold(sd, 1.0, 1.0) == pytest.approx(d)
    with pytest.raises(ValueError, match="D_A"):
        theory.intersection_threshold((nodes, weights), 1.0, 1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        theory.intersection_threshold((nodes, 2 * weights), 1.0, 1.0, D_A=10)
    with pytest.raises(ValueError, match="eps"):
        theory.intersection_threshold([1.0], 0.0, 1.0)
    with pytest.raises(ValueError, match="R"):
        theory.intersection_threshold([1.0], 1.0, -1.0)


def test_threshold_monotone_in_R_and_eps():
    rng = np.random.default_rng(0)
    eig = np.concatenate([rng.exponential(0.01, 900), rng.exponential(5.0, 100)])
    R = np.linspace(0, 20, 50)
    d = theory.intersection_threshold(eig, 0.05, R)
    assert np.all(np.diff(d) > 0)                                   # farther: harder to hit
    assert np.all(theory.intersection_threshold(eig, 0.1, R)[1:] < d[1:])  # bigger set: easier
    sharper = theory.intersection_threshold(eig * 10, 0.05, R)
    assert np.all(sharper[1:] > d[1:])                              # sharper: harder to hit


def test_max_pruning_ratio_constant_R_and_monotonicity():
    # hand: λ = (2, 0.5), ε = 1, R = 1 -> Σ terms = 1.3, D^A = 2: f < 0.65
    assert theory.max_pruning_ratio([2.0, 0.5], 1.0, 1.0) == pytest.approx(0.65)
    rng = np.random.default_rng(1)
    eig = np.concatenate([rng.exponential(0.01, 900), rng.exponential(5.0, 100)])
    R = np.linspace(0, 30, 60)
    f = theory.max_pruning_ratio(eig, 0.05, R)
    assert f[0] == pytest.approx(1.0)
    assert np.all(np.diff(f) < 0) and np.all((f >= 0) & (f <= 1))
    # larger ε -> larger ratios; sharper spectrum -> smaller ratios
    assert np.all(theory.max_pruning_ratio(eig, 0.2, R)[1:] > f[1:])
    assert np.all(theory.max_pruning_ratio(eig * 4, 0.05, R)[1:] < f[1:])
    # the boundary satisfies (1 - f) D^A = d*
    fi = theory.max_pruning_ratio(eig, 0.05, 3.0)
    assert (1 - fi) * eig.size == pytest.approx(theory.intersection_threshold(eig, 0.05, 3.0))
    # n_prunable: only those coordinates are removed
    assert theory.max_pruning_ratio([2.0, 0.5], 1.0, 1.0, n_prunable=1.3) == pytest.approx(1.0)


def test_max_pruning_ratio_with_R_of_f():
    rng = np.random.default_rng(2)
    eig = np.concatenate([rng.exponential(0.01, 900), rng.exponential(5.0, 100)])
    eps = 0.05

    def R_of_f(f):
        return 10.0 * f                               # projection distance grows with f

    f = theory.max_pruning_ratio(eig, eps, R_of_f)
    assert 0 < f < 1
    # at the answer the condition is tight: (1 - f) D^A = d*(R(f))
    assert (1 - f) * eig.size == pytest.approx(
        theory.intersection_threshold(eig, eps, R_of_f(f)), rel=1e-6)
    assert (1 - (f + 1e-3)) * eig.size < theory.intersection_threshold(eig, eps, R_of_f(f + 1e-3))
    # a faster-growing R allows less pruning; constant R equals the closed form
    assert theory.max_pruning_ratio(eig, eps, lambda g: 20.0 * g) < f
    assert theory.max_pruning_ratio(eig, eps, lambda g: 2.0) == pytest.approx(
        theory.max_pruning_ratio(eig, eps, 2.0), abs=1e-9)
    assert theory.max_pruning_ratio(eig * 1e6, eps, lambda g: 1.0 + g) == pytest.approx(
        theory.max_pruning_ratio(eig * 1e6, eps, 1.0), abs=1e-3)


def test_train_loss_epsilon_appendix_b():
    with pytest.warns(DeprecationWarning, match="train_loss_epsilon_appendix_b"):
        assert theory.train_loss_epsilon([1.0, 2.0], [0.1, 0.3], 0.2, 1.0) == pytest.approx(0.5)
    # loss = 2 * error + 0.1 exactly; E_dense = 0.2 -> L_matching = 0.5; level loss 0.3 -> 0.2
    errors = [0.1, 0.3, 0.5, 0.25]
    losses = [2 * e + 0.1 for e in errors]
    assert theory.train_loss_epsilon_appendix_b(losses, errors, 0.2, 0.3) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="test_errors"):
        theory.train_loss_epsilon_appendix_b([1.0, 2.0], [0.1], 0.2, 0.3)
    with pytest.raises(ValueError, match="test_errors"):
        theory.train_loss_epsilon_appendix_b([1.0, 2.0], [0.1, 0.1], 0.2, 0.3)


def _trained_tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 10, generator=g)
    y = x[:, :4].argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 200, 64)]
    return model, data, float(F.cross_entropy(model(x), y).detach())


def _path_max(model, solution, masks, data, ratio, n_points=5):
    from fastimp.pruning import prune_magnitude
    net = copy.deepcopy(model)
    net.load_state_dict(solution)
    new = prune_magnitude(net, ratio, masks=masks) if masks else prune_magnitude(net, ratio)
    worst = 0.0
    for t in np.linspace(0, 1, n_points + 1)[1:]:
        state = {k: v + t * ((v * new[k]) - v) if k in new else v for k, v in solution.items()}
        net.load_state_dict(state)
        with torch.no_grad():
            x = torch.cat([b[0] for b in data])
            y = torch.cat([b[1] for b in data])
            worst = max(worst, float(F.cross_entropy(net(x), y)))
    return worst


def test_adaptive_pruning_ratio_tiny_model():
    pytest.importorskip("fastimp.pruning")
    model, data, loss = _trained_tiny()
    solution = copy.deepcopy(model.state_dict())
    scan = theory.adaptive_pruning_scan(model, solution, None, data, threshold=loss + 1e9,
                                        stop_at_first_failure=False, n_points=3)
    assert [s["ratio"] for s in scan] == pytest.approx(list(theory.DEFAULT_RATIOS))
    worst = np.array([s["max_loss"] for s in scan])
    # independent check of the path losses (a plain loop over the path)
    for s in scan[::4]:
        assert s["max_loss"] == pytest.approx(_path_max(model, solution, None, data,
                                                        s["ratio"], n_points=3), rel=1e-5)
    assert worst[-1] > worst[0] > loss - 1e-6                  # pruning more costs more
    # threshold between the losses at ratios 0.3 and 0.4 -> p = 0.3 (first failure at 0.4)
    thr = 0.5 * (worst[2] + worst[3])
    assert np.all(np.diff(worst[:4]) > 0)

    def ratio(threshold, **kw):
        return theory.adaptive_pruning_ratio(model, solution, None, data, threshold,
                                             n_points=3, **kw)
    assert ratio(thr, floor=0.0) == pytest.approx(0.3)
    assert ratio(thr) == pytest.approx(0.3)
    assert ratio(thr, floor=0.5) == pytest.approx(0.5)
    # nothing within: the floor; everything within: the largest ratio
    assert ratio(loss - 1.0) == 0.2
    assert ratio(loss + 1e9) == pytest.approx(0.9)
    # a custom loss function takes the plain loop: same answer
    assert ratio(thr, loss_fn=F.cross_entropy) == pytest.approx(0.3)
    # the solution is not modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, solution[k])


def test_adaptive_pruning_ratio_with_existing_masks():
    pytest.importorskip("fastimp.pruning")
    from fastimp.pruning import prune_magnitude
    model, data, loss = _trained_tiny(1)
    masks = prune_magnitude(model, 0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    solution = copy.deepcopy(model.state_dict())
    scan = theory.adaptive_pruning_scan(model, solution, masks, data, threshold=1e9,
                                        ratios=(0.2, 0.6), stop_at_first_failure=False,
                                        n_points=3)
    for s in scan:
        assert s["max_loss"] == pytest.approx(_path_max(model, solution, masks, data,
                                                        s["ratio"], n_points=3), rel=1e-5)
    with pytest.raises(ValueError, match="ratios"):
        theory.adaptive_pruning_ratio(model, solution, masks, data, 1.0, ratios=(0.0, 1.0))
    with pytest.raises(ValueError, match="floor"):
        theory.adaptive_pruning_ratio(model, solution, masks, data, 1.0, floor=1.5)
    with pytest.raises(ValueError, match="threshold"):
        theory.adaptive_pruning_ratio(model, solution, masks, data, float("nan"))


# -- the commands on a tiny IMP run: `fastimp hessian` and `fastimp prune-scan` (Fig. 5) --------

def test_hessian_and_prune_scan_commands(tmp_path, monkeypatch):
    pytest.importorskip("fastimp.imp")
    import json

    from fastimp import imp
    from fastimp.cli import main
    from fastimp.imp import IMPConfig
    from fastimp.training import TrainConfig
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = TrainConfig(steps=24, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                            schedule="step", milestones=(12, 18), gamma=0.1)
        cfg = IMPConfig(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=1,
                        rewind_steps=[0], replicates=1, model_kwargs={"hidden": [16]})
        run = imp.run(cfg, tmp_path, progress=False, eps=0.05)
        d = str(run.dir)
        assert main(["hessian", d, "--level", "1", "--iterations", "24", "--runs", "2",
                     "--trace-samples", "8", "--subset", "500", "--batch-size", "500",
                     "--top-n", "3"]) == 0
        out = run.analysis_dir / "hessian" / "level_1_rewind_0_rep_0"
        h = json.loads((out / "hessian.json").read_text())
        masks = run.mask(1)
        n_params = sum(p.numel() for p in run.build_model().parameters())
        assert h["D_A"] == n_params - (masks.total() - masks.remaining())
        assert len(h["eigenvalues"]) == 3 and h["eigenvalues"] == sorted(h["eigenvalues"])[::-1]
        f_max = np.asarray(h["curve"]["f_max"])
        assert f_max[0] == pytest.approx(1.0) and np.all(np.diff(f_max) <= 1e-12)
        assert h["eps"] > 0 and 0 <= h["f_max_magnitude_projection"] <= 1
        dens = SpectralDensity.load(out / "density.npz")
        assert dens.D_A == h["D_A"] and dens.nodes.shape == (2, 24)
        assert max(h["eigenvalues"]) == pytest.approx(dens.nodes.max(), rel=1e-2)
        for png in ("density.png", "threshold.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"

        assert main(["prune-scan", d, "--level", "1", "--ratios", "0.3,0.7"]) == 0
        scan_json = run.analysis_dir / "prune-scan" / "level_1_rewind_0_rep_0.json"
        scan = json.loads(scan_json.read_text())
        assert {(e["method"], e["ratio"]) for e in scan["results"]} == {
            (m, f) for m in ("magnitude", "random") for f in (0.3, 0.7)}
        for e in scan["results"]:
            assert e["R_projection"] > 0 and e["R_retrained"] > 0
            assert e["matching"] == (e["test_error"] <= scan["dense_error"] + 0.05)
        mag = {e["ratio"]: e["R_projection"] for e in scan["results"] if e["method"] == "magnitude"}
        rnd = {e["ratio"]: e["R_projection"] for e in scan["results"] if e["method"] == "random"}
        assert mag[0.3] < mag[0.7] and mag[0.3] < rnd[0.3]   # magnitude pruning moves least
        assert scan_json.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        # resumable: finished retrainings are not repeated
        from fastimp.imp.folder import Run

        def no_retrain(*a, **k):
            raise AssertionError("retrained a finished ratio")
        monkeypatch.setattr(Run, "retrain", no_retrain)
        assert main(["prune-scan", d, "--level", "1", "--ratios", "0.3,0.7"]) == 0
        assert main(["prune-scan", d, "--level", "1", "--ratios", "0,2"]) == 2   # bad input
    finally:
        torch.set_num_threads(n_threads)
