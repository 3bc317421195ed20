"""prunable() and Masks: counts, apply, save/load, equality, torch.nn.utils.prune interop."""
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastimp
from fastimp.masks import Masks, prunable


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.c3 = nn.Conv3d(4, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 3)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(3, 2))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_prunable_default_and_overrides():
    model = _net()
    names = list(prunable(model))
    assert names == ["c1.weight", "c2.weight", "c3.weight", "fc.weight", "head.1.weight"]
    order = [n for n, _ in model.named_parameters() if n in names]
    assert names == order
    assert prunable(model)["fc.weight"] is model.fc.weight
    assert list(prunable(model, ["fc.bias", "c1.weight"])) == ["c1.weight", "fc.bias"]
    pred = prunable(model, lambda name, mod, p: isinstance(mod, nn.Linear))
    assert list(pred) == ["fc.weight", "fc.bias", "head.1.weight", "head.1.bias"]
    with pytest.raises(ValueError, match="no parameters named"):
        prunable(model, ["nope"])
    with pytest.raises(TypeError, match="'model'"):
        prunable({"a": torch.ones(1)})
    assert fastimp.prunable is prunable and fastimp.Masks is Masks


def test_counts_and_readonly():
    model = _net()
    m = Masks.ones(model)
    total = sum(p.numel() for p in prunable(model).values())
    assert (m.remaining(), m.total(), m.density(), m.sparsity()) == (total, total, 1.0, 0.0)
    d = {n: t.clone() for n, t in m.items()}
    d["fc.weight"][0, :5] = False
    d["c1.weight"].zero_()
    m2 = Masks(d)
    assert m2.remaining() == total - 5 - model.c1.weight.numel()
    pl = m2.per_layer()
    assert pl["fc.weight"].remaining == 19 and pl["fc.weight"].total == 24
    assert pl["c1.weight"].density == 0.0 and pl["c1.weight"].sparsity == 1.0
    assert abs(m2.density() + m2.sparsity() - 1) < 1e-12
    with pytest.raises(TypeError):
        m2["fc.weight"] = torch.ones(3, 8, dtype=torch.bool)
    d["fc.weight"][:] = True  # Masks copied (or owns) its tensors: the dict is not aliased
    assert m2["fc.weight"].sum() == 19


def test_construction_checks():
    ok = Masks({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1, 0]], dtype=torch.uint8)})
    assert ok["a"].dtype == torch.bool and ok["a"].tolist() == [False, True]
    with pytest.raises(ValueError, match="binary"):
        Masks({"a": torch.tensor([0.0, 0.5])})
    with pytest.raises(TypeError):
        Masks({"a": [1, 0]})
    with pytest.raises(TypeError):
        Masks([torch.ones(2)])


def test_apply_and_for_params():
    model = _net()
    d = {n: torch.rand(p.shape) < 0.5 for n, p in prunable(model).items()}
    m = Masks(d)
    m.apply_(model)
    for n, p in prunable(model).items():
        assert bool((p[~d[n]] == 0).all())
    fp = m.for_params(model)
    assert set(map(id, fp)) == set(map(id, prunable(model).values()))
    assert torch.equal(fp[model.fc.weight], d["fc.weight"])
    with pytest.raises(ValueError, match="no parameter named"):
        Masks({"zzz": torch.ones(2)}).apply_(model)
    with pytest.raises(ValueError, match="shape"):
        Masks({"fc.weight": torch.ones(8, 3)}).apply_(model)


