"""IMP (Algorithm 1) end to end on a tiny MNIST-1D MLP: the retraining strategies' definitions,
rewinding, pruning, resume after a kill, run folders and matching."""
import json
import math

import pytest
import torch

from fastimp import imp
from fastimp.imp import IMPConfig, level_plan, load_run
from fastimp.imp.strategies import PREVIOUS, REWIND

T = 24  # training steps per level


def tiny(**kw):
    from fastimp.training import TrainConfig
    train = TrainConfig(steps=T, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        schedule="step", milestones=(12, 18), gamma=0.1)
    base = dict(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=2,
                rewind_steps=[0], replicates=1, model_kwargs={"hidden": [16]})
    base.update(kw)
    return IMPConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def record_train(monkeypatch):
    """Wrap fastimp.training.train_batched (every IMP training goes through it); record, per
    run, the weights it starts from and the steps it runs."""
    from fastimp import training
    calls = []
    real = training.train_batched

    def spy(models, cfg, loaders, masks=None, start_step=0, end_step=None, **kw):
        n = len(models)
        each = lambda v: v if isinstance(v, list) else [v] * n  # noqa: E731
        for m, c, mk, s, e in zip(models, each(cfg), each(masks), each(start_step),
                                  each(end_step)):
            calls.append(dict(start={k: v.detach().clone() for k, v in m.state_dict().items()},
                              masks=None if mk is None else dict(mk), start_step=s, end_step=e,
                              cfg=c))
        return real(models, cfg, loaders, masks, start_step, end_step, **kw)
    monkeypatch.setattr(training, "train_batched", spy)
    return calls


# --------------------------------------------------------------------------- definitions
def test_level_plan_definitions():
    tau, n = 5, 100
    for s in ("wr", "lrr", "ft"):  # level 0 = dense training from w_tau: A_tau(w_tau, T - tau)
        assert level_plan(s, 0, tau, n) == imp.LevelPlan(REWIND, tau, n)
    assert level_plan("wr", 3, tau, n) == imp.LevelPlan(REWIND, tau, n)  # A_tau(m.w_tau, T-tau)
    assert level_plan("lrr", 3, tau, n) == imp.LevelPlan(PREVIOUS, 0, n)  # A_0(m.w^(L-1), T)
    assert level_plan("ft", 3, tau, n) == imp.LevelPlan(PREVIOUS, n, 2 * n)  # A_T(m.w^(L-1), T)
    assert level_plan("ft", 3, tau, n).steps == n
    with pytest.raises(ValueError, match="strategy"):
        level_plan("xx", 1, 0, n)
    with pytest.raises(ValueError, match="rewind_step"):
        level_plan("wr", 1, n + 1, n)


@pytest.mark.parametrize("strategy", ["wr", "lrr", "ft"])
def test_strategy_starts_and_schedules(tmp_path, record_train, strategy):
    tau = 6
    run = imp.run(tiny(strategy=strategy, rewind_steps=[tau]), tmp_path, progress=False)
    calls = record_train
    # call 0 = pre-training 0 -> tau (dense, no mask), then levels 0, 1, 2
    assert (calls[0]["start_step"], calls[0]["end_step"], calls[0]["masks"]) == (0, tau, None)
    levels = calls[1:]
    assert len(levels) == 3 and run.levels(tau) == [0, 1, 2]
    w_tau = run.rewind_state(tau)
    assert _states_equal(levels[0]["start"], w_tau)
    assert (levels[0]["start_step"], levels[0]["end_step"]) == (tau, T)
    for L in (1, 2):
        call, mask = levels[L], run.mask(L, tau)
        assert set(call["masks"]) == set(mask) and all(
            torch.equal(call["masks"][k].cpu(), mask[k]) for k in mask)
        if strategy == "wr":
            assert _states_equal(call["start"], w_tau)
            assert (call["start_step"], call["end_step"]) == (tau, T)
        else:
            assert _states_equal(call["start"], run.solution(L - 1, tau))
            expect = (0, T) if strategy == "lrr" else (T, 2 * T)
            assert (call["start_step"], call["end_step"]) == expect
        if strategy == "ft":  # finetuning runs at the final, small learning rate throughout
            cfg = call["cfg"]
            lrs = {cfg.lr_at(s) for s in range(T, 2 * T)}
            assert lrs == {cfg.lr_at(T - 1)} and cfg.lr_at(T - 1) < cfg.lr
        else:  # the schedule restarts: first step of the level at the schedule's lr for that step
            assert call["cfg"].lr_at(call["start_step"]) == call["cfg"].lr
        # the solution lives in the mask's axial subspace
        sol = run.solution(L, tau)
        for name, m in mask.items():
            assert torch.all(sol[name][~m] == 0)


