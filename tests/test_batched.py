"""train_batched: N independent runs as one program (fastimp.batched) equal N runs of train()."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastimp import data, models, training
from fastimp.batched import CannotPack, engine, graph, pack, unpack_, verify
from fastimp.batched.engine import BatchingFallbackWarning, batching_pays, runs_that_fit
from fastimp.data import BatchedLoader, Loader
from fastimp.training import (Checkpoint, NonFiniteLossError, TrainConfig, train,
                              train_batched)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N = 3


def images(n=40, side=8, dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return (x if dtype is None else x.to(dtype)), torch.randint(0, 4, (n,), generator=g)


def image_loaders(x, y, batch=8, runs=N):
    return [Loader(x, y, batch, seed=s, augment="cifar", mean=[127.5] * 3 if x.is_floating_point()
                   else [0.5] * 3, std=[64.0] * 3 if x.is_floating_point() else [0.25] * 3)
            for s in range(runs)]


def resnet(seed, **kw):
    return models.get("cifar_resnet_20", num_classes=4, width=4, seed=seed, **kw)


def random_masks(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density
            for n, p in model.named_parameters() if p.dim() > 1}


def rel_errors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    out = {}
    for k in sa:
        if sa[k].is_floating_point():
            out[k] = float((sa[k].double() - sb[k].double()).norm()
                           / (sa[k].double().norm() + 1e-30))
        else:
            assert torch.equal(sa[k], sb[k]), k  # num_batches_tracked
    return out


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("augment", ["cifar", None])
def test_batched_loader_equals_each_loader(augment):
    ds = data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=43, test_size=4)
    loaders = [ds.loader("train", 8, seed=s, augment=augment) for s in (0, 1, 7)]
    bl = BatchedLoader(loaders)
    assert bl.fused and bl.iterations_per_epoch == 6
    for step in (0, 4, 5, 6, 17):  # 5, 11, 17: the last, smaller batch of an epoch
        x, y = bl.batch(step)
        for i, ld in enumerate(loaders):
            xi, yi = ld.batch(step)
            assert torch.equal(x[:, i], xi) and torch.equal(y[:, i], yi)
    other = data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=43, test_size=4,
                     seed=1)
    mixed = BatchedLoader([loaders[0], other.loader("train", 8)])
    assert not mixed.fused  # another dataset: per-loader batches, stacked
    x, y = mixed.batch(3)
    assert torch.equal(x[:, 1], other.loader("train", 8).batch(3)[0])
    with pytest.raises(ValueError, match="differ in iterations_per_epoch"):
        BatchedLoader([loaders[0], ds.loader("train", 4)])


# ------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("name,kw,shape", [
    ("cifar_resnet_20", dict(width=4), (3, 8, 8)),
    ("cifar_resnet_20", dict(width=4, shortcut="A"), (3, 8, 8)),
    ("cifar_resnet_18", dict(width=4), (3, 8, 8)),
    ("resnet50", dict(num_classes=5), (3, 16, 16)),
    ("mnist1d_mlp", {}, (40,)),
    ("mnist1d_conv", {}, (40,)),
])
def test_every_registered_model_packs(name, kw, shape):
    n = 2 if name == "resnet50" else N  # 25 M parameters each
    ms = [models.get(name, seed=s, **kw) for s in range(n)]
    for m in ms:  # non-trivial BN statistics, so that a mix-up would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
    packed = pack(ms)
    x = torch.randn(3, n, *shape)
    verify(packed, ms, x)  # raises CannotPack when the outputs differ
    assert [n for n, _ in packed.named_parameters()] == [n for n, _ in ms[0].named_parameters()]
    if name == "resnet50":
        return
    copies = [copy.deepcopy(m) for m in ms]
    with torch.no_grad():
        for p in packed.parameters():
            p.add_(1.0)
    unpack_(packed, copies)
    for m, c in zip(ms, copies):
        for (k, a), b in zip(m.named_parameters(), c.parameters()):
            torch.testing.assert_close(b, a + 1.0, msg=k)


def test_cannot_pack_says_why():
    class WithLayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.fc(x))

    class MixesRuns(nn.Module):  # a reshape across the channel axis: packs, but wrongly
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x).flip(1)

    with pytest.raises(CannotPack, match="norm .*LayerNorm.* holds weight, bias"):
        pack([WithLayerNorm(), WithLayerNorm()])
    ms = [MixesRuns(), MixesRuns()]
    with pytest.raises(CannotPack, match="mixes channels"):
        verify(pack(ms), ms, torch.randn(2, 2, 6))
    with pytest.raises(CannotPack, match="architecture"):
        pack([nn.Linear(3, 2), nn.Linear(3, 4)])


# --------------------------------------------------------------------- equality with train()
def test_packed_resnet_equals_separate_runs_float64():
    """BN + masks + momentum (MaskedSGD) + milestones + runs starting at different steps, 50
    steps: in float64 (where the packed and the plain kernels round alike) the runs equal
    train()'s."""
    x, y = images(dtype=torch.float64)
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=50, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      milestones=(20, 40), gamma=0.5)
    masks = [random_masks(resnet(0), 0.7, s) for s in range(N)]
    starts = [0, 3, 3]
    ref = [resnet(s).double() for s in range(N)]
    ref_res = [train(ref[i], cfg, loaders[i], masks[i], starts[i], progress=False)
               for i in range(N)]
    got = [resnet(s).double() for s in range(N)]
    res = train_batched(got, cfg, loaders, masks, starts, progress=False, batching="packed")
    for i in range(N):
        errs = rel_errors(ref[i], got[i])
        assert max(errs.values()) < 1e-10, max(errs.items(), key=lambda kv: kv[1])
        torch.testing.assert_close(res[i].losses, ref_res[i].losses, rtol=1e-10, atol=0)
        assert (res[i].start_step, res[i].end_step) == (starts[i], 50)


