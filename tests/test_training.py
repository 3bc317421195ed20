import math

import numpy as np
import pytest
import torch
from torch import nn

from fastimp import data, models
from fastimp.training import (Checkpoint, TrainConfig, evaluate, make_optimizer, make_scheduler,
                              train, train_loss_epsilon, train_loss_epsilon_appendix_f)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_images():
    """CIFAR-shaped (uint8, crop + flip) but small: 40 images of 3 x 8 x 8, 4 classes."""
    return data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=40, test_size=12)


def tiny_resnet(seed=0):
    return models.get("cifar_resnet_20", num_classes=4, width=4, seed=seed)


CFG = TrainConfig(steps=12, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                  milestones=(6, 9), gamma=0.5)


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- config
def test_config_validates():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError):
        TrainConfig(steps="12 parsecs")
    with pytest.raises(TypeError, match="init_seed"):
        TrainConfig(init_seed=1.0)
    cfg = TrainConfig(steps="160ep", milestones=["80ep", "120ep"])
    assert cfg.total_steps(390) == 62400 and cfg.milestone_steps(390) == (31200, 46800)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})
    assert cfg.replace(lr=0.2).lr == 0.2 and cfg.lr == 0.1


def test_paper_defaults_cifar10_resnet20():
    cfg = TrainConfig()
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == \
        (62400, 128, 0.1, 0.9, 1e-4)
    assert cfg.lr_at(0) == 0.1 and cfg.lr_at(31199) == 0.1
    assert math.isclose(cfg.lr_at(31200), 0.01) and math.isclose(cfg.lr_at(46799), 0.01)
    assert math.isclose(cfg.lr_at(46800), 0.001) and math.isclose(cfg.lr_at(62399), 0.001)


def test_cosine_with_warmup_and_constant():
    cfg = TrainConfig(steps=100, lr=2.0, schedule="cosine", warmup_steps=10, milestones=())
    assert math.isclose(cfg.lr_at(0), 0.2) and math.isclose(cfg.lr_at(4), 1.0)
    assert math.isclose(cfg.lr_at(9), 2.0) and math.isclose(cfg.lr_at(10), 2.0)
    assert math.isclose(cfg.lr_at(55), 1.0)  # halfway through the 90 cosine steps
    assert cfg.lr_at(99) < 0.002 and cfg.lr_at(99) > 0
    const = TrainConfig(steps=10, lr=0.02, schedule="constant", weight_decay=0.0)
    assert all(const.lr_at(s) == 0.02 for s in range(10))
    stepwarm = TrainConfig(steps=20, lr=1.0, milestones=(5,), gamma=0.1, warmup_steps=10)
    assert math.isclose(stepwarm.lr_at(5), 0.6 * 0.1) and math.isclose(stepwarm.lr_at(15), 0.1)


def test_scheduler_drives_the_optimizer_lr():
    cfg = TrainConfig(steps=30, lr=0.4, schedule="cosine", warmup_steps="1ep")
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3)
    opt = make_optimizer(nn.ParameterList([p]), cfg)
    sched = make_scheduler(opt, cfg, iterations_per_epoch=5)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([cfg.lr_at(s, 5) for s in range(30)], rel=1e-12)
    late = make_scheduler(make_optimizer(nn.ParameterList([p]), cfg), cfg, 5, start_step=17)
    assert late.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr_at(17, 5))
    assert late.last_epoch == 17


# ----------------------------------------------------------------------------- training
def test_training_reduces_loss_and_is_deterministic():
    ds = data.get("synthetic", shape=(6,), num_classes=3, train_size=48, test_size=12,
                  dtype=torch.float32)
    cfg = TrainConfig(steps=60, batch_size=16, lr=0.1, milestones=(), weight_decay=0.0)
    m1 = models.get("mnist1d_mlp", num_classes=3, in_features=6, seed=1)
    m2 = models.get("mnist1d_mlp", num_classes=3, in_features=6, seed=1)
    r1 = train(m1, cfg, ds, progress=False, eval_data=ds)
    r2 = train(m2, cfg, ds, progress=False)
    assert r1.losses.shape == (60,) and r1.losses.dtype == torch.float32
    assert torch.equal(r1.losses, r2.losses) and states_equal(m1, m2)
    assert r1.losses[-3:].mean() < 0.5 * r1.losses[:3].mean()  # it memorizes 48 random points
    assert 0 <= r1.test_error <= 1 and r1.test_loss > 0
    assert r1.iterations_per_epoch == 3 and r1.start_step == 0 and r1.end_step == 60
    r3 = train(models.get("mnist1d_mlp", num_classes=3, in_features=6, seed=1),
               cfg.replace(data_seed=1), ds, progress=False)
    assert not torch.equal(r1.losses, r3.losses)


