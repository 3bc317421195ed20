"""Datasets: ``get(name, root=None, device="cpu", download=False, **kw) -> Dataset``.

``mnist1d`` is generated locally (``mnist1d.data.make_dataset``, its default arguments, seed 42);
``cifar10`` / ``cifar100`` read torchvision's on-disk format; ``imagenet`` is an ImageFolder;
``synthetic`` is random data of any shape. Users add their own with ``@register("name")``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .loader import FolderLoader, Loader

__all__ = ["Dataset", "Split", "get", "names", "register", "default_root", "CIFAR10_MEAN",
           "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_root() -> Path:
    """``$FASTIMP_DATA`` or ``~/.cache/fastimp``."""
    return Path(os.environ.get("FASTIMP_DATA", Path.home() / ".cache" / "fastimp")).expanduser()


@dataclass
class Split:
    """One split: tensors ``x`` [N, ...] and ``y`` [N] int64, or an ImageFolder ``folder``."""

    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    folder: Any = None

    def __post_init__(self):
        if self.folder is None:
            if self.x is None or self.y is None:
                raise ValueError("Split needs tensors x and y, or an ImageFolder folder")
            if self.x.shape[0] != self.y.shape[0]:
                raise ValueError(f"Split: x has {self.x.shape[0]} examples, y {self.y.shape[0]}")

    def __len__(self) -> int:
        return len(self.folder) if self.folder is not None else int(self.x.shape[0])

    @property
    def is_folder(self) -> bool:
        return self.folder is not None

    def to(self, device) -> "Split":
        if self.folder is not None:
            return self
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    """A train and a test split plus how to feed them (normalization, augmentation)."""

    name: str
    num_classes: int
    input_shape: Tuple[int, ...]
    train: Split
    test: Split
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    augment: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    classes: Optional[List[str]] = None

    def split(self, split: str) -> Split:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test

    def loader(self, split: str = "train", batch_size: int = 128, *, shuffle: Optional[bool] = None,
               drop_last: bool = False, seed: int = 0,
               augment: Union[None, bool, str, Callable] = None, device=None,
               num_workers: int = 0) -> Union[Loader, FolderLoader]:
        """Train: shuffled and augmented by default; test: in order, no augmentation.
        ``augment=False`` turns augmentation off, a string / callable picks it."""
        s = self.split(split)
        is_train = split == "train"
        shuffle = is_train if shuffle is None else shuffle
        device = self.device if device is None else device
        if s.is_folder:
            return FolderLoader(s.folder, batch_size, shuffle=shuffle, drop_last=drop_last,
                                seed=seed, device=device, num_workers=num_workers)
        if augment is None or augment is True:
            augment = self.augment if (is_train or augment is True) else None
        elif augment is False:
            augment = None
        return Loader(s.x, s.y, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                      augment=augment, mean=self.mean, std=self.std, device=device)

    def to(self, device) -> "Dataset":
        d = torch.device(device)
        return Dataset(self.name, self.num_classes, self.input_shape, self.train.to(d),
                       self.test.to(d), self.mean, self.std, self.augment, d, self.classes)


_BUILDERS: Dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    """Decorator for ``fn(root, download, **kw) -> Dataset`` (built on the CPU)."""
    def deco(fn):
        _BUILDERS[name] = fn
        return fn
    return deco


def names() -> List[str]:
    return sorted(_BUILDERS)


def get(name: str, root=None, device="cpu", download: bool = False, **kw) -> Dataset:
    """Dataset ``name`` with its tensors on ``device`` (all of CIFAR fits in GPU memory)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _BUILDERS and key.replace("-", "").replace("_", "") in _BUILDERS:
        key = key.replace("-", "").replace("_", "")  # "CIFAR-10", "MNIST-1D"
    if key not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    root = Path(root).expanduser() if root is not None else None
    ds = _BUILDERS[key](root=root, download=download, **kw)
    return ds.to(device) if torch.device(device) != ds.device else ds


# ----------------------------------------------------------------------------------- MNIST-1D
def _atomic_torch_save(obj, path: Path) -> None:
    from fastimp._io import save_torch
    save_torch(obj, path)


def _make_mnist1d(seed: int) -> Dict[str, torch.Tensor]:
    import random
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'fastimp[data]'") from e
    args = get_dataset_args()
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": torch.from_numpy(np.asarray(d["x"], np.float32)),
            "y": torch.from_numpy(np.asarray(d["y"], np.int64)),
            "x_test": torch.from_numpy(np.asarray(d["x_test"], np.float32)),
            "y_test": torch.from_numpy(np.asarray(d["y_test"], np.int64))}


@register("mnist1d")
def _mnist1d(root: Optional[Path], download: bool = False, seed: int = 42) -> Dataset:
    """Greydanus' MNIST-1D: 4000 train / 1000 test signals of length 40, 10 classes, generated
    with ``make_dataset(get_dataset_args())`` (seed 42) and cached as ``mnist1d[-seed].pt``."""
    path = (root or default_root()) / ("mnist1d.pt" if seed == 42 else f"mnist1d-seed{seed}.pt")
    d = None
    if path.exists():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is regenerated
            d = None
    if d is None:
        d = _make_mnist1d(seed)
        try:
            _atomic_torch_save(d, path)
        except OSError:
            pass  # read-only cache: use the generated data without caching it
    return Dataset("mnist1d", 10, (40,), Split(d["x"], d["y"]), Split(d["x_test"], d["y_test"]))