@pytest.mark.parametrize("name", ["mnist1d_conv", "mnist1d_mlp"])
def test_packed_equals_separate_runs_fp32(name):
    """The real path (fp32, MaskedSGD): 50 steps of the MNIST-1D nets within 1e-4 relative."""
    ds = data.get("mnist1d")
    cfg = TrainConfig(steps=50, batch_size=100, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      milestones=(30,), gamma=0.1)
    loaders = [training.make_loader(ds, cfg.replace(data_seed=s)) for s in range(N)]
    ms = [models.get(name, seed=s) for s in range(N)]
    masks = [random_masks(ms[0], 0.5, s) for s in range(N)]
    ref = [copy.deepcopy(m) for m in ms]
    for i in range(N):
        train(ref[i], cfg, loaders[i], masks[i], progress=False)
    train_batched(ms, cfg, loaders, masks, progress=False, batching="packed")
    for i in range(N):
        assert max(rel_errors(ref[i], ms[i]).values()) < 1e-4
        params = dict(ms[i].named_parameters())
        assert all(not params[n][~m].any() for n, m in masks[i].items())


def test_packed_resnet_step_fp32_equals_a_plain_step():
    """One fp32 step from init with BN, masks, momentum: tight; (longer fp32 ResNet runs from
    init diverge from ANY float reordering: a 1e-7 perturbation of the weights grows to O(1)
    within 50 steps, so longer equality is checked in float64 above)."""
    x, y = images()
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      milestones=())
    masks = [random_masks(resnet(0), 0.7, s) for s in range(N)]
    ref = [resnet(s) for s in range(N)]
    for i in range(N):
        train(ref[i], cfg, loaders[i], masks[i], progress=False)
    got = [resnet(s) for s in range(N)]
    train_batched(got, cfg, loaders, masks, progress=False, batching="packed")
    for i in range(N):
        assert max(rel_errors(ref[i], got[i]).values()) < 1e-4


