"""Presets against Appendix B of the paper (paper/unmasking-lottery-ticket.txt, lines 243-247)."""
import pytest

from fastimp import presets
from fastimp.imp import IMPConfig

# Appendix B, verbatim numbers: (model, dataset, batch, steps, lr, momentum, wd, schedule,
# milestones, gamma, warmup, decoupled, rounds, rewind steps, replicates)
APPENDIX_B = {
    "cifar10-resnet20": dict(  # line 243
        model="cifar_resnet_20", dataset="cifar10", batch_size=128, steps=62400, lr=0.1,
        momentum=0.9, weight_decay=0.0001, schedule="step", milestones=(31200, 46800), gamma=0.1,
        warmup=0, decoupled=False, levels=12, rewind_steps=[0, 250, 2000], replicates=4),
    "cifar100-resnet18": dict(  # line 245
        model="cifar_resnet_18", dataset="cifar100", batch_size=128, steps=78125, lr=0.1,
        momentum=0.9, weight_decay=0.0005, schedule="step", milestones=(23438, 46875, 62500),
        gamma=0.2, warmup=0, decoupled=False, levels=15, rewind_steps=[0, 400, 3200],
        replicates=4),
    "imagenet-resnet50": dict(  # line 247
        model="resnet50", dataset="imagenet", batch_size=2048, steps=15970, lr=2.048,
        momentum=0.875, weight_decay=0.0005, schedule="cosine", milestones=(), gamma=None,
        warmup=5000, decoupled=True, levels=12, rewind_steps=[0, 1250, 5000], replicates=4),
}


@pytest.mark.parametrize("name", sorted(APPENDIX_B))
def test_paper_presets_match_appendix_b(name):
    want = APPENDIX_B[name]
    c = presets.get(name)
    t = c.train
    assert (c.model, c.dataset) == (want["model"], want["dataset"])
    assert t.batch_size == want["batch_size"]
    assert t.total_steps(391) == t.total_steps(390) == want["steps"]  # given in iterations
    assert (t.lr, t.momentum) == (want["lr"], want["momentum"])
    if want["decoupled"]:
        # Composer's DecoupledSGDW multiplies p by 1 - (lr / initial_lr) * wd; MaskedSGD's
        # decoupled decay is lr * wd, so at the peak lr the per-step decay must be Appendix B's wd.
        assert t.lr * t.weight_decay == pytest.approx(want["weight_decay"], rel=1e-12)
    else:
        assert t.weight_decay == want["weight_decay"]
    assert t.schedule == want["schedule"] and t.decoupled_weight_decay == want["decoupled"]
    assert t.milestone_steps(391) == want["milestones"]
    if want["gamma"] is not None:
        assert t.gamma == pytest.approx(want["gamma"])
    assert t.warmup(391) == want["warmup"]
    assert t.nesterov is False
    # 20% of the smallest-magnitude weights per round, weight rewinding (Algorithm 1)
    assert (c.levels, c.pruning_fraction, c.pruning, c.strategy) == (want["levels"], 0.2,
                                                                     "magnitude", "wr")
    assert c.rewind_steps == want["rewind_steps"] and c.replicates == 4
    assert c.replicate_seeds == [0, 1, 2, 3]


def test_paper_schedules():
    c10 = presets.get("cifar10-resnet20").train
    assert [c10.lr_at(s) for s in (0, 31199, 31200, 46799, 46800, 62399)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    c100 = presets.get("cifar100-resnet18").train
    assert [c100.lr_at(s) for s in (0, 23438, 46875, 62500)] == pytest.approx(
        [0.1, 0.02, 0.004, 0.0008])
    im = presets.get("imagenet-resnet50").train
    assert im.lr_at(4999) == pytest.approx(2.048) and im.lr_at(0) < 0.01
    assert im.lr_at(15969) < 1e-3 * 2.048  # cosine decays to ~0 at the end


def test_mnist1d_default():
    c = presets.get("mnist1d")
    assert c.dataset == "mnist1d" and c.levels >= 8 and c.device == "cpu"
    assert c.replicates >= 2  # so that matching has its eps (std of dense replicates)
    assert 0.8 ** c.levels < 0.1


def test_registry():
    assert {"cifar10-resnet20", "cifar100-resnet18", "imagenet-resnet50", "mnist1d"} <= \
        set(presets.names())
    a, b = presets.get("mnist1d"), presets.get("mnist1d")
    assert a == b and a is not b and a.train is not b.train  # fresh copies
    with pytest.raises(ValueError, match="unknown name"):
        presets.get("nope")

    @presets.register("test-tiny")
    def tiny():
        return presets.get("mnist1d").replace(levels=1)
    try:
        assert isinstance(presets.get("test-tiny"), IMPConfig)
        assert presets.get("test-tiny").levels == 1
    finally:
        presets._PRESETS.pop("test-tiny")
