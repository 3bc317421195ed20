import pickle
import random

import numpy as np
import pytest
import torch

from fastimp import data
from fastimp.data import Loader, random_crop_flip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------ CIFAR in torchvision's format
def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        _write_pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                                    "labels": y, "data": x,
                                                    "filenames": [f"{i}_{j}.png"
                                                                  for j in range(per_batch)]})
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test).tolist()
    _write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": yt,
                                          "data": xt, "filenames": ["t.png"] * n_test})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    _write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch,
                                            "label_names": names, "num_vis": 3072})
    return np.concatenate(xs), np.array(ys), xt, np.array(yt), names


def test_cifar10_reads_torchvision_layout(tmp_path):
    x, y, xt, yt, names = _write_cifar10(tmp_path)
    ds = data.get("cifar10", root=tmp_path)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32) and ds.classes == names
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (15, 3, 32, 32)
    # torchvision: data.reshape(-1, 3, 32, 32) (then HWC for PIL); we keep CHW
    assert torch.equal(ds.train.x, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert torch.equal(ds.train.y, torch.from_numpy(y))
    assert torch.equal(ds.test.x, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
    assert torch.equal(ds.test.y, torch.from_numpy(yt))
    assert ds.augment == "cifar" and ds.mean == data.CIFAR10_MEAN
    assert data.get("CIFAR-10", root=tmp_path).train.x.shape[0] == 15


def test_cifar10_test_loader_normalizes(tmp_path):
    x, y, xt, yt, _ = _write_cifar10(tmp_path)
    ds = data.get("cifar10", root=tmp_path)
    xb, yb = next(iter(ds.loader("test", batch_size=4)))
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    ref = (torch.from_numpy(xt.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(xb, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(yb, torch.from_numpy(yt))


def test_cifar100_reads_torchvision_layout(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, 6).tolist()
    xt = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    fine_t = [99, 0]
    _write_pickle(folder / "train", {"filenames": ["a"] * 6, "batch_label": "training batch 1 of 1",
                                     "fine_labels": fine, "coarse_labels": [1] * 6, "data": x})
    _write_pickle(folder / "test", {"filenames": ["b"] * 2, "batch_label": "testing batch 1 of 1",
                                    "fine_labels": fine_t, "coarse_labels": [2, 3], "data": xt})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                    "coarse_label_names": [f"s{i}" for i in range(20)]})
    ds = data.get("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.classes[99] == "c99"
    assert torch.equal(ds.train.x, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert ds.train.y.tolist() == fine and ds.test.y.tolist() == fine_t
    assert ds.mean == data.CIFAR100_MEAN


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_cifar_missing_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as e:
        data.get(name, root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and folder in msg and "download=True" in msg


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10"):
        data.get("svhn")


# ------------------------------------------------------------------------- ImageFolder
@pytest.fixture
def image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("ant", "bee"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
                img.save(d / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"))
    return tmp_path


def test_imagenet_imagefolder(image_folder):
    ds = data.get("imagenet", root=image_folder, image_size=8, resize_size=9)
    assert ds.num_classes == 2 and ds.classes == ["ant", "bee"]
    assert len(ds.train) == 6 and len(ds.test) == 4
    loader = ds.loader("train", batch_size=4, seed=3)
    assert loader.iterations_per_epoch == 2
    batches = list(loader.epoch(0))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 0, 1, 1, 1]
    test = list(ds.loader("test", batch_size=3))
    assert torch.cat([y for _, y in test]).tolist() == [0, 0, 1, 1]


def test_imagefolder_loader_deterministic_and_resumable(image_folder):
    ds = data.get("imagenet", root=image_folder, image_size=8, resize_size=9)
    ref = list(ds.loader("train", batch_size=2, seed=5).steps(0, 7))
    again = list(ds.loader("train", batch_size=2, seed=5).steps(0, 7))
    resumed = list(ds.loader("train", batch_size=2, seed=5).steps(4, 7))
    for (a, ya), (b, yb) in zip(ref, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    for (a, ya), (b, yb) in zip(ref[4:], resumed):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    x4, y4 = ds.loader("train", batch_size=2, seed=5).batch(4)
    assert torch.equal(x4, ref[4][0]) and torch.equal(y4, ref[4][1])
    other = list(ds.loader("train", batch_size=2, seed=6).steps(0, 3))
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(ref, other))


def test_imagefolder_workers_do_not_change_batches(image_folder):
    ds = data.get("imagenet", root=image_folder, image_size=8, resize_size=9)
    a = list(ds.loader("train", batch_size=4, seed=1).steps(0, 3))
    b = list(ds.loader("train", batch_size=4, seed=1, num_workers=1).steps(0, 2))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        data.get("imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        data.get("imagenet")


# ------------------------------------------------------------------------------ Loader
def _index_loader(n=10, batch=4, **kw):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return Loader(x, torch.arange(n), batch, **kw)


def test_loader_epochs_are_permutations():
    ld = _index_loader(10, 4, seed=1)
    assert ld.iterations_per_epoch == len(ld) == 3
    e0 = [y for _, y in ld.epoch(0)]
    assert [len(y) for y in e0] == [4, 4, 2]
    assert sorted(torch.cat(e0).tolist()) == list(range(10))
    e1 = torch.cat([y for _, y in ld.epoch(1)])
    assert sorted(e1.tolist()) == list(range(10)) and not torch.equal(e1, torch.cat(e0))
    for x, y in ld.epoch(0):
        assert torch.equal(x[:, 0].long(), y)


def test_loader_drop_last_and_order():
    ld = _index_loader(10, 4, seed=1, drop_last=True)
    assert ld.iterations_per_epoch == 2
    assert [len(y) for _, y in ld.epoch(0)] == [4, 4]
    ordered = _index_loader(10, 4, shuffle=False)
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))
    empty = _index_loader(3, 4, drop_last=True)
    assert empty.iterations_per_epoch == 0
    with pytest.raises(ValueError, match="no batch"):
        empty.batch(0)


def test_loader_seeded_and_resumable_across_epochs():
    a = [y for _, y in _index_loader(10, 4, seed=2).steps(0, 8)]
    b = [y for _, y in _index_loader(10, 4, seed=2).steps(5, 8)]
    c = [y for _, y in _index_loader(10, 4, seed=3).steps(0, 8)]
    assert all(torch.equal(p, q) for p, q in zip(a[5:], b))
    assert any(not torch.equal(p, q) for p, q in zip(a, c))
    assert torch.equal(_index_loader(10, 4, seed=2).batch(6)[1], a[6])


def test_loader_validates():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(x, torch.zeros(4), 0)
    with pytest.raises(ValueError, match="examples"):
        Loader(x, torch.zeros(3), 2)
    with pytest.raises(ValueError, match="augment"):
        Loader(x, torch.zeros(4), 2, augment="mixup")
    with pytest.raises(ValueError, match="images"):
        Loader(x, torch.zeros(4), 2, augment="cifar")
    with pytest.raises(TypeError, match="seed"):
        Loader(x, torch.zeros(4), 2, seed=1.5)


def _crop_flip_reference(x, offsets, flips, pad):
    out = []
    for img, (top, left), f in zip(x, offsets.tolist(), flips.tolist()):
        p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
        c = p[:, top:top + img.shape[1], left:left + img.shape[2]]
        out.append(c.flip(-1) if f else c)
    return torch.stack(out) if out else x.clone()


@pytest.mark.parametrize("shape", [(0, 3, 32, 32), (1, 3, 32, 32), (5, 3, 7, 9), (4, 1, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_per_image_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.rand(shape, generator=g) * 255).to(dtype)
    offsets = torch.randint(0, 9, (shape[0], 2), generator=g)
    flips = torch.rand(shape[0], generator=g) < 0.5
    out = random_crop_flip(x, offsets, flips, pad=4)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, _crop_flip_reference(x, offsets, flips, 4))


def test_random_crop_flip_center_is_identity_and_flip_mirrors():
    x = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8)
    center = torch.full((3, 2), 4)
    assert torch.equal(random_crop_flip(x, center, torch.zeros(3, dtype=torch.bool)), x)
    assert torch.equal(random_crop_flip(x, center, torch.ones(3, dtype=torch.bool)), x.flip(-1))


def test_cifar_augmentation_in_loader_is_seeded_and_varies():
    ds = data.get("synthetic", shape=(3, 8, 8), train_size=16, test_size=4)
    a = ds.loader("train", 8, seed=0).batch(3)[0]
    b = ds.loader("train", 8, seed=0).batch(3)[0]
    assert torch.equal(a, b)
    plain = ds.loader("train", 8, seed=0, augment=False).batch(3)[0]
    assert not torch.equal(a, plain)  # crops and flips were applied
    test = ds.loader("test", 4)
    assert test.augment is None and not test.shuffle


def test_loader_augmentation_content_is_a_crop_of_the_source():
    x = torch.randint(1, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ld = Loader(x, torch.arange(4), 4, shuffle=False, augment="cifar", seed=9)
    out, _ = ld.batch(0)
    assert not torch.allclose(out, x.float() / 255)
    for img, src in zip(out, x):
        cands = [_crop_flip_reference(src[None], torch.tensor([[t, l]]), torch.tensor([f]), 4)[0]
                 for t in range(9) for l in range(9) for f in (False, True)]
        assert any(torch.equal(img, c.float() / 255) for c in cands)


def test_dataset_device_and_loader_defaults():
    ds = data.get("synthetic", shape=(3, 8, 8), train_size=10, test_size=3, device="cpu")
    moved = ds.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.train.x, ds.train.x)
    train = ds.loader("train", 4)
    assert train.shuffle and train.augment == "cifar" and train.device == torch.device("cpu")
    assert not ds.loader("train", 4, augment=False).augment
    assert ds.loader("test", 4, augment=True).augment == "cifar"
    assert ds.loader("train", 4, drop_last=True).iterations_per_epoch == 2
    with pytest.raises(ValueError, match="split"):
        ds.loader("val")


def test_synthetic():
    ds = data.get("synthetic", shape=(5,), num_classes=3, train_size=10, test_size=4,
                  dtype=torch.float32, seed=1)
    assert ds.train.x.shape == (10, 5) and ds.test.y.max() < 3 and ds.augment is None
    assert torch.equal(ds.train.x, data.get("synthetic", shape=(5,), num_classes=3, train_size=10,
                                            test_size=4, dtype=torch.float32, seed=1).train.x)
    img = data.get("synthetic")
    assert img.train.x.dtype == torch.uint8 and img.train.x.shape == (1024, 3, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        data.get("synthetic", shape=(0, 3))


# ------------------------------------------------------------------------------ MNIST-1D
def test_mnist1d_generated_locally_and_cached(tmp_path):
    mnist1d_data = pytest.importorskip("mnist1d.data")
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    ds = data.get("mnist1d", root=tmp_path)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert (tmp_path / "mnist1d.pt").is_file()
    assert ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40)
    assert ds.train.x.dtype == torch.float32 and ds.num_classes == 10
    ref = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    assert torch.equal(ds.train.x, torch.from_numpy(ref["x"].astype(np.float32)))
    assert torch.equal(ds.test.y, torch.from_numpy(ref["y_test"]))
    again = data.get("mnist1d", root=tmp_path)  # from the cache
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.train.y, ds.train.y)
    x, y = next(iter(ds.loader("train", 32)))
    assert x.shape == (32, 40) and y.dtype == torch.int64


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_loader_matches_cpu():
    ds = data.get("synthetic", train_size=300, test_size=10)
    cpu = list(ds.loader("train", 128, seed=4).steps(0, 5))
    gpu = list(data.get("synthetic", train_size=300, test_size=10, device="cuda")
               .loader("train", 128, seed=4).steps(0, 5))
    for (a, ya), (b, yb) in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)
        assert torch.equal(ya, yb.cpu())
