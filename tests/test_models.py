import pytest
import torch
from torch import nn

import fastimp
from fastimp import models


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_registry_names_and_aliases():
    assert {"cifar_resnet_20", "cifar_resnet_18", "resnet50", "mnist1d_mlp",
            "mnist1d_conv"} <= set(models.names())
    assert type(models.get("resnet20")) is type(models.get("cifar_resnet_20"))
    with pytest.raises(ValueError, match="unknown model 'nope'.*cifar_resnet_20"):
        models.get("nope")
    with pytest.raises(ValueError, match="num_classes"):
        models.get("mnist1d_mlp", num_classes=0)
    with pytest.raises(TypeError):
        models.get(3)


def test_register_custom_model():
    @models.register("test_tiny_linear")
    def tiny(num_classes=3):
        return nn.Linear(4, num_classes)

    assert "test_tiny_linear" in models.names()
    assert models.get("test_tiny_linear").out_features == 3
    assert models.get("test_tiny_linear", num_classes=5).out_features == 5


def test_resnet20_matches_he_et_al_and_openlth():
    m = models.get("cifar_resnet_20")
    # 16-32-64 channels, 3 stages x 3 basic blocks; option B: 1x1 conv + BN shortcuts (OpenLTH).
    assert n_params(m) == 272474
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 19  # + fc = 20 layers
    assert [c.out_channels for c in convs if c.kernel_size == (1, 1)] == [32, 64]
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    a = models.get("cifar_resnet_20", shortcut="A")
    assert n_params(a) == 272474 - (16 * 32 + 64) - (32 * 64 + 128)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.get("resnet20", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError, match="shortcut"):
        models.get("resnet20", shortcut="C")


def test_option_a_shortcut_is_zero_padded_subsampling():
    from fastimp.models.cifar_resnet import _ShortcutA
    x = torch.randn(2, 16, 8, 8)
    out = _ShortcutA(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet18_cifar_has_3x3_stem_and_no_maxpool():
    m = models.get("cifar_resnet_18", num_classes=10)
    assert n_params(m) == 11173962
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    assert m.conv.kernel_size == (3, 3) and m.conv.stride == (1, 1)
    assert m.bn(m.conv(torch.randn(1, 3, 32, 32))).shape == (1, 64, 32, 32)
    assert models.get("resnet18")(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet50_is_torchvision():
    torchvision = pytest.importorskip("torchvision")
    m = models.get("resnet50", num_classes=7, seed=0)
    assert isinstance(m, torchvision.models.ResNet)
    assert m.fc.out_features == 7
    assert n_params(m) == 25557032 - 1000 * 2049 + 7 * 2049


@pytest.mark.parametrize("name", ["mnist1d_mlp", "mnist1d_conv"])
def test_mnist1d_models(name):
    m = models.get(name, seed=0)
    assert m(torch.randn(5, 40)).shape == (5, 10)
    assert models.get(name, num_classes=3)(torch.randn(2, 40)).shape == (2, 3)
    assert len(fastimp.prunable(m)) >= 3


@pytest.mark.parametrize("name,kwargs,argument", [
    ("mnist1d_conv", {"channels": -3}, "channels"),
    ("mnist1d_conv", {"channels": 1.5}, "channels"),
    ("mnist1d_conv", {"length": 2}, "length"),
    ("mnist1d_mlp", {"hidden": [-1]}, "hidden"),
    ("mnist1d_mlp", {"hidden": [0]}, "hidden"),
    ("mnist1d_mlp", {"hidden": 5}, "hidden"),
    ("mnist1d_mlp", {"in_features": 0}, "in_features"),
    ("cifar_resnet_20", {"width": 0}, "width"),
    ("cifar_resnet_18", {"width": True}, "width"),
])
def test_registered_models_check_their_arguments(name, kwargs, argument, recwarn):
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        models.get(name, **kwargs)
    assert not recwarn.list  # refused before torch warns about empty tensors


def test_seed_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = models.get("cifar_resnet_20", seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = models.get("cifar_resnet_20", seed=7).state_dict()
    c = models.get("cifar_resnet_20", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])
    with pytest.raises(TypeError, match="seed"):
        models.get("mnist1d_mlp", seed="1")


def test_kaiming_normal_init():
    m = models.get("cifar_resnet_18", seed=0)
    w = m.blocks[-1].conv2.weight.detach()
    fan_in = w[0].numel()
    assert abs(float(w.std()) / (2.0 / fan_in) ** 0.5 - 1) < 0.02
    bn = m.blocks[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_prunable_are_conv_and_linear_weights():
    m = models.get("cifar_resnet_20")
    names = list(fastimp.prunable(m))
    assert names[0] == "conv.weight" and names[-1] == "fc.weight"
    assert len(names) == 19 + 2 + 1