def test_pruned_weights_and_momentum_stay_zero(tmp_path):
    x, y = images()
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=6, batch_size=8, lr=0.05, momentum=0.9, milestones=())
    masks = [random_masks(resnet(0), 0.5, s) for s in range(N)]
    ms = [resnet(s) for s in range(N)]
    cks = [Checkpoint(tmp_path / f"r{i}.pt", every=4, keep=True) for i in range(N)]
    train_batched(ms, cfg, loaders, masks, end_step=5, checkpoint=cks, progress=False,
                  batching="packed")
    for i in range(N):
        params = dict(ms[i].named_parameters())
        state = torch.load(cks[i].path, weights_only=False)
        assert state["step"] == 4
        by_index = dict(enumerate(n for n, _ in ms[i].named_parameters()))
        bufs = {by_index[j]: st["momentum_buffer"] for j, st in
                state["optimizer"]["state"].items()}
        for n, m in masks[i].items():
            assert not params[n][~m].any(), n
            assert not bufs[n][~m].any(), n
            assert bufs[n][m].any(), n


# ------------------------------------------------------------------------------ resume, kills
class _Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path):
    x, y = images()
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=12, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                      milestones=(6,), gamma=0.5)
    masks = [random_masks(resnet(0), 0.6, s) for s in range(N)]
    starts = [0, 2, 2]
    ref = [resnet(s) for s in range(N)]
    ref_res = train_batched(ref, cfg, loaders, masks, starts, progress=False, batching="packed")

    def kill_at_8(step, view):
        if step == 8:
            raise _Killed
    cks = [Checkpoint(tmp_path / f"run{i}.pt", every=3) for i in range(N)]
    with pytest.raises(_Killed):
        train_batched([resnet(s) for s in range(N)], cfg, loaders, masks, starts, checkpoint=cks,
                      on_step=kill_at_8, progress=False, batching="packed")
    assert [torch.load(c.path, weights_only=False)["step"] for c in cks] == [6, 6, 6]
    got = [resnet(s) for s in range(N)]  # a fresh process: only the checkpoints survive
    seen = []
    res = train_batched(got, cfg, loaders, masks, starts, checkpoint=cks, progress=False,
                        batching="packed", on_step=lambda s, v: seen.append((s, v.runs)))
    assert seen == [(s, [0, 1, 2]) for s in range(7, 13)]
    for i in range(N):
        assert states_equal(got[i], ref[i]) and torch.equal(res[i].losses, ref_res[i].losses)
        assert not cks[i].exists()
    # a single run's train() resumes a batched checkpoint (same format)
    ck = Checkpoint(tmp_path / "one.pt", every=3, keep=True)
    with pytest.raises(_Killed):
        train_batched([resnet(s) for s in range(2)], cfg, loaders[:2], masks[:2],
                      checkpoint=[ck, None], on_step=kill_at_8, progress=False,
                      batching="packed")
    alone = resnet(0)
    out = train(alone, cfg, loaders[0], masks[0], checkpoint=ck, progress=False)
    assert out.losses.shape == (12,) and math.isfinite(float(out.losses.sum()))