# ------------------------------------------------------------------------------ CIFAR-10/100
_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", meta_key="label_names",
                    label_key="labels", classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    title="CIFAR-10", tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     meta_key="fine_label_names", label_key="fine_labels", classes=100,
                     mean=CIFAR100_MEAN, std=CIFAR100_STD, title="CIFAR-100", tv="CIFAR100"),
}


def _read_cifar_batches(folder: Path, files: List[str], label_key: str):
    xs, ys = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar(key: str, root: Optional[Path], download: bool) -> Dataset:
    spec = _CIFAR[key]
    root = root or default_root()
    folder = root / spec["folder"]
    needed = spec["train"] + spec["test"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        import torchvision
        getattr(torchvision.datasets, spec["tv"])(str(root), train=True, download=True)
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec['title']} not found under root={str(root)!r}: expected {folder}/ with "
            f"{', '.join(needed)} (torchvision's python format). Get it with "
            f"fastimp.data.get({key!r}, root={str(root)!r}, download=True) (or "
            f"torchvision.datasets.{spec['tv']}(root, download=True)) on a machine that is online, "
            f"then copy {spec['folder']}/ into the root; missing: {', '.join(missing)}")
    x, y = _read_cifar_batches(folder, spec["train"], spec["label_key"])
    xt, yt = _read_cifar_batches(folder, spec["test"], spec["label_key"])
    classes = None
    if (folder / spec["meta"]).is_file():
        with open(folder / spec["meta"], "rb") as fh:
            classes = list(pickle.load(fh, encoding="latin1").get(spec["meta_key"], [])) or None
    return Dataset(key, spec["classes"], (3, 32, 32), Split(x, y), Split(xt, yt),
                   spec["mean"], spec["std"], "cifar", classes=classes)


@register("cifar10")
def _cifar10(root: Optional[Path], download: bool = False) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's ``CIFAR10(root)`` layout)."""
    return _cifar("cifar10", root, download)


@register("cifar100")
def _cifar100(root: Optional[Path], download: bool = False) -> Dataset:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``."""
    return _cifar("cifar100", root, download)


# ---------------------------------------------------------------------------------- ImageNet
@register("imagenet")
def _imagenet(root: Optional[Path], download: bool = False, image_size: int = 224,
              resize_size: int = 256) -> Dataset:
    """ImageFolder ``root/train`` and ``root/val`` with the standard transforms: train
    RandomResizedCrop(224) + flip, val Resize(256) + CenterCrop(224); both normalized."""
    from torchvision import datasets, transforms
    if root is None:
        raise ValueError("imagenet needs root= a folder with train/ and val/ ImageFolders")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"ImageNet not found under root={str(root)!r}: expected {root / sub}/ as an "
                f"ImageFolder (one folder per class); ImageNet cannot be downloaded automatically")
    if download:
        raise ValueError("imagenet cannot be downloaded: pass root= a local ImageFolder copy")
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(resize_size), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), norm])
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise ValueError(f"ImageNet train/ and val/ have different classes under {root}")
    return Dataset("imagenet", len(train.classes), (3, image_size, image_size),
                   Split(folder=train), Split(folder=val), IMAGENET_MEAN, IMAGENET_STD,
                   "imagenet", classes=list(train.classes))


# --------------------------------------------------------------------------------- synthetic
@register("synthetic")
def _synthetic(root: Optional[Path] = None, download: bool = False, shape=(3, 32, 32),
               num_classes: int = 10, train_size: int = 1024, test_size: int = 256, seed: int = 0,
               dtype: torch.dtype = torch.uint8, augment=None) -> Dataset:
    """Random inputs (uniform uint8 images, or standard normal floats) and labels; uint8 images
    [C, H, W] get the CIFAR augmentation and CIFAR-10's normalization (for benchmarks)."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"synthetic: shape must be positive sizes, got {shape}")
    if num_classes < 1 or train_size < 0 or test_size < 0:
        raise ValueError("synthetic: num_classes >= 1 and sizes >= 0 required")
    g = torch.Generator().manual_seed(seed)

    def make(n):
        if dtype == torch.uint8:
            x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        else:
            x = torch.randn((n, *shape), generator=g, dtype=dtype)
        return x, torch.randint(0, num_classes, (n,), generator=g)

    images = dtype == torch.uint8 and len(shape) == 3
    if augment is None and images:
        augment = "cifar"
    elif augment is False:
        augment = None
    mean = CIFAR10_MEAN if images and shape[0] == 3 else None
    std = CIFAR10_STD if images and shape[0] == 3 else None
    return Dataset("synthetic", num_classes, shape, Split(*make(train_size)),
                   Split(*make(test_size)), mean, std, augment)
