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
    monkeypatch.setattr(st, "save_file", boom)
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