def test_on_step_view_and_runs_with_different_windows():
    x, y = images()
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=10, batch_size=8, lr=0.05, momentum=0.9, milestones=())
    ms = [resnet(s) for s in range(N)]
    seen, snaps = [], {}

    def on_step(step, view):
        seen.append((step, list(view.runs)))
        if step == 6 and 1 in view.runs:
            snaps[1] = view.state_dict(1)
        if step == 4:
            snaps[0] = view.state_dict(0)
    res = train_batched(ms, cfg, loaders, start_step=[0, 4, 4], end_step=[10, 10, 6],
                        on_step=on_step, progress=False, batching="packed")
    assert seen[:4] == [(s, [0]) for s in range(1, 5)]
    assert seen[4:6] == [(5, [0, 1, 2]), (6, [0, 1, 2])]
    assert seen[6:] == [(s, [0, 1]) for s in range(7, 11)]
    assert [r.losses.numel() for r in res] == [10, 6, 2]
    # steps [0, 4) took run 0 alone: its own model, as train() bit for bit
    first = resnet(0)
    train(first, cfg, loaders[0], end_step=4, progress=False)
    assert all(torch.equal(snaps[0][k], v) for k, v in first.state_dict().items())
    # run 1 after step 6 = run 1 trained alone over [4, 6), float tolerance
    alone = resnet(1)
    train(alone, cfg, loaders[1], start_step=4, end_step=6, progress=False)
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(snaps[1][k], v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- choices, fallbacks
def test_model_that_cannot_pack_falls_back_with_one_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 8)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 10)

        def forward(self, x):
            return self.out(F.relu(self.norm(self.fc(x))))

    ds = data.get("mnist1d")
    cfg = TrainConfig(steps=5, batch_size=50, lr=0.1, milestones=())
    loaders = [training.make_loader(ds, cfg.replace(data_seed=s)) for s in range(2)]
    torch.manual_seed(0)
    ms = [Net(), Net()]
    ref = [copy.deepcopy(m) for m in ms]
    with pytest.warns(BatchingFallbackWarning, match="LayerNorm") as rec:
        train_batched(ms, cfg, loaders, progress=False)
    assert len([w for w in rec if w.category is BatchingFallbackWarning]) == 1
    for m, r, ld in zip(ms, ref, loaders):
        train(r, cfg, ld, progress=False)
        assert states_equal(m, r)  # the loop is train() itself