def test_rewind_point_is_pretraining_to_tau(tmp_path):
    from fastimp import models, training
    tau = 7
    cfg = tiny(rewind_steps=[0, tau], levels=0)
    run = imp.run(cfg, tmp_path, progress=False)
    ds = run.dataset()
    model = models.get("mnist1d_mlp", num_classes=10, seed=cfg.train.init_seed, hidden=[16])
    assert _states_equal(run.rewind_state(0), model.state_dict())  # w_0
    training.train(model, cfg.train, training.make_loader(ds, cfg.train), start_step=0,
                   end_step=tau, progress=False)
    assert _states_equal(run.rewind_state(tau), model.state_dict())
    assert run.rewind_steps == [0, tau]


def test_masks_are_magnitude_pruning_of_previous_solution(tmp_path):
    from fastimp.pruning import prune_magnitude
    run = imp.run(tiny(levels=2), tmp_path, progress=False)
    model = run.build_model()
    assert run.mask(0).density() == 1.0
    for L in (0, 1):
        model.load_state_dict(run.solution(L))
        expect = prune_magnitude(model, 0.2, masks=run.mask(L))
        assert run.mask(L + 1) == expect
        n = run.mask(L).remaining()
        assert run.mask(L + 1).remaining() == n - round(0.2 * n)
        st = run.stats(L)
        removed = torch.cat([run.solution(L)[k][run.mask(L)[k] & ~expect[k]] for k in expect])
        assert st["projection_distance"] == pytest.approx(float(removed.double().norm()), rel=1e-9)
        assert st["weights_remaining"] == pytest.approx(run.mask(L).density())
        assert st["sparsity"] == pytest.approx(1 - st["weights_remaining"])
        assert 0 <= st["test_error"] <= 1 and math.isfinite(st["train_loss"])


def test_random_pruning_control(tmp_path):
    run = imp.run(tiny(levels=1, pruning="random"), tmp_path, progress=False)
    from fastimp.pruning import prune_magnitude
    model = run.build_model()
    model.load_state_dict(run.solution(0))
    m1 = run.mask(1)
    n = run.mask(0).remaining()
    assert m1.remaining() == n - round(0.2 * n)
    assert m1 != prune_magnitude(model, 0.2)


# ------------------------------------------------------------------------ resume and reuse
@pytest.mark.parametrize("batch_runs", ["auto", 1])
def test_kill_and_resume_is_bitwise_identical(tmp_path, batch_runs):
    cfg = tiny(levels=2, strategy="lrr", rewind_steps=[0, 4], batch_runs=batch_runs)
    ref = imp.run(cfg, tmp_path / "ref", progress=False, checkpoint_every=5)

    class Killed(Exception):
        pass
    seen = {"n": 0}

    def kill(step, model, optimizer):
        seen["n"] += 1
        # pre-training, then level 0: tau = 0 alone (batched: both taus, one step count) ...
        if seen["n"] == 4 + T + 13:  # ... then 13 steps into level 1 (one at a time: tau = 4)
            raise Killed
    with pytest.raises(Killed):
        imp.run(cfg, tmp_path / "resumed", progress=False, checkpoint_every=5, on_step=kill)
    folder = tmp_path / "resumed" / cfg.folder_name()
    part = load_run(folder)
    assert part.levels(0) == [0]
    assert any(p.name == "checkpoint.pt" for p in folder.rglob("*")), "mid-level checkpoint"
    res = imp.run(cfg, tmp_path / "resumed", progress=False, checkpoint_every=5)
    for tau in (0, 4):
        assert res.levels(tau) == [0, 1, 2]
        for L in (0, 1, 2):
            assert _states_equal(res.solution(L, tau), ref.solution(L, tau))
            assert res.mask(L, tau) == ref.mask(L, tau)
    assert not any(p.name == "checkpoint.pt" for p in folder.rglob("*"))
    assert not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


