"""fastimp.analysis on tiny IMP runs: every new quantity against a direct computation (rho, the
perturbation's support, the weight CDFs, finetuning's lr and decay per step), replicate means,
Fig. 10's comparison, and `fastimp paper` (resume, the report's sections)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from fastimp import imp
from fastimp.imp import IMPConfig
from fastimp.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = 24


def tiny(**kw):
    train = TrainConfig(steps=T, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        schedule="step", milestones=(12, 18), gamma=0.1)
    base = dict(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=2,
                rewind_steps=[0, 6], replicates=2, model_kwargs={"hidden": [16]},
                finetune_lr=0.003, finetune_weight_decay=0.0)
    base.update(kw)
    return IMPConfig(**base)


@pytest.fixture(scope="module")
def wr_run(tmp_path_factory):
    return imp.run(tiny(), tmp_path_factory.mktemp("wr"), progress=False)


@pytest.fixture
def run_copy(wr_run, tmp_path):
    """A private copy of the WR run folder (analyses write into it)."""
    dst = tmp_path / wr_run.dir.name
    shutil.copytree(wr_run.dir, dst)
    return imp.load_run(dst)


class RetrainSpy:
    """Wraps Run.retrain: records its calls (list form) and what it returned."""

    def __init__(self, monkeypatch, fail=False):
        from fastimp.imp.folder import Run
        self.calls, self.fail, real = [], fail, Run.retrain

        def spy(run, masks, *a, **kw):
            if self.fail:
                raise AssertionError("retrained although the results were there")
            out = real(run, masks, *a, **kw)
            self.calls.append(dict(masks=masks, kw=kw, out=out))
            return out
        monkeypatch.setattr(Run, "retrain", spy)


# ------------------------------------------------------------------------ finetuning config
MAIN_HASHES = {  # folder hashes before finetune_lr / finetune_weight_decay existed
    "cifar10-resnet20": ("537bf9fda23e", "c0d68ea60ceb", "82eb92ded081"),
    "cifar100-resnet18": ("b0dea6444f64", "ab0312de66e6", "29039e1412c3"),
    "imagenet-resnet50": ("e8c5b1b7f50b", "f377a197ed1e", "6d20f5497cc9"),
    "mnist1d": ("b57e35ae1742", "3392b1d94099", "6fc3cf4a7dd6"),
}


@pytest.mark.parametrize("name", sorted(MAIN_HASHES))
def test_finetune_fields_keep_existing_folder_names(name):
    from fastimp import presets
    wr, lrr, ft = MAIN_HASHES[name]
    c = presets.get(name)
    # Appendix B: lr = peak lr / 100, constant, weight decay off
    assert c.finetune_lr == pytest.approx(c.train.lr / 100) and c.finetune_weight_decay == 0.0
    assert c.hash() == wr and c.replace(strategy="lrr").hash() == lrr
    assert c.replace(finetune_lr=0.5).hash() == wr          # not hashed unless strategy is ft
    # FT runs: the fields decide the results, so they are hashed when set; unset = today's FT
    assert c.replace(strategy="ft", finetune_lr=None, finetune_weight_decay=None).hash() == ft
    assert c.replace(strategy="ft").hash() != ft
    assert c.replace(strategy="ft").hash() != c.replace(strategy="ft", finetune_lr=0.5).hash()


def test_finetune_field_validation_and_overrides():
    c = tiny().with_overrides(["finetune_lr=null", "finetune_weight_decay=1e-4"])
    assert c.finetune_lr is None and c.finetune_weight_decay == 1e-4
    for bad in (-1.0, float("nan"), float("inf"), True, "x"):
        with pytest.raises(ValueError, match="finetune_lr"):
            tiny(finetune_lr=bad)


def _record_lr_wd(calls):
    def on_step(step, model, optimizer):
        g = optimizer.param_groups[0]
        calls.append((step, float(g["lr"]), float(g["weight_decay"])))
    return on_step


@pytest.mark.parametrize("fields", [(0.003, 0.0), (None, None)])
def test_finetuning_lr_and_decay_per_step(tmp_path, monkeypatch, fields):
    lr, wd = fields
    cfg = tiny(strategy="ft", levels=1, rewind_steps=[0], replicates=1, finetune_lr=lr,
               finetune_weight_decay=wd)
    seen = []
    run = imp.run(cfg, tmp_path, progress=False, on_step=_record_lr_wd(seen))
    # on_step runs after step s - 1 has been taken with the lr of step s - 1 (the scheduler has
    # stepped already): check the decay, and the lr the step used from the schedule's position
    level0 = [c for c in seen if c[0] <= T]
    ft = [c for c in seen if c[0] > T]
    assert len(level0) == T and len(ft) == T
    assert all(w == 5e-4 for _, _, w in level0)
    if lr is None:  # today's IMP-FT: the schedule's final lr, the run's decay
        assert all(l_ == pytest.approx(0.05 * 0.01) and w == 5e-4 for _, l_, w in ft)
    else:           # Appendix B: constant finetuning lr, decay off
        assert all(l_ == pytest.approx(lr) and w == 0.0 for _, l_, w in ft)
    assert run.stats(1)["start_step"] == T and run.stats(1)["end_step"] == 2 * T
    # Run.retrain(strategy="ft") (the FT branch of Figs. 7, 9) trains with the same settings
    from fastimp import training
    used = []
    real = training.train

    def spy(model, cfg_, loader, **kw):
        used.append((cfg_, kw["start_step"], kw["end_step"]))
        return real(model, cfg_, loader, **kw)
    monkeypatch.setattr(training, "train", spy)
    run.retrain(run.mask(1), level=0, strategy="ft")
    c, s0, s1 = used[0]
    assert (s0, s1) == (T, 2 * T)
    mult = [c.lr_at(s) for s in range(s0, s1)]
    if lr is None:
        assert c.weight_decay == 5e-4 and mult == pytest.approx([0.05 * 0.01] * T)
    else:
        assert c.weight_decay == 0.0 and c.schedule == "constant" and mult == pytest.approx([lr] * T)


# ------------------------------------------------------------------------------- Fig. 4
def test_perturbation_support_on_a_network_with_batchnorm():
    from fastimp import models, prune_magnitude
    from fastimp.analysis.robustness import perturbed_start, rho
    model = models.get("cifar_resnet_20", seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = prune_magnitude(model, 0.5)
    nxt = prune_magnitude(model, 0.3, masks=mask)
    R = rho(state, mask, nxt)
    direct = math.sqrt(sum(float((state[n].double() * (mask[n] & ~nxt[n])).pow(2).sum())
                           for n in mask))
    assert R == pytest.approx(direct, rel=1e-12) and R > 0
    start = perturbed_start(state, mask, R, torch.Generator().manual_seed(0))
    assert set(start) == set(state)
    bn_or_bias = [k for k in state if k not in mask]
    assert any("bn" in k for k in bn_or_bias) and "fc.bias" in bn_or_bias
    for k in bn_or_bias:                       # no bias, BN parameter or buffer moves
        assert torch.equal(start[k], state[k])
    sq = 0.0
    for n, m in mask.items():
        v = start[n].double() - state[n].double() * m
        assert torch.all(start[n][~m] == 0)    # pruned coordinates stay at 0
        assert torch.all(v[m] != 0)            # every unpruned prunable coordinate moves
        sq += float(v.pow(2).sum())
    assert math.sqrt(sq) == pytest.approx(R, rel=1e-5)


def test_robustness_against_direct_computation(run_copy, monkeypatch):
    from fastimp.analysis import paths
    from fastimp.analysis.common import load_data
    from fastimp.analysis.robustness import robustness_analysis
    from fastimp.landscape import error_barrier
    run = run_copy
    spy = RetrainSpy(monkeypatch)
    out = robustness_analysis(run, levels=[1], perturbations=2, max_examples=300)
    data = load_data(run, "test", 300)
    model = run.build_model()
    # one list per (rewind step, level): the perturbations of every replicate
    assert [c["kw"]["rewind_step"] for c in spy.calls] == [0, 6]
    for call in spy.calls:
        tau = call["kw"]["rewind_step"]
        assert call["kw"]["strategy"] == "wr" and call["kw"]["replicate"] == [0, 0, 1, 1]
        for r in (0, 1):
            w_tau, m1, m2 = run.rewind_state(tau, r), run.mask(1, tau, r), run.mask(2, tau, r)
            mine = [2 * r, 2 * r + 1]
            assert all(call["masks"][i] == m1 for i in mine)
            rho = math.sqrt(sum(float((w_tau[n] * m1[n] - w_tau[n] * m2[n]).double().pow(2).sum())
                                for n in m1))
            part = json.loads(paths.robustness_part(run, tau, 1, r).read_text())
            assert part["rho"] == pytest.approx(rho, rel=1e-9)
            for i in mine:
                start = call["kw"]["start"][i]
                v = {n: start[n].double() - w_tau[n].double() * m1[n] for n in m1}
                assert math.sqrt(sum(float(x.pow(2).sum()) for x in v.values())) == \
                    pytest.approx(rho, rel=1e-5)
                assert all(torch.all(v[n][~m1[n]] == 0) for n in m1)
                assert all(torch.equal(start[k], w_tau[k]) for k in w_tau if k not in m1)
            w1, w2 = run.solution(1, tau, r), run.solution(2, tau, r)
            blue = error_barrier(model, w1, w2, data, betas=[0.5]).midpoint_error
            orange = [error_barrier(model, w1, call["out"][i][0], data, betas=[0.5]).midpoint_error
                      for i in mine]
            assert part["blue_midpoint_error"] == pytest.approx(blue, abs=1e-12)
            assert part["orange_midpoint_error"] == pytest.approx(orange, abs=1e-12)
            assert part["perturbed_test_error"] == [call["out"][i][1]["test_error"] for i in mine]
    for tau in ("0", "6"):
        row, = out["rewind_steps"][tau]
        parts = [json.loads(paths.robustness_part(run, int(tau), 1, r).read_text()) for r in (0, 1)]
        assert row["blue"]["mean"] == pytest.approx(np.mean([p["blue_midpoint_error"]
                                                             for p in parts]))
        orange = [e for p in parts for e in p["orange_midpoint_error"]]
        assert row["orange"]["mean"] == pytest.approx(np.mean(orange))
        assert row["orange"]["std"] == pytest.approx(np.std(orange, ddof=1))
        assert row["raw"]["orange"] == [p["orange_midpoint_error"] for p in parts]
    saved = json.loads(paths.robustness_json(run).read_text())
    assert saved["rewind_steps"]["6"][0]["rho"]["mean"] == out["rewind_steps"]["6"][0]["rho"]["mean"]
    assert paths.robustness_png(run).read_bytes()[:4] == b"\x89PNG"
    # a rerun trains nothing; another level trains only that level
    spy.fail = True
    again = robustness_analysis(run, levels=[1], perturbations=2, max_examples=300)
    assert again["rewind_steps"] == out["rewind_steps"]


# --------------------------------------------------------------------------- Figs. 7, 9
def _cdf_direct(state, masks, x):
    u = np.concatenate([state[n].double().abs()[m].numpy() for n, m in masks.items()])
    u = u / u.mean()
    return np.array([(u <= xi).mean() for xi in x]), np.quantile(u, 0.2)


def test_weight_cdfs_against_direct_computation(run_copy, monkeypatch):
    from fastimp.analysis import branches, paths
    from fastimp.analysis.weights import weights_analysis
    run = run_copy
    spy = RetrainSpy(monkeypatch)
    out = weights_analysis(run, levels=[1, 2])
    assert out["rewind_step"] == 6 and [row["level"] for row in out["levels"]] == [1, 2]
    # the two strategies the WR run did not run, each as one list over (level, replicate)
    assert sorted(c["kw"]["strategy"] for c in spy.calls) == ["ft", "lrr"]
    x = np.asarray(branches.CDF_GRID)
    for call in spy.calls:
        s = call["kw"]["strategy"]
        assert call["kw"]["level"] == [0, 0, 1, 1] and call["kw"]["replicate"] == [0, 1, 0, 1]
        for i, (L, r) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
            assert call["masks"][i] == run.mask(L, 6, r)
            b = json.loads(paths.branch_json(run, 6, L, r, s).read_text())
            cdf, q20 = _cdf_direct(call["out"][i][0], run.mask(L, 6, r), x)
            np.testing.assert_allclose(b["cdf"], cdf, atol=1e-12)
            assert b["q20"] == pytest.approx(q20) and b["source"] == "retrained"
            assert b["test_error"] == call["out"][i][1]["test_error"]
        if s == "ft":
            assert b["params"]["finetune_lr"] == 0.003
    for L in (1, 2):
        per_rep = []
        for r in (0, 1):
            m = run.mask(L, 6, r)
            prev = run.solution(L - 1, 6, r)
            proj = {n: prev[n] * m[n] for n in m}
            b = json.loads(paths.branch_json(run, 6, L, r, "projection").read_text())
            cdf, q20 = _cdf_direct(proj, m, x)
            np.testing.assert_allclose(b["cdf"], cdf, atol=1e-12)
            # the projection's CDF is flat at 0 below the smallest kept weight
            assert b["cdf"][0] == 0
            own = json.loads(paths.branch_json(run, 6, L, r, "wr").read_text())
            cdf_wr, q20_wr = _cdf_direct(run.solution(L, 6, r), m, x)
            np.testing.assert_allclose(own["cdf"], cdf_wr, atol=1e-12)
            assert own["source"] == "run" and own["test_error"] == run.stats(L, 6, r)["test_error"]
            per_rep.append(cdf_wr)
        row = next(row for row in out["levels"] if row["level"] == L)
        np.testing.assert_allclose(row["wr"]["cdf"], np.mean(per_rep, 0), atol=1e-12)
    for png in paths.weights_pngs(run):
        assert png.read_bytes()[:4] == b"\x89PNG"
    spy.fail = True                       # resumable: nothing is retrained
    weights_analysis(run, levels=[1, 2])


# ------------------------------------------------------------------------------- Fig. 8
def test_lrr_masks_rewound(tmp_path, monkeypatch, wr_run):
    from fastimp.analysis.lrr_rewound import lrr_rewound_analysis
    with pytest.raises(ValueError, match="IMP-LRR"):
        lrr_rewound_analysis(wr_run)
    run = imp.run(tiny(strategy="lrr", levels=1, rewind_steps=[6]), tmp_path, progress=False)
    spy = RetrainSpy(monkeypatch)
    out = lrr_rewound_analysis(run)
    call, = spy.calls
    assert call["kw"]["strategy"] == "wr" and call["kw"]["rewind_step"] == [6, 6]
    assert [m == run.mask(1, 6, r) for r, m in enumerate(call["masks"])] == [True, True]
    row, = out["rewind_steps"]["6"]
    errs = [st["test_error"] for _, st in call["out"]]
    assert row["rewound"]["test_error"]["mean"] == pytest.approx(np.mean(errs))
    assert row["lrr"]["test_error"]["mean"] == pytest.approx(
        np.mean([run.stats(1, 6, r)["test_error"] for r in (0, 1)]))
    # the report draws Fig. 8 for an LRR run
    from fastimp.report import write_report
    md = write_report(run.dir).read_text()
    assert "## Fig. 8" in md and "fig8_lrr_rewound.png" in md


# -------------------------------------------------------- replicate means (Figs. 2, 3, 6)
def test_barriers_and_planes_average_replicates(run_copy):
    from fastimp.analysis import paths
    from fastimp.analysis.barriers import barrier_analysis
    from fastimp.analysis.planes import plane_analysis
    run = run_copy
    out = barrier_analysis(run, max_examples=200, betas=[0.5])
    assert out["replicates"] == [0, 1] and len(out["per_replicate"]) == 2
    for tau in ("0", "6"):
        seg = out["paths"][tau]["segments"][0]
        reps = [p["paths"][tau]["segments"][0] for p in out["per_replicate"]]
        assert seg["error"] == pytest.approx(np.mean([s["error"] for s in reps], 0).tolist())
        assert seg["barrier_std"] == pytest.approx(np.std([s["barrier"] for s in reps], ddof=1))
    M = np.mean([p["matrix"]["max_error"] for p in out["per_replicate"]], 0)
    np.testing.assert_allclose(out["matrix"]["max_error"], M)
    res = plane_analysis(run, 1, grid=5, max_examples=200)
    reps = [json.loads(paths.plane_json(run, "imp", 1, 0, r).read_text()) for r in (0, 1)]
    assert reps[0]["points"] == reps[1]["points"] == res["points"]   # one shared frame
    np.testing.assert_allclose(res["error"], np.mean([r["error"] for r in reps], 0))
    for r, rep in enumerate(reps):   # each replicate keeps its own geometry
        w, m = run.solution(1, 0, r), run.mask(2, 0, r)
        R = math.sqrt(sum(float((w[n] * ~m[n]).double().pow(2).sum()) for n in m))
        assert rep["own_points"][1][0] == pytest.approx(R, rel=1e-5)
        assert rep["point_error"][0] == pytest.approx(run_error(run, w), abs=1e-12)
    frame = np.mean([[[r["own_points"][1][0], r["own_points"][2][0]],
                      [r["own_points"][1][1], r["own_points"][2][1]]] for r in reps], 0)
    np.testing.assert_allclose(res["points"][1], frame[:, 0], rtol=1e-6)
    np.testing.assert_allclose(res["points"][2], frame[:, 1], rtol=1e-6)


def test_plane_command_does_every_level_in_one_call(run_copy, capsys):
    from fastimp.analysis import paths
    from fastimp.cli import main
    run = run_copy
    assert main(["plane", str(run.dir), "--grid", "3", "--max-examples", "100"]) == 0
    assert sorted(p.name for p in paths.plane_jsons(run, "imp")) == \
        ["plane_imp_tau0_L0.json", "plane_imp_tau0_L1.json"]     # every L with an L + 1
    assert main(["plane", str(run.dir), "--kind", "pruning", "--level", "all", "--rewind-step",
                 "6", "--grid", "3", "--max-examples", "100", "--replicate", "1"]) == 0
    names = sorted(p.name for p in paths.plane_jsons(run, "pruning"))
    assert names == [f"plane_pruning_tau6_L{L}.json" for L in (0, 1, 2)]
    assert json.loads((run.dir / "analysis" / names[0]).read_text())["replicates"] == [1]
    assert main(["plane", str(run.dir), "--level", "2", "--grid", "3"]) == 2   # no level 3
    assert "level 3" in capsys.readouterr().err


def run_error(run, state, n=200):
    from fastimp.analysis.common import load_data
    from fastimp.training import evaluate
    model = run.build_model()
    model.load_state_dict(state)
    return evaluate(model, load_data(run, "test", n))[0]


# ------------------------------------------------------------------------------- Fig. 5
def test_nonpositive_choice_is_named_and_recorded():
    from fastimp import theory
    # λ = (2, -1) with weights (0.5, 0.5), D_A = 2, ε = 1, R = 1: term(2) = 1/2
    spec = (np.array([2.0, -1.0]), np.array([0.5, 0.5]))
    flat = theory.intersection_threshold(spec, 1.0, 1.0, D_A=2)                  # 2 - (1/2 + 1)
    excl = theory.intersection_threshold(spec, 1.0, 1.0, D_A=2, nonpositive="exclude")  # 2 - 1
    assert flat == pytest.approx(0.5) and excl == pytest.approx(1.0)
    assert theory.nonpositive_weight(spec, D_A=2) == pytest.approx(0.5)
    assert theory.max_pruning_ratio(spec, 1.0, 1.0, D_A=2, nonpositive="exclude") == \
        pytest.approx(0.5)
    with pytest.raises(ValueError, match="nonpositive"):
        theory.intersection_threshold(spec, 1.0, 1.0, D_A=2, nonpositive="drop")
    with pytest.raises(ValueError, match="no positive"):
        theory.intersection_threshold([-1.0, 0.0], 1.0, 1.0, nonpositive="exclude")


# ------------------------------------------------------------------------------ Fig. 10
def test_report_overlays_runs_that_differ_in_ratio(tmp_path, wr_run, capsys):
    from fastimp.cli import main
    cfg = tiny(rewind_steps=[6], replicates=1)
    a = imp.run(cfg, tmp_path, progress=False, eps=0.05)
    b = imp.run(cfg.replace(pruning_fraction=0.5), tmp_path, progress=False, eps=0.05)
    c = imp.run(cfg.replace(train=cfg.train.replace(lr=0.02)), tmp_path / "other",
                progress=False)
    assert main(["report", str(a.dir), str(b.dir)]) == 0
    md = (a.dir / "report" / "report.md").read_text()
    assert "## Fig. 10" in md and a.dir.name in md and b.dir.name in md
    assert "fixed ratio 50%" in md and "fixed ratio 20%" in md
    assert (a.dir / "report" / "fig10_compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(a.dir), str(c.dir)]) == 2
    assert "differs" in capsys.readouterr().err
    # without DIR2 the runs next to DIR that differ only in the ratio are found
    from fastimp.analysis.compare import siblings
    assert [r.dir for r in siblings(a)] == [b.dir]
    assert "## Fig. 10" in (a.dir / "report" / "report.md").read_text()


# ------------------------------------------------------------------------- fastimp paper
@pytest.mark.slow
def test_paper_command_resumes_and_reports_every_figure(run_copy, monkeypatch, capsys):
    from fastimp.analysis import paths
    from fastimp.analysis import paper as paper_mod
    from fastimp.cli import main
    # --quick, smaller still (the code paths are the same)
    monkeypatch.setitem(paper_mod.QUICK, "grid", 5)
    monkeypatch.setitem(paper_mod.QUICK, "hessian", {"top_n": 2, "iterations": 8, "runs": 1,
                                                     "trace_samples": 4, "subset": 300})
    run = run_copy
    args = ["paper", str(run.dir), "--quick", "--levels", "1", "--max-examples", "200",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Figures not made: Fig. 8" in out
    md = (run.dir / "report" / "report.md").read_text()
    for fig in (2, 3, 4, 5, 6, 7, 9, 11):
        assert f"## Fig. {fig}:" in md
    assert md.index("## Fig. 2:") < md.index("## Fig. 5:") < md.index("## Fig. 11:")
    note = next(line for line in md.splitlines() if line.startswith("Figures not made"))
    assert "Fig. 8 (needs an IMP-LRR run" in note and "Fig. 10 (needs runs" in note
    for png in (run.dir / "report").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    for name in ("fig2_paths.png", "fig4_robustness.png", "fig7_cdf.png", "fig9_q20.png",
                 "fig3_plane_imp_tau6_L1.png", "fig6_plane_pruning_tau6_L1.png"):
        assert (run.dir / "report" / name).exists(), name
    assert "| 6 | 1 |" in md                             # the tables carry the numbers
    steps = json.loads(paths.paper_json(run).read_text())["steps"]
    assert steps["lrr_rewound"].startswith("not applicable")
    assert all(steps[s] == "done" for s in steps if s != "lrr_rewound")
    h = json.loads((paths.hessian_dir(run, 1, 6, 0) / "hessian.json").read_text())
    assert h["nonpositive"] == "flat" and "eps_source" in h and 'λ ≤ 0' in md

    # a rerun does nothing but the report: no training, Hessian or landscape evaluation
    spy = RetrainSpy(monkeypatch, fail=True)

    def boom(*a, **k):
        raise AssertionError("recomputed an analysis that was there")
    import fastimp.analysis.barriers as barriers
    import fastimp.analysis.hessian as hessian
    import fastimp.analysis.planes as planes
    monkeypatch.setattr(barriers, "path_through", boom)
    monkeypatch.setattr(planes, "plane", boom)
    monkeypatch.setattr(hessian, "_one", boom)
    assert main(args) == 0
    # only what is missing: one robustness part and one replicate's plane
    paths.robustness_part(run, 6, 1, 1).unlink()
    paths.plane_json(run, "imp", 1, 0, 0).unlink()
    spy.fail = False
    calls = []
    from fastimp.landscape.plane import plane as real_plane

    def counted(*a, **k):
        calls.append(1)
        return real_plane(*a, **k)
    monkeypatch.setattr(planes, "plane", counted)
    assert main(args) == 0
    assert [(c["kw"]["rewind_step"], c["kw"]["replicate"]) for c in spy.calls] == [(6, [1, 1])]
    assert len(calls) == 1


# ------------------------------------------------------ summaries, resume, commands (audit)
@pytest.fixture(scope="module")
def lrr_run(tmp_path_factory):
    return imp.run(tiny(strategy="lrr", levels=1), tmp_path_factory.mktemp("lrr"), progress=False)


def _copy(run, tmp_path):
    dst = tmp_path / run.dir.name
    shutil.copytree(run.dir, dst)
    return imp.load_run(dst)


def test_summaries_are_the_union_of_every_call(run_copy):
    """A later, narrower call keeps the rows of earlier ones in robustness.json and weights.json
    (and so in the report)."""
    from fastimp.analysis import paths
    from fastimp.analysis.robustness import robustness_analysis
    from fastimp.analysis.weights import weights_analysis
    from fastimp.report import write_report
    run = run_copy
    kw = dict(perturbations=1, max_examples=200)
    robustness_analysis(run, levels=[0, 1], rewind_steps=[0], **kw)
    out = robustness_analysis(run, levels=[1], rewind_steps=[6], **kw)
    got = {t: [row["level"] for row in rows] for t, rows in out["rewind_steps"].items()}
    assert got == {"0": [0, 1], "6": [1]}
    assert json.loads(paths.robustness_json(run).read_text())["rewind_steps"] == \
        out["rewind_steps"]
    for t, L in ((0, 0), (0, 1), (6, 1)):       # each row from its part files
        row = next(r for r in out["rewind_steps"][str(t)] if r["level"] == L)
        parts = [json.loads(paths.robustness_part(run, t, L, r).read_text()) for r in (0, 1)]
        assert row["blue"]["mean"] == pytest.approx(
            np.mean([p["blue_midpoint_error"] for p in parts]))
    md = write_report(run.dir).read_text()
    fig4 = md[md.index("## Fig. 4"):].split("\n## ")[0]
    assert sum(line.startswith(("| 0 |", "| 6 |")) for line in fig4.splitlines()) == 3
    weights_analysis(run, levels=[1])
    w = weights_analysis(run, levels=[2])
    assert [row["level"] for row in w["levels"]] == [1, 2]
    assert all(row[s] is not None for row in w["levels"] for s in ("projection", "wr", "lrr", "ft"))
    assert [row["level"] for row in json.loads(paths.weights_json(run).read_text())["levels"]] \
        == [1, 2]


def test_lrr_rewound_summary_and_command(lrr_run, wr_run, tmp_path, capsys):
    from fastimp.analysis import paths
    from fastimp.analysis.lrr_rewound import lrr_rewound_analysis
    from fastimp.cli import main
    run = _copy(lrr_run, tmp_path)
    lrr_rewound_analysis(run, rewind_steps=[0])
    out = lrr_rewound_analysis(run, rewind_steps=[6])
    assert {t: [r["level"] for r in rows] for t, rows in out["rewind_steps"].items()} == \
        {"0": [1], "6": [1]}
    row, = out["rewind_steps"]["0"]
    b = [json.loads(paths.branch_json(run, 0, 1, r, "wr").read_text()) for r in (0, 1)]
    assert row["rewound"]["test_error"]["mean"] == pytest.approx(np.mean([x["test_error"]
                                                                          for x in b]))
    paths.lrr_rewound_json(run).unlink()
    assert main(["lrr-rewound", str(run.dir), "--rewind-step", "6"]) == 0   # read back
    saved = json.loads(paths.lrr_rewound_json(run).read_text())
    assert sorted(saved["rewind_steps"]) == ["0", "6"]
    assert str(paths.lrr_rewound_json(run)) in capsys.readouterr().out
    assert main(["lrr-rewound", str(wr_run.dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "IMP-LRR" in err and "error" in err


def test_paper_checks_compare_before_any_step(run_copy, tmp_path, monkeypatch, capsys):
    from fastimp.analysis import paper as paper_mod
    from fastimp.cli import main

    def boom(*a, **k):
        raise AssertionError("an analysis ran before --compare was checked")
    monkeypatch.setattr(paper_mod, "_plan", boom)
    cfg = tiny(rewind_steps=[6], replicates=1, levels=1)
    other = imp.run(cfg.replace(train=cfg.train.replace(lr=0.02)), tmp_path / "o", progress=False)
    apart = imp.run(tiny(rewind_steps=[3], levels=1), tmp_path / "a", progress=False)
    for bad, words in (([str(other.dir)], "differs"), ([str(tmp_path / "nothing")], "nothing"),
                       ([str(apart.dir)], "no rewind step common")):
        assert main(["paper", str(run_copy.dir), "--compare", *bad, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err
    assert not (run_copy.dir / "report").exists()


def test_prune_scan_means_and_changed_tolerance(run_copy, monkeypatch):
    from fastimp.analysis import paths
    from fastimp.analysis.prune_scan import prune_scan_analysis
    run = run_copy
    kw = dict(rewind_step=6, ratios=(0.5, 0.9), log=lambda *a: None)
    mean = prune_scan_analysis(run, 1, eps_matching=1.0, **kw)
    reps = [json.loads(paths.prune_scan_json(run, 1, 6, r).read_text()) for r in (0, 1)]
    assert mean["replicates"] == [0, 1] and len(mean["results"]) == 4
    for row in mean["results"]:
        es = [next(e for e in s["results"] if (e["method"], e["ratio"]) ==
                   (row["method"], row["ratio"])) for s in reps]
        for k in ("test_error", "R_projection", "R_retrained", "train_loss"):
            assert row[k] == pytest.approx(np.mean([e[k] for e in es]))
            assert row[k + "_std"] == pytest.approx(np.std([e[k] for e in es], ddof=1))
        assert row["replicates"] == 2 and row["matching_replicates"] == 2   # eps 1: all match
    eps_train = [s["eps_train"] for s in reps if s["eps_train"] is not None]
    if eps_train:
        assert mean["eps_train"] == pytest.approx(np.mean(eps_train))
    dense = mean["dense_error"]
    errs = [e["test_error"] for s in reps for e in s["results"]]
    assert max(errs) > dense
    eps = (max(errs) - dense) / 2                      # some match, some do not
    RetrainSpy(monkeypatch, fail=True)                 # a new tolerance retrains nothing
    mean = prune_scan_analysis(run, 1, eps_matching=eps, **kw)
    reps = [json.loads(paths.prune_scan_json(run, 1, 6, r).read_text()) for r in (0, 1)]
    flags = [e["matching"] for s in reps for e in s["results"]]
    assert flags == [e <= dense + eps for e in errs] and not all(flags)
    assert all(s["eps_matching"] == eps for s in reps) and mean["eps_matching"] == eps
    for row in mean["results"]:
        es = [e for s in reps for e in s["results"] if (e["method"], e["ratio"]) ==
              (row["method"], row["ratio"])]
        assert row["matching_replicates"] == sum(e["matching"] for e in es)
        assert row["matching"] == (row["test_error"] <= dense + eps)


def test_hessian_means_and_a_new_nonpositive_keeps_the_spectrum(run_copy, monkeypatch):
    from fastimp import theory
    from fastimp.analysis import hessian, paths
    from fastimp.hessian import SpectralDensity
    run = run_copy
    kw = dict(rewind_step=6, top_n=2, iterations=8, runs=1, trace_samples=4, subset=300,
              eps=0.05, log=lambda *a: None)
    mean = hessian.hessian_analysis(run, 1, **kw)
    hs = [json.loads(paths.hessian_json(run, 1, 6, r).read_text()) for r in (0, 1)]
    assert json.loads(paths.hessian_summary_json(run, 1, 6).read_text()) == mean
    assert mean["replicates"] == [0, 1]
    for key, vals in (("top_eigenvalue", [h["eigenvalues"][0] for h in hs]),
                      ("trace", [h["trace"] for h in hs]),
                      ("f_max_magnitude_projection", [h["f_max_magnitude_projection"]
                                                      for h in hs])):
        assert mean[key]["mean"] == pytest.approx(np.mean(vals))
        assert mean[key]["std"] == pytest.approx(np.std(vals, ddof=1))
    R = np.asarray(mean["curve"]["R"])
    assert R[-1] == pytest.approx(max(max(h["curve"]["R"]) for h in hs))
    curves = []
    for r, h in enumerate(hs):
        dens = SpectralDensity.load(paths.hessian_density(run, 1, 6, r))
        curves.append(theory.max_pruning_ratio(dens, 0.05, R, n_prunable=h["n_prunable_remaining"]))
    np.testing.assert_allclose(mean["curve"]["f_max"], np.mean(curves, 0), atol=1e-12)
    np.testing.assert_allclose(mean["curve"]["f_max_std"], np.std(curves, 0, ddof=1), atol=1e-12)
    # only the threshold depends on the choice for λ <= 0 and on ε: the spectrum is kept
    from fastimp import hessian as hessian_pkg

    def boom(*a, **k):
        raise AssertionError("recomputed the Hessian spectrum")
    monkeypatch.setattr(hessian_pkg, "Hessian", boom)
    for resume in (False, True):   # `fastimp hessian` (no resume), then a resumed rerun
        again = hessian.hessian_analysis(run, 1, nonpositive="exclude", resume=resume, **kw)
        assert again["nonpositive"] == "exclude"
    for r, old in enumerate(hs):
        h = json.loads(paths.hessian_json(run, 1, 6, r).read_text())
        assert h["nonpositive"] == "exclude" and h["params"]["nonpositive"] == "exclude"
        assert h["eigenvalues"] == old["eigenvalues"] and h["trace"] == old["trace"]
        dens = SpectralDensity.load(paths.hessian_density(run, 1, 6, r))
        want = theory.max_pruning_ratio(dens, 0.05, np.asarray(h["curve"]["R"]),
                                        n_prunable=h["n_prunable_remaining"],
                                        nonpositive="exclude")
        np.testing.assert_allclose(h["curve"]["f_max"], want, atol=1e-12)
        assert h["curve"]["R"] == old["curve"]["R"]
    h = hessian.hessian_analysis(run, 1, replicate=0, **dict(kw, eps=0.1))   # a new ε too
    assert h["eps"] == 0.1 and h["eigenvalues"] == hs[0]["eigenvalues"]


def _killed_at_training(monkeypatch, n):
    """Train the runs of a list one after another; the n-th training is killed (Ctrl-C)."""
    from fastimp import training
    from fastimp.imp import retraining
    monkeypatch.setattr(retraining, "batching_options",
                        lambda b: {"batching": "loop", "max_batch_runs": None})
    real, count = training.train, []

    def train(*a, **k):
        count.append(1)
        if len(count) == n:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(training, "train", train)
    return lambda: monkeypatch.setattr(training, "train", real)


def test_a_killed_list_keeps_every_finished_training(run_copy, monkeypatch):
    from fastimp.analysis import paths
    from fastimp.analysis.prune_scan import prune_scan_analysis
    from fastimp.analysis.robustness import robustness_analysis
    from fastimp.analysis.weights import weights_analysis
    run = run_copy
    # branches (Figs. 7, 9): LRR r0, LRR r1 (killed), then FT
    restore = _killed_at_training(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        weights_analysis(run, levels=[1], log=lambda *a: None)
    assert paths.branch_json(run, 6, 1, 0, "lrr").exists()
    assert not paths.branch_json(run, 6, 1, 1, "lrr").exists()
    restore()
    spy = RetrainSpy(monkeypatch)
    weights_analysis(run, levels=[1], log=lambda *a: None)
    assert sorted((c["kw"]["strategy"], c["kw"]["replicate"]) for c in spy.calls) == \
        [("ft", [0, 1]), ("lrr", [1])]
    # pruning-ratio scan: (r0, magnitude), (r1, magnitude) killed
    monkeypatch.undo()
    restore = _killed_at_training(monkeypatch, 2)
    kw = dict(rewind_step=6, ratios=(0.5,), methods=("magnitude",), eps_matching=0.05,
              log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        prune_scan_analysis(run, 1, **kw)
    assert [e["ratio"] for e in
            json.loads(paths.prune_scan_json(run, 1, 6, 0).read_text())["results"]] == [0.5]
    restore()
    spy = RetrainSpy(monkeypatch)
    prune_scan_analysis(run, 1, **kw)
    assert [c["kw"]["replicate"] for c in spy.calls] == [[1]]
    # robustness: both replicates of a level as one list; r1 killed, r0's part is kept
    monkeypatch.undo()
    restore = _killed_at_training(monkeypatch, 2)
    rkw = dict(levels=[1], rewind_steps=[6], perturbations=1, max_examples=100)
    with pytest.raises(KeyboardInterrupt):
        robustness_analysis(run, **rkw)
    assert paths.robustness_part(run, 6, 1, 0).exists()
    assert not paths.robustness_part(run, 6, 1, 1).exists()
    restore()
    spy = RetrainSpy(monkeypatch)
    robustness_analysis(run, **rkw)
    assert [c["kw"]["replicate"] for c in spy.calls] == [[1]]
    paths.robustness_part(run, 6, 1, 0).unlink()
    paths.robustness_part(run, 6, 1, 1).unlink()
    spy.calls.clear()
    robustness_analysis(run, **rkw)
    assert [c["kw"]["replicate"] for c in spy.calls] == [[0, 1]]


def test_robustness_and_weights_commands(run_copy, capsys):
    from fastimp.analysis import paths
    from fastimp.cli import main
    run = run_copy
    assert main(["robustness", str(run.dir), "--levels", "1", "--rewind-step", "6",
                 "--perturbations", "1", "--max-examples", "100"]) == 0
    out = capsys.readouterr().out
    assert "rewind 6 level 1: rho" in out and str(paths.robustness_json(run)) in out
    res = json.loads(paths.robustness_json(run).read_text())
    assert [r["level"] for r in res["rewind_steps"]["6"]] == [1]
    assert paths.robustness_part(run, 6, 1, 1).exists() and paths.robustness_png(run).exists()
    assert main(["robustness", str(run.dir), "--perturbations", "0"]) == 2
    assert "perturbations" in capsys.readouterr().err
    assert main(["weights", str(run.dir), "--levels", "2", "--rewind-step", "0"]) == 0
    assert str(paths.weights_json(run)) in capsys.readouterr().out
    w = json.loads(paths.weights_json(run).read_text())
    assert w["rewind_step"] == 0 and [r["level"] for r in w["levels"]] == [2]
    assert all(p.exists() for p in paths.weights_pngs(run))
    assert main(["weights", str(run.dir), "--rewind-step", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rewind_step" in err


def test_analysis_file_names_are_spelled_only_in_paths():
    """fastimp.analysis.paths is the one place naming the analysis files."""
    import ast
    import pathlib

    import fastimp
    from fastimp.analysis import paths
    from fastimp.landscape import runs
    names = {paths.BARRIER_JSON, paths.HESSIAN_JSON, paths.DENSITY_NPZ, paths.DENSITY_PNG,
             paths.THRESHOLD_PNG}
    assert names == {"barrier.json", "hessian.json", "density.npz", "density.png",
                     "threshold.png"}
    assert runs.BARRIER_JSON is paths.BARRIER_JSON
    root = pathlib.Path(fastimp.__file__).parent
    spelled = []
    for py in root.rglob("*.py"):
        if py == root / "analysis" / "paths.py":
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and node.value in names | {"analysis"}:
                spelled.append(f"{py.relative_to(root)}:{node.lineno} {node.value!r}")
    assert spelled == []


# ------------------------------------------------------------- damaged analysis files (audit)
def _damaged(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"params": {"betas": [0.5,')       # truncated JSON


@pytest.mark.parametrize("name,command", [
    (lambda run, paths: paths.barrier_json(run), "fastimp barrier DIR"),
    (lambda run, paths: paths.plane_json(run, "imp", 1, 0), "fastimp plane DIR"),
    (lambda run, paths: paths.plane_json(run, "pruning", 0, 6), "fastimp plane DIR --kind pruning"),
    (lambda run, paths: paths.hessian_summary_json(run, 1, 0), "fastimp hessian DIR"),
    (lambda run, paths: paths.prune_scan_json(run, 1, 0), "fastimp prune-scan DIR"),
    (lambda run, paths: paths.robustness_json(run), "fastimp robustness DIR"),
    (lambda run, paths: paths.paper_json(run), "fastimp paper DIR"),
], ids=["barrier", "plane_imp", "plane_pruning", "hessian", "prune_scan", "robustness", "paper"])
def test_a_damaged_analysis_file_is_one_line_naming_it(run_copy, capsys, name, command):
    from fastimp.analysis import paths
    from fastimp.cli import main
    bad = name(run_copy, paths)
    _damaged(bad)
    assert main(["report", str(run_copy.dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err and "not readable JSON" in err, err
    assert f"delete it and rerun `{command}" in err, err


def test_a_damaged_part_of_a_resumable_analysis_is_computed_again(run_copy):
    from fastimp.analysis import paths
    from fastimp.analysis.barriers import barrier_analysis
    from fastimp.analysis.prune_scan import prune_scan_analysis
    from fastimp.imp.verify import RecomputeWarning
    run = run_copy
    kw = dict(max_examples=100, betas=[0.5], matrix=False, rewind_steps=[0])
    first = barrier_analysis(run, **kw)
    _damaged(paths.barrier_json(run))
    with pytest.warns(RecomputeWarning, match="barrier.json is not readable JSON"):
        again = barrier_analysis(run, resume=True, **kw)
    assert again["paths"] == first["paths"]
    assert json.loads(paths.barrier_json(run).read_text())["paths"] == first["paths"]
    part = paths.prune_scan_json(run, 1, 6, 0)
    _damaged(part)
    with pytest.warns(RecomputeWarning, match=f"{part.name} is not readable JSON"):
        prune_scan_analysis(run, 1, rewind_step=6, replicate=0, ratios=(0.5,),
                            eps_matching=1.0, log=lambda *a: None)
    assert [e["ratio"] for e in json.loads(part.read_text())["results"]] == [0.5, 0.5]


def test_barrier_on_a_run_with_no_finished_level_computes_nothing(run_copy, capsys):
    from fastimp.cli import main
    empty = run_copy.dir.parent / "empty" / run_copy.dir.name
    empty.mkdir(parents=True)
    shutil.copy(run_copy.dir / "config.json", empty / "config.json")
    assert main(["barrier", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to compute" in err, err
    assert sorted(p.name for p in empty.iterdir() if p.name != ".lock") == ["config.json"]