def test_train_equals_a_plain_loop():
    """train() = SGD on loader.batch(step) at lr_at(step), from start_step to end_step."""
    ds = tiny_images()
    loader = ds.loader("train", 8, seed=3)
    a, b = tiny_resnet(), tiny_resnet()
    res = train(a, CFG, loader, start_step=4, end_step=11, progress=False)
    opt = torch.optim.SGD(b.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    b.train()
    losses = []
    for step in range(4, 11):
        for g in opt.param_groups:
            g["lr"] = CFG.lr_at(step, loader.iterations_per_epoch)
        x, y = loader.batch(step)
        loss = nn.functional.cross_entropy(b(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert res.losses.tolist() == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6, msg=k)


def test_masks_stay_applied():
    ds = tiny_images()
    model = tiny_resnet()
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()
             if n.endswith("conv1.weight") or n == "fc.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, CFG, ds, masks=masks, progress=False)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert not params[n][~m].any(), n
        assert not torch.equal(params[n][m], before[n][m]), n
    assert not torch.equal(params["conv.weight"], before["conv.weight"])


def test_masks_object_from_fastimp_masks():
    masks_mod = pytest.importorskip("fastimp.masks")
    model = tiny_resnet()
    g = torch.Generator().manual_seed(1)
    masks = masks_mod.Masks({n: torch.rand(p.shape, generator=g) < 0.5
                             for n, p in masks_mod.prunable(model).items()})
    train(model, CFG.replace(steps=3), tiny_images(), masks=masks, progress=False)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert not params[n][~m.bool()].any()
    assert params["conv.weight"].count_nonzero() > 0


def test_mask_validation():
    model = tiny_resnet()
    with pytest.raises(ValueError, match="no parameter named"):
        train(model, CFG, tiny_images(), masks={"nope": torch.ones(1, dtype=torch.bool)},
              progress=False)
    with pytest.raises(ValueError, match="shape"):
        train(model, CFG, tiny_images(), masks={"fc.weight": torch.ones(2, dtype=torch.bool)},
              progress=False)
    shape = dict(model.named_parameters())["fc.weight"].shape
    with pytest.raises(ValueError, match="'fc.weight'.*0/1"):  # not silently cast to True
        train(model, CFG, tiny_images(), masks={"fc.weight": torch.full(shape, 0.5)},
              progress=False)
    with pytest.raises(ValueError, match="start_step"):
        train(model, CFG, tiny_images(), start_step=5, end_step=3, progress=False)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("masked", [False, True])
def test_resume_after_kill_equals_uninterrupted(tmp_path, masked):
    ds = tiny_images()
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(p.shape, generator=g) < 0.6
             for n, p in tiny_resnet().named_parameters() if n.endswith("conv2.weight")} \
        if masked else None
    ref_model = tiny_resnet()
    ref = train(ref_model, CFG, ds, masks=masks, start_step=2, progress=False)

    ck = Checkpoint(tmp_path / "train.ckpt", every=3)

    def kill_at_8(step, model, optimizer):
        if step == 8:
            raise _Killed

    model = tiny_resnet()
    with pytest.raises(_Killed):
        train(model, CFG, ds, masks=masks, start_step=2, checkpoint=ck, on_step=kill_at_8,
              progress=False)
    assert ck.exists()
    assert torch.load(ck.path, weights_only=False)["step"] == 6
    model = tiny_resnet()  # a fresh process: nothing but the checkpoint survives
    seen = []
    res = train(model, CFG, ds, masks=masks, start_step=2, checkpoint=ck, progress=False,
                on_step=lambda s, m, o: seen.append(s))
    assert seen == list(range(7, 13))
    assert torch.equal(res.losses, ref.losses)
    assert states_equal(model, ref_model)
    assert not ck.exists() and not list(tmp_path.glob("*.tmp"))
    if masked:
        params = dict(model.named_parameters())
        assert all(not params[n][~m].any() for n, m in masks.items())


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ds = tiny_images()
    ck = Checkpoint(tmp_path / "c.ckpt", every=2, keep=True)
    train(tiny_resnet(), CFG.replace(steps=4), ds, checkpoint=ck, progress=False)
    assert ck.exists()  # keep=True
    with pytest.raises(ValueError, match="another run"):
        train(tiny_resnet(), CFG.replace(steps=4, lr=0.2), ds, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match="every"):
        Checkpoint(tmp_path / "x", every=0)


def test_given_optimizer_keeps_its_state():
    """IMP-FT / continuing runs pass their own optimizer and scheduler."""
    ds = tiny_images()
    a, b = tiny_resnet(), tiny_resnet()
    full = train(a, CFG, ds, progress=False)
    opt = make_optimizer(b, CFG)
    sched = make_scheduler(opt, CFG, 5)
    first = train(b, CFG, ds, end_step=7, optimizer=opt, scheduler=sched, progress=False)
    second = train(b, CFG, ds, start_step=7, optimizer=opt, scheduler=sched, progress=False)
    assert torch.equal(torch.cat([first.losses, second.losses]), full.losses)
    assert states_equal(a, b)


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_error_and_loss():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.5], [-1.0, -2.0], [0.2, 0.1]])
    y = torch.tensor([0, 1, 2, 2, 1])
    logits = x @ model.weight.T
    want_err = float((logits.argmax(1) != y).float().mean())
    want_loss = float(nn.functional.cross_entropy(logits.detach().double(), y))
    model.train()
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    err, loss = evaluate(model, batches)
    assert err == pytest.approx(want_err) and err == pytest.approx(2 / 5)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert model.training
    loader = data.Loader(x, y, 2, shuffle=False)
    assert evaluate(model, loader) == pytest.approx((err, loss))
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, [])