def test_kill_between_two_batched_runs_finishing_resumes_bit_identical(tmp_path, monkeypatch):
    """A level's runs train packed and are finished one by one: killed after the first, the
    rerun trains the second again with the first as a companion resumed from its checkpoint."""
    from fastimp.imp import runner
    from fastimp.imp.folder import level_dir
    cfg = tiny(levels=1, rewind_steps=[0, 3])
    ref = imp.run(cfg, tmp_path / "ref", progress=False, checkpoint_every=5)

    class Killed(Exception):
        pass
    real = runner._finish_level
    done = []

    def dying(job, *a, **kw):
        out = real(job, *a, **kw)
        done.append(job.level)
        if done == [0, 0, 1]:
            raise Killed
        return out
    monkeypatch.setattr(runner, "_finish_level", dying)
    with pytest.raises(Killed):
        imp.run(cfg, tmp_path / "run", progress=False, checkpoint_every=5)
    monkeypatch.setattr(runner, "_finish_level", real)
    folder = tmp_path / "run" / cfg.folder_name()
    first = level_dir(folder, 0, 0, 1)
    assert (first / "stats.json").exists() and (first / "checkpoint.pt").exists()
    assert not (level_dir(folder, 0, 3, 1) / "stats.json").exists()
    res = imp.run(cfg, tmp_path / "run", progress=False, checkpoint_every=5)
    for tau in (0, 3):
        for L in (0, 1):
            assert _states_equal(res.solution(L, tau), ref.solution(L, tau))
    assert not any(p.name == "checkpoint.pt" for p in folder.rglob("*"))


def test_rerun_skips_finished_work_and_extends(tmp_path, record_train):
    cfg = tiny(levels=1)
    imp.run(cfg, tmp_path, progress=False)
    n = len(record_train)
    imp.run(cfg, tmp_path, progress=False)
    assert len(record_train) == n  # nothing retrained
    more = cfg.replace(levels=2)
    assert more.folder_name() == cfg.folder_name()
    run = imp.run(more, tmp_path, progress=False)
    assert len(record_train) == n + 1 and run.levels() == [0, 1, 2]
    assert cfg.replace(strategy="lrr").folder_name() != cfg.folder_name()
    assert cfg.with_overrides(["train.lr=0.01"]).folder_name() != cfg.folder_name()


# -------------------------------------------------------------------------- run folders
def test_run_folder_contract(tmp_path):
    cfg = tiny(levels=1, rewind_steps=[0, 3], seeds=[3, 8])
    run = imp.run(cfg, tmp_path, progress=False)
    assert run.dir == tmp_path / cfg.folder_name()
    again = load_run(tmp_path)  # OUT holding exactly one run is accepted
    assert again.dir == run.dir and again.config == run.config
    assert run.rewind_steps == [0, 3] and run.replicates == [0, 1] and run.seeds == [3, 8]
    assert run.levels() == [0, 1] and run.levels(3, 1) == [0, 1]
    assert run.analysis_dir == run.dir / "analysis" and run.analysis_dir.is_dir()
    model = run.build_model()
    model.load_state_dict(run.solution(1, 3, 1))
    x, y = next(iter(run.train_data(batch_size=50)))
    assert x.shape == (50, 40) and y.dtype == torch.int64
    assert sum(len(yb) for _, yb in run.test_data()) == 1000
    results = json.loads((run.dir / "results.json").read_text())
    keys = {(r["rewind_step"], r["replicate"], r["level"]) for r in results}
    assert keys == {(t, r, L) for t in (0, 3) for r in (0, 1) for L in (0, 1)}
    for r in results:
        assert {"level", "weights_remaining", "test_error", "sparsity", "test_loss", "train_loss",
                "projection_distance", "matching"} <= set(r)
    assert json.loads((run.dir / "config.json").read_text())["strategy"] == "wr"
    with pytest.raises(ValueError, match="rewind_step"):
        run.solution(0, rewind_step=99)
    with pytest.raises(FileNotFoundError):
        run.solution(5)
    # retrain: WR trains masks . w_tau over [tau, T) -> what level 2 would be
    sd, st = run.retrain(run.mask(1), rewind_step=3, replicate=0)
    assert (st["start_step"], st["end_step"]) == (3, T) and 0 <= st["test_error"] <= 1
    assert all(torch.all(sd[k][~m] == 0) for k, m in run.mask(1).items())
    with pytest.raises(ValueError, match="level"):
        run.retrain(run.mask(1), strategy="lrr")
    sd2, st2 = run.retrain(run.mask(1), level=0, strategy="lrr")
    assert (st2["start_step"], st2["end_step"]) == (0, T)
    # several runs at once: lists in, a list out, in order, each equal to retraining it alone
    # (one batched program: equal to float tolerance)
    many = run.retrain([run.mask(1), run.mask(1)], rewind_step=[3, 0], replicate=0)
    assert [s["rewind_step"] for _, s in many] == [3, 0]
    for k in sd:
        torch.testing.assert_close(many[0][0][k], sd[k], rtol=1e-4, atol=1e-6)
    assert list(many[0][1]) == list(st)  # the same stats, in the same order
    with pytest.raises(ValueError, match="rewind_step"):
        run.retrain([run.mask(1)] * 2, rewind_step=[3])
    # start= replaces the starting weights; the mask is applied to them
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in run.rewind_state(3).items()}
    sd3, _ = run.retrain(run.mask(1), rewind_step=3, start=shifted)
    assert not all(torch.equal(sd3[k], sd[k]) for k in sd)
    assert all(torch.all(sd3[k][~m] == 0) for k, m in run.mask(1).items())