def test_equality_and_to():
    model = _net()
    a, b = Masks.ones(model), Masks.ones(model)
    assert a == b and a == {n: t.clone() for n, t in b.items()}
    c = {n: t.clone() for n, t in b.items()}
    c["c2.weight"][0, 0, 0, 0] = False
    assert a != Masks(c)
    assert a != Masks({n: t for n, t in b.items() if n != "fc.weight"})
    assert a.to("cpu") == a and a.cpu()["fc.weight"].device.type == "cpu"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_atomic(tmp_path, suffix):
    model = _net()
    m = fastimp.prune_random(model, 0.4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "sub" / f"mask{suffix}"
    m.save(path)
    Masks.ones(model).save(path)  # overwrite
    m.save(path)
    back = Masks.load(path)
    assert back == m and list(back) == list(m)
    assert sorted(os.listdir(tmp_path / "sub")) == [f"mask{suffix}"]  # no temp files left
    with pytest.raises(FileNotFoundError):
        Masks.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a mask file")
    with pytest.raises(ValueError, match="neither"):
        Masks.load(tmp_path / "junk")


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    model = _net()
    m = Masks.ones(model)
    path = tmp_path / "m.safetensors"
    m.save(path)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save", boom)  # Masks.save serializes with it
    with pytest.raises(OSError):
        fastimp.prune_random(model, 0.5).save(path)
    assert Masks.load(path) == m and os.listdir(tmp_path) == ["m.safetensors"]


def test_torch_prune_roundtrip():
    model = _net(1)
    m = fastimp.prune_magnitude(model, 0.5)
    x = torch.randn(2, 8)
    m.to_torch_prune(model)
    assert hasattr(model.fc, "weight_mask") and hasattr(model.fc, "weight_orig")
    assert Masks.from_torch_prune(model) == m
    assert bool((model.fc.weight[~m["fc.weight"]] == 0).all())
    # replacing the mask of an already pruned parameter
    m2 = fastimp.prune_random(_net(1), 0.7, generator=torch.Generator().manual_seed(1))
    m2.to_torch_prune(model)
    assert Masks.from_torch_prune(model) == m2
    y = model.fc(x)
    assert torch.allclose(y, x @ (model.fc.weight_orig * m2["fc.weight"]).T + model.fc.bias)


def test_from_torch_prune_global_unstructured():
    model = _net(2)
    params = [(mod, "weight") for mod in (model.c1, model.c2, model.fc)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.3)
    m = Masks.from_torch_prune(model)
    assert list(m) == ["c1.weight", "c2.weight", "fc.weight"]
    assert m.remaining() == m.total() - round(0.3 * m.total())
    with pytest.raises(ValueError, match="no torch.nn.utils.prune"):
        Masks.from_torch_prune(_net())


def _mlp(seed=0, tied=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    if tied:
        model[2].weight = model[0].weight  # one parameter in two modules
    return model


def test_model_still_under_torch_prune():
    """Masks taken from a model under torch.nn.utils.prune map onto its weight_orig parameters;
    what fastimp cannot use as is (prunable, Masks.ones) says to remove the reparametrization."""
    model = _mlp()
    prune.global_unstructured([(model[0], "weight"), (model[4], "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.4)
    m = Masks.from_torch_prune(model)
    assert list(m) == ["0.weight", "4.weight"]
    by_param = m.for_params(model)
    assert set(map(id, by_param)) == {id(model[0].weight_orig), id(model[4].weight_orig)}
    assert all(torch.equal(v, m["0.weight" if p is model[0].weight_orig else "4.weight"])
               for p, v in by_param.items())
    with torch.no_grad():
        model[0].weight_orig.fill_(1.0)
    m.apply_(model)
    assert torch.equal(model[0].weight_orig, m["0.weight"].float())
    for call in (lambda: Masks.ones(model), lambda: prunable(model),
                 lambda: fastimp.prune_magnitude(model, 0.2)):
        with pytest.raises(ValueError, match="under torch.nn.utils.prune.*remove=True"):
            call()
    # remove=True: plain parameters holding m . w, and fastimp works on the model again
    effective = (model[0].weight_orig * model[0].weight_mask).detach()
    m2 = Masks.from_torch_prune(model, remove=True)
    assert m2 == m and not hasattr(model[0], "weight_orig")
    assert isinstance(model[0].weight, nn.Parameter) and torch.equal(model[0].weight, effective)
    assert list(Masks.ones(model)) == ["0.weight", "2.weight", "4.weight"]


def test_tied_weights_are_pruned_in_every_module():
    model = _mlp(tied=True)
    assert list(prunable(model)) == ["0.weight", "4.weight"]  # named_parameters: one name
    m = fastimp.prune_magnitude(model, 0.5)
    m.to_torch_prune(model)
    for i in (0, 2):  # both aliases masked, and still one parameter
        assert torch.equal(model[i].weight, model[0].weight_orig * m["0.weight"])
    assert model[2].weight_orig is model[0].weight_orig
    x = torch.randn(5, 6)
    w = model[0].weight_orig.detach() * m["0.weight"]
    h = torch.relu(torch.relu(x @ w.T + model[0].bias) @ w.T + model[2].bias)
    assert torch.allclose(model(x), h @ model[4].weight.T + model[4].bias)
    back = Masks.from_torch_prune(model, remove=True)
    assert back["2.weight"].equal(m["0.weight"]) and model[2].weight is model[0].weight


@pytest.mark.parametrize("nesterov", [False, True])
def test_masked_sgd_on_a_torch_pruned_model_matches_torch_sgd(nesterov):
    """torch.nn.utils.prune + torch.optim.SGD (the gradient of weight_orig is masked by the
    product) and fastimp.MaskedSGD with the model's masks train the same effective weights."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    models = []
    for _ in range(2):
        model = _mlp(3)
        prune.global_unstructured([(model[0], "weight"), (model[2], "weight")],
                                  pruning_method=prune.L1Unstructured, amount=0.5)
        models.append(model)
    ref, ours = models
    opt_ref = torch.optim.SGD(ref.parameters(), **kw)
    masks = Masks.from_torch_prune(ours)
    opt = fastimp.MaskedSGD(ours.parameters(), masks=masks.for_params(ours), **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for i in (0, 2, 4):
        assert torch.allclose(ours[i].weight, ref[i].weight, rtol=1e-5, atol=1e-6)
    assert bool((ours[0].weight_orig[~masks["0.weight"]] == 0).all())  # pruned stay exactly 0
