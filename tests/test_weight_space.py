"""WeightSpace: the flat w ∈ R^D, masks in it, geometry, buffers."""
import pytest
import torch
from torch import nn

import fastimp
from fastimp.masks import Masks, prunable
from fastimp.weight_space import WeightSpace


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 6), nn.Linear(6, 2, bias=False))


def test_layout():
    model = _net()
    ws = WeightSpace(model)
    assert fastimp.WeightSpace is WeightSpace
    assert ws.names == [n for n, _ in model.named_parameters()]
    assert ws.D == sum(p.numel() for p in model.parameters())
    coords = ws.prunable_coords
    assert coords.dtype == torch.bool and coords.shape == (ws.D,)
    assert int(coords.sum()) == sum(p.numel() for p in prunable(model).values())
    a, b = ws.slices["4.weight"]
    assert bool(coords[a:b].all()) and not bool(coords[slice(*ws.slices["4.bias"])].any())
    assert ws.buffer_names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_flat_roundtrip():
    model = _net()
    ws = WeightSpace(model)
    w = ws.flat()
    assert w.shape == (ws.D,)
    assert torch.equal(w, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    w2 = torch.randn(ws.D)
    ws.set_flat_(w2)
    assert torch.equal(ws.flat(), w2)
    parts = ws.unflatten(w2)
    for n, p in model.named_parameters():
        assert torch.equal(parts[n], p.detach())
    assert torch.equal(ws.flatten(model.state_dict()), w2)  # buffers in the state dict ignored
    assert torch.equal(ws.flatten(parts), w2)
    batch = torch.randn(3, ws.D)
    ub = ws.unflatten(batch)
    assert ub["0.weight"].shape == (3, 4, 3, 3, 3)
    assert torch.equal(ub["5.weight"][1], batch[1, slice(*ws.slices["5.weight"])].view(2, 6))
    with pytest.raises(ValueError, match="length"):
        ws.set_flat_(torch.zeros(ws.D + 1))
    with pytest.raises(ValueError, match="missing"):
        ws.flatten({"0.weight": model[0].weight})
    sd = model.state_dict()
    sd["0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        ws.flatten(sd)


def test_mask_vector_and_projection():
    model = _net()
    ws = WeightSpace(model)
    masks = fastimp.prune_random(model, 0.5, generator=torch.Generator().manual_seed(0))
    v = ws.mask_vector(masks)
    assert v.dtype == torch.bool
    assert torch.equal(v[~ws.prunable_coords], torch.ones(int((~ws.prunable_coords).sum()),
                                                            dtype=torch.bool))
    assert int(v[ws.prunable_coords].sum()) == masks.remaining()
    assert bool(ws.mask_vector(None).all())
    w = ws.flat()
    p = ws.project(w, masks)
    assert torch.equal(p[v], w[v]) and bool((p[~v] == 0).all())
    masks.apply_(model)
    assert torch.equal(ws.flat(), p)
    with pytest.raises(ValueError, match="no parameter"):
        ws.mask_vector({"x": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        ws.mask_vector({"5.weight": torch.ones(6, 2)})


def test_distance_and_interpolate():
    ws = WeightSpace(_net())
    a, b = torch.randn(ws.D), torch.randn(ws.D)
    r = ws.distance(a, b)
    assert isinstance(r, float)
    exact = float(((a.double() - b.double()) ** 2).sum().sqrt())
    assert abs(r - exact) <= 1e-12 * exact
    assert ws.distance(a, a) == 0.0
    assert torch.equal(ws.interpolate(a, b, 0.0), a)
    assert torch.allclose(ws.interpolate(a, b, 1.0), b)
    mid = ws.interpolate(a, b, 0.5)
    assert torch.allclose(mid, (a + b) / 2, atol=1e-6)
    t = torch.tensor([0.0, 0.25, 1.0])
    path = ws.interpolate(a, b, t)
    assert path.shape == (3, ws.D)
    assert torch.allclose(path[1], a + 0.25 * (b - a)) and torch.allclose(path[2], b)
    assert abs(ws.distance(a, mid) - r / 2) < 1e-5 * r


def test_random_direction():
    model = _net()
    ws = WeightSpace(model)
    masks = fastimp.prune_magnitude(model, 0.7)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    u = ws.random_direction(2.5, masks, generator=g())
    assert u.shape == (ws.D,) and u.dtype == torch.float32
    assert abs(float(u.double().norm()) - 2.5) < 1e-5
    assert bool((u[~ws.mask_vector(masks)] == 0).all())
    assert int((u != 0).sum()) == int(ws.mask_vector(masks).sum())  # fills the axial subspace
    assert torch.equal(u, ws.random_direction(2.5, masks, generator=g()))
    assert not torch.equal(u, ws.random_direction(2.5, masks))
    full = ws.random_direction(1.0)
    assert abs(float(full.double().norm()) - 1.0) < 1e-6 and int((full != 0).sum()) == ws.D
    with pytest.raises(ValueError, match="'norm'"):
        ws.random_direction(-1.0)


def test_buffers_separate():
    model = _net()
    model.train()
    model(torch.randn(2, 3, 7, 7))
    ws = WeightSpace(model)
    b = ws.buffers_flat()
    assert b.shape == (ws.buffer_D,) == (4 + 4 + 1,)
    assert float(b[-1]) == 1.0  # num_batches_tracked
    w_before = ws.flat()
    b2 = torch.arange(ws.buffer_D, dtype=torch.float32) + 0.25
    ws.set_buffers_flat_(b2)
    assert torch.equal(model[1].running_mean, b2[:4])
    assert int(model[1].num_batches_tracked) == 8 and model[1].num_batches_tracked.dtype == \
        torch.int64
    assert torch.equal(ws.flat(), w_before)  # parameters untouched
    with pytest.raises(ValueError, match="'b'"):
        ws.set_buffers_flat_(torch.zeros(3))


def test_include_and_masks_interplay():
    model = _net()
    ws = WeightSpace(model, include=["4.weight"])
    assert int(ws.prunable_coords.sum()) == model[4].weight.numel()
    m = Masks({"4.weight": torch.zeros(6, 100, dtype=torch.bool)})
    assert int((~ws.mask_vector(m)).sum()) == 600