def test_levels_train_as_one_batched_program(tmp_path, pack_widths):
    """Replicates x rewind steps of a level are packed (batch_runs default); every run equals its
    training alone to float tolerance and the folder holds the same files as batch_runs=1."""
    widths = pack_widths
    cfg = tiny(levels=1, rewind_steps=[0, 3], seeds=[3, 8])
    batched = imp.run(cfg, tmp_path / "batched", progress=False)
    assert 4 in widths and all(w <= 4 for w in widths)  # 2 seeds x 2 rewind steps at once
    n_packed = len(widths)
    alone = imp.run(cfg.replace(batch_runs=1), tmp_path / "alone", progress=False)
    assert len(widths) == n_packed  # batch_runs=1: nothing packed
    files = lambda run: sorted(str(p.relative_to(run.dir)) for p in run.dir.rglob("*"))  # noqa
    assert files(batched) == files(alone)
    rows_b, rows_a = batched.results(), alone.results()
    assert [list(r) for r in rows_b] == [list(r) for r in rows_a]
    for tau in (0, 3):
        for r in (0, 1):
            for L in (0, 1):
                a, b = batched.solution(L, tau, r), alone.solution(L, tau, r)
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
                sa, sb = batched.stats(L, tau, r), alone.stats(L, tau, r)
                assert sa["test_error"] == pytest.approx(sb["test_error"], abs=0.01)
            for L in (0, 1):  # the same masks (no weight sits within float noise of the cut)
                agree = sum(int((batched.mask(L + 1, tau, r)[k] == alone.mask(L + 1, tau, r)[k])
                                .sum()) for k in a if k in batched.mask(L + 1, tau, r))
                assert agree >= 0.999 * batched.mask(L + 1, tau, r).total()
    with pytest.raises(ValueError, match="batch_runs"):
        cfg.replace(batch_runs=0)
    assert cfg.replace(batch_runs=2).folder_name() == cfg.folder_name()  # not hashed