def test_evaluate_dataset_uses_test_split_in_eval_mode():
    ds = tiny_images()
    model = tiny_resnet()
    train(model, CFG.replace(steps=3), ds, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    err, loss = evaluate(model, ds)
    assert states_equal(model, model) and all(torch.equal(state[k], v)
                                              for k, v in model.state_dict().items())
    assert err == pytest.approx(evaluate(model, ds.loader("test", 5))[0])
    assert err * 12 == pytest.approx(round(err * 12))


def test_train_loss_epsilon_is_std_of_last_epoch():
    losses = torch.tensor([9.0, 9.0, 1.0, 2.0, 4.0])
    with pytest.warns(DeprecationWarning, match="train_loss_epsilon_appendix_f"):
        assert train_loss_epsilon(losses, 3) == train_loss_epsilon_appendix_f(losses, 3)
    eps = train_loss_epsilon_appendix_f  # Appendix F's eps
    assert eps(losses, 3) == pytest.approx(float(np.std([1.0, 2.0, 4.0], ddof=1)))
    assert eps([1.0, 3.0], 5) == pytest.approx(float(np.std([1, 3], ddof=1)))
    assert math.isnan(eps([1.0], 5))
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        eps(losses, 0)


@pytest.mark.gpu
def test_cuda_training_runs_and_keeps_masks():
    ds = data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=40, test_size=12,
                  device="cuda")
    model = tiny_resnet()
    masks = {"fc.weight": torch.rand(4, 16) < 0.5}
    res = train(model, CFG, ds, masks=masks, progress=False, eval_data=ds)
    assert res.losses.device.type == "cpu" and torch.isfinite(res.losses).all()
    assert not model.fc.weight[~masks["fc.weight"].cuda()].any()
    again = tiny_resnet()
    res2 = train(again, CFG, ds, masks=masks, progress=False)
    torch.testing.assert_close(res.losses, res2.losses, rtol=1e-3, atol=1e-4)  # cuDNN atomics