def test_cumulative_batchnorm_at_different_counts_falls_back_before_training():
    """BatchNorm(momentum=None) weighs a batch by 1/count, one count per packed module: runs
    starting at different steps from equal counts would meet at different counts, so they are
    trained in a loop (one warning) instead of failing when they meet; equal starts pack."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 16)
            self.bn = nn.BatchNorm1d(16, momentum=None)
            self.out = nn.Linear(16, 10)

        def forward(self, x):
            return self.out(F.relu(self.bn(self.fc(x))))

    ds = data.get("mnist1d")
    cfg = TrainConfig(steps=6, batch_size=50, lr=0.1, momentum=0.9, milestones=())
    loaders = [training.make_loader(ds, cfg.replace(data_seed=s)) for s in range(2)]
    for starts, packs in (([0, 3], False), ([3, 3], True)):
        torch.manual_seed(0)
        ms = [Net(), Net()]
        ref = [copy.deepcopy(m) for m in ms]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            train_batched(ms, cfg, loaders, start_step=starts, progress=False,
                          batching="packed")
        fallbacks = [w for w in rec if w.category is BatchingFallbackWarning]
        assert len(fallbacks) == (0 if packs else 1), [str(w.message) for w in fallbacks]
        if not packs:
            assert "momentum=None" in str(fallbacks[0].message)
        for m, r, ld, start in zip(ms, ref, loaders, starts):
            train(r, cfg, ld, start_step=start, progress=False)
            if packs:
                assert max(rel_errors(m, r).values()) < 1e-4
            else:
                assert states_equal(m, r)  # the loop is train() itself


def test_auto_batches_on_the_cpu_only_where_it_pays():
    small = models.get("mnist1d_conv")
    big = models.get("cifar_resnet_20")
    assert batching_pays(small, torch.randn(2, 40), 100, "cpu")
    assert not batching_pays(big, torch.randn(2, 3, 32, 32), 128, "cpu")
    assert batching_pays(big, torch.randn(2, 3, 32, 32), 128, "cuda")  # a GPU: always


def test_memory_decides_how_many_runs_go_together(monkeypatch, pack_widths):
    x, y = images()
    loaders = image_loaders(x, y, runs=4)
    cfg = TrainConfig(steps=3, batch_size=8, lr=0.05, momentum=0.9, milestones=())
    model = resnet(0)
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(engine, "_free_bytes", lambda device: 10 ** 12)
    assert runs_that_fit(model, x[:2].float(), 8, "cpu") > 1000
    monkeypatch.setattr(engine, "_free_bytes", lambda device: 13 * n_params * 2.5)
    per_run_params_only = runs_that_fit(model, x[:2].float(), 8, "cpu")
    assert per_run_params_only < 3  # activations count too
    # the runs' own momentum buffers (4 B per parameter each, allocated when a packed segment
    # hands its state back) are set aside first
    left = 13 * n_params * 40
    monkeypatch.setattr(engine, "_free_bytes", lambda device: left + 4 * n_params * 12)
    twelve = runs_that_fit(model, x[:2].float(), 8, "cpu", runs=12)
    monkeypatch.setattr(engine, "_free_bytes", lambda device: left + 4 * n_params)
    assert twelve == runs_that_fit(model, x[:2].float(), 8, "cpu", runs=1) >= 2
    assert runs_that_fit(model, x[:2].float(), 8, "cpu", runs=12) < twelve
    widths = pack_widths
    monkeypatch.setattr(engine, "runs_that_fit", lambda *a, **k: 2)
    ms = [resnet(s) for s in range(4)]
    ref = [copy.deepcopy(m) for m in ms]
    train_batched(ms, cfg, loaders, progress=False, batching="packed")
    assert widths[1:] == [2, 2]  # widths[0]: the packability probe of all 4
    widths.clear()
    train_batched(ref, cfg, loaders, progress=False, batching="packed", max_batch_runs=3)
    assert widths[1:] == [3]  # then the fourth run alone (its own model, no packing)
    for a, b in zip(ms, ref):
        assert max(rel_errors(a, b).values()) < 1e-4


def test_arguments_are_checked():
    x, y = images()
    loaders = image_loaders(x, y, runs=2)
    cfg = TrainConfig(steps=2, batch_size=8, milestones=())
    ms = [resnet(0), resnet(1)]
    with pytest.raises(ValueError, match="batching"):
        train_batched(ms, cfg, loaders, batching="vmap")
    with pytest.raises(ValueError, match="expected 2 values"):
        train_batched(ms, cfg, loaders[:1] * 3)
    with pytest.raises(ValueError, match="differ only in init_seed"):
        train_batched(ms, [cfg, cfg.replace(lr=0.3)], loaders)
    with pytest.raises(ValueError, match="max_batch_runs"):
        train_batched(ms, cfg, loaders, max_batch_runs=0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        train_batched(ms, cfg, loaders, cuda_graph=True)
    with pytest.raises(ValueError, match="precision"):
        train_batched(ms, cfg, loaders, precision="fp8")
    with pytest.raises(TypeError, match="one per run"):
        train_batched(ms, cfg, loaders, checkpoint=["x", None])


# -------------------------------------------------------------------------------- divergence
def test_a_diverging_run_stops_at_its_first_non_finite_loss(tmp_path):
    ds = data.get("mnist1d")
    cfg = TrainConfig(steps=40, batch_size=100, lr=1e4, momentum=0.9, milestones=())
    with pytest.raises(NonFiniteLossError) as err:
        train(models.get("mnist1d_mlp", seed=0), cfg, ds, progress=False)
    e = err.value
    assert e.lr == 1e4 and 0 < e.step < 40 and not math.isfinite(e.loss)
    assert f"step {e.step}" in str(e) and "lr 10000" in str(e)
    loaders = [training.make_loader(ds, cfg.replace(data_seed=s)) for s in range(2)]
    ms = [models.get("mnist1d_mlp", seed=0), models.get("mnist1d_mlp", seed=1)]
    cks = [Checkpoint(tmp_path / f"{i}.pt", every=1) for i in range(2)]
    with pytest.raises(NonFiniteLossError) as err:
        train_batched(ms, cfg, loaders, checkpoint=cks, progress=False, batching="packed")
    assert err.value.run in (0, 1) and err.value.step >= 1
    for ck in cks:  # no checkpoint holds the diverged state
        state = torch.load(ck.path, weights_only=False)
        assert state["step"] <= err.value.step and torch.isfinite(state["losses"]).all()


# --------------------------------------------------------------------- options of the step
def test_graph_step_replays_the_eager_step(monkeypatch):
    """Everything of cuda_graph=True but the capture itself: static inputs, warm-up steps, the
    tensor lr, eager steps for the smaller last batch of an epoch, with and without the optimizer
    in the graph; equal to the eager program bit for bit on the CPU."""
    x, y = images(n=36)  # 36 = 4 batches of 8 + one of 4
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=12, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                      milestones=(7,), gamma=0.5)
    masks = [random_masks(resnet(0), 0.6, s) for s in range(N)]
    ref = [resnet(s) for s in range(N)]
    ref_res = train_batched(ref, cfg, loaders, masks, progress=False, batching="packed")
    made = []
    monkeypatch.setattr(graph, "supported", lambda device: True)

    def emulated(device):
        made.append(graph.EmulatedGraph())
        return made[-1]
    monkeypatch.setattr(graph, "new_graph", emulated)
    for in_graph in (True, False):
        monkeypatch.setattr(graph, "optimizer_capturable", lambda *a, _v=in_graph: _v)
        got = [resnet(s) for s in range(N)]
        res = train_batched(got, cfg, loaders, masks, progress=False, batching="packed",
                            cuda_graph=True)
        assert made[-1].captured
        for a, b, ra, rb in zip(got, ref, res, ref_res):
            assert states_equal(a, b) and torch.equal(ra.losses, rb.losses)


def test_bf16_and_channels_last_options_train():
    x, y = images()
    loaders = image_loaders(x, y)
    cfg = TrainConfig(steps=4, batch_size=8, lr=0.05, momentum=0.9, milestones=())
    ref = [resnet(s) for s in range(N)]
    train_batched(ref, cfg, loaders, progress=False, batching="packed")
    cl = [resnet(s) for s in range(N)]
    train_batched(cl, cfg, loaders, progress=False, batching="packed", channels_last=True)
    bf = [resnet(s) for s in range(N)]
    res = train_batched(bf, cfg, loaders, progress=False, batching="packed", precision="bf16")
    for a, b, c, r in zip(ref, cl, bf, res):
        assert max(rel_errors(a, b).values()) < 1e-4
        assert all(p.dtype == torch.float32 for p in c.parameters())  # fp32 master weights
        assert torch.isfinite(r.losses).all()
        assert not states_equal(a, c)
    one, plain = resnet(0), resnet(0)  # one run with an option: the engine, not train()
    got = train_batched([one], cfg, loaders[:1], progress=False, precision="bf16")[0]
    want = train(plain, cfg, loaders[0], progress=False)
    torch.testing.assert_close(got.losses, want.losses, rtol=0.05, atol=0.05)
    assert not torch.equal(got.losses, want.losses)


def test_gpu_check_runs_with_an_emulated_graph():
    """benchmarks.bench_batched.gpu_check (what the GPU check times) end to end on the CPU."""
    from benchmarks.bench_batched import gpu_check, gpu_table
    res = gpu_check("cpu", runs=2, batch_size=4, steps=1)
    for k in ("eager_loop", "packed fp32", "packed + graph fp32", "packed bf16",
              "packed + graph bf16"):
        assert res[k] > 0, k
    assert res["graphs_captured"]
    assert "run-steps/s" in gpu_table(res).render()


def test_equality_check_judges_and_can_fail(monkeypatch):
    """benchmarks.bench_batched.equality_check (the GPU check's judged batched step): packed
    runs against separate ones and the graph program against the eager one pass on the CPU; a
    graph that replays a step twice fails it."""
    from benchmarks.bench_batched import EQUALITY_TOL, equality_check
    kw = dict(runs=2, batch_size=4, steps=5, side=8, width=4)
    res = equality_check("cpu", **kw)
    assert res["ok"], res
    assert res["graph_captured"] and res["pruned_weights_zero"]
    assert res["packed_vs_separate"] <= EQUALITY_TOL["packed_vs_separate"]
    real = graph.EmulatedGraph.replay

    def twice(self):
        real(self)
        return real(self)
    monkeypatch.setattr(graph.EmulatedGraph, "replay", twice)
    bad = equality_check("cpu", **kw)
    assert not bad["ok"] and bad["graph_vs_eager"] > 100 * EQUALITY_TOL["graph_vs_eager"], bad