@pytest.mark.parametrize("tau", [0, 20])
def test_a_diverging_run_names_level_replicate_step_and_lr(tmp_path, tau, capsys):
    from fastimp.cli import main
    from fastimp.training import NonFiniteLossError
    cfg = tiny(levels=1, rewind_steps=[tau], seeds=[0, 1]).with_overrides(["train.lr=1000"])
    with pytest.raises(NonFiniteLossError) as err:
        imp.run(cfg, tmp_path, progress=False)
    text = str(err.value)
    where = "pre-training of replicate" if tau else "level 0, rewind step 0, replicate"
    assert where in text and f"step {err.value.step}" in text and "lr 1000" in text
    assert not list(tmp_path.rglob("solution.pt"))  # stopped before anything was saved
    code = main(["imp", "--preset", "mnist1d", "--out", str(tmp_path / "cli"), "--levels", "0",
                 "--replicates", "1", "--no-progress", "train.lr=1000", "train.steps=30it",
                 "model=mnist1d_mlp"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1
    assert "level 0, rewind step 0, replicate 0 (seed 0): training diverged" in err_lines[0]


def test_progress_bar_counts_trainings(tmp_path, capsys):
    imp.run(tiny(levels=2, seeds=[0, 1]), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "3 levels x 2 runs" in err and "6/6" in err and "training" in err


def test_matching_definition():
    from fastimp.imp.matching import dense_epsilon, is_matching, summarize
    rows = [dict(rewind_step=0, replicate=r, level=L, weights_remaining=0.8 ** L, test_error=e)
            for r, errs in enumerate([[0.10, 0.11, 0.30], [0.12, 0.12, 0.32]])
            for L, e in enumerate(errs)]
    s = summarize(rows)
    eps = dense_epsilon([0.10, 0.12])
    assert eps == pytest.approx(math.sqrt(2) * 0.01)
    assert [x["matching"] for x in s] == [True, True, False]
    assert s[1]["dense_error"] == pytest.approx(0.11) and s[1]["eps"] == pytest.approx(eps)
    one = [r for r in rows if r["replicate"] == 0]
    assert all(x["matching"] is None for x in summarize(one))
    assert [x["matching"] for x in summarize(one, eps=0.02)] == [True, True, False]
    assert is_matching(0.12, 0.10, 0.02) and not is_matching(0.1201, 0.10, 0.02)
    with pytest.raises(ValueError, match="2 replicates"):
        dense_epsilon([0.1])
    with pytest.raises(ValueError, match="eps"):
        summarize(rows, eps=-1)


# ------------------------------------------------------------------------------- config
def test_config_validation_and_overrides():
    cfg = tiny()
    assert cfg.replace(levels=9, rewind_steps=[5], seeds=[4], device="cuda").hash() == cfg.hash()
    c = cfg.with_overrides(["train.lr=0.5", "strategy=ft", "rewind_steps=0,250",
                            "pruning_fraction=0.3", "train.milestones=[5,6]"])
    assert (c.train.lr, c.strategy, c.rewind_steps, c.pruning_fraction) == \
        (0.5, "ft", [0, 250], 0.3)
    assert c.train.milestones == (5, 6)
    assert cfg.with_overrides(["rewind_steps=2000it"]).rewind_steps == [2000]
    assert IMPConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad, match in [(["train.nope=1"], "train.nope"), (["nokey"], "key=value"),
                       (["strategy=xyz"], "strategy"),
                       (["pruning_fraction=1.5"], "pruning_fraction"),
                       (["pruning=l1"], "pruning"), (["levels=-1"], "levels"),
                       (["rewind_steps=3ep"], "rewind_steps")]:
        with pytest.raises(ValueError, match=match):
            cfg.with_overrides(bad)
    with pytest.raises(TypeError, match="config"):
        imp.run({"model": "x"}, "/tmp/none")


def test_adaptive_pruning_is_wired(tmp_path, monkeypatch):
    import fastimp.theory as theory
    cfg = tiny(levels=1, pruning_fraction="adaptive")
    seen = []

    def ratio(model, solution, masks, data, threshold, **kw):
        seen.append(threshold)
        x, y = next(iter(data))
        assert x.shape[1:] == (40,) and set(solution) == set(model.state_dict())
        return 0.5
    monkeypatch.setattr(theory, "adaptive_pruning_ratio", ratio)
    run = imp.run(cfg, tmp_path / "b", progress=False)
    st0 = run.stats(0)
    # Appendix F's threshold: the dense solution's train loss + eps, the loss measured as the path
    # losses are (the whole train set, unaugmented, BatchNorm in eval mode), not the training-mode
    # mean over the last epoch's minibatches
    from fastimp.training import evaluate
    model = run.build_model()
    model.load_state_dict(run.solution(0))
    _, dense_loss = evaluate(model, run.train_data())
    assert seen == [pytest.approx(dense_loss + st0["train_loss_epsilon"], rel=1e-5)] * 2
    assert dense_loss != pytest.approx(st0["train_loss"], rel=1e-3)
    n = run.mask(0).remaining()
    assert run.mask(1).remaining() == n - round(0.5 * n)
    assert run.stats(0)["next_pruning_fraction"] == 0.5
