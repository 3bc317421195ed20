"""Prunable parameters and their binary masks m ∈ {0, 1}^D (the paper's Algorithm 1).

``prunable(model)`` picks the weights of convolution and linear layers, as in Frankle & Carbin and
the paper's Appendix B (biases and BatchNorm parameters are never pruned). ``Masks`` holds one bool
tensor per prunable parameter, keyed by parameter name (True = kept, False = pruned).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

Include = Union[None, Sequence[str], Callable[[str, nn.Module, nn.Parameter], bool]]

_FORMAT = "fastimp.masks"


def prunable(model: nn.Module, include: Include = None) -> Dict[str, nn.Parameter]:
    """The prunable parameters of ``model`` by name, in ``named_parameters()`` order.

    Default: the ``weight`` of every Conv1d/2d/3d and Linear layer. ``include`` overrides it with a
    list of parameter names or a predicate ``include(name, module, param) -> bool``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prunable: argument 'model': expected a torch.nn.Module, got "
                        f"{type(model).__name__}")
    params = dict(model.named_parameters())
    if include is not None and not callable(include):
        if isinstance(include, str):
            raise TypeError("prunable: argument 'include': expected a list of parameter names "
                            "or a callable, got a single string")
        wanted = list(include)
        missing = [n for n in wanted if n not in params]
        if missing:
            raise ValueError(f"prunable: argument 'include': no parameters named {missing} in "
                             f"the model")
        wanted_set = set(wanted)
        return {n: p for n, p in params.items() if n in wanted_set}
    chosen = set()
    for mod_name, module in model.named_modules():
        if include is None and isinstance(module, PRUNABLE_TYPES) and \
                _under_torch_prune(module, "weight"):
            w = f"{mod_name}.weight" if mod_name else "weight"
            raise ValueError(
                f"prunable: {w!r} is under torch.nn.utils.prune ({w}_orig, {w}_mask); fastimp "
                "prunes plain parameters: take its masks and remove the reparametrization with "
                "masks = Masks.from_torch_prune(model, remove=True) (or call "
                "torch.nn.utils.prune.remove on each pruned layer first)")
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if include is None:
                keep = isinstance(module, PRUNABLE_TYPES) and p_name == "weight"
            else:
                keep = bool(include(name, module, p))
            if keep:
                chosen.add(id(p))
    return {n: p for n, p in params.items() if id(p) in chosen}


def _under_torch_prune(module: nn.Module, p_name: str) -> bool:
    """Whether ``module.<p_name>`` is a ``torch.nn.utils.prune`` reparametrization: a parameter
    ``<p_name>_orig`` and a buffer ``<p_name>_mask`` (``<p_name>`` = their product)."""
    return p_name + "_orig" in module._parameters and p_name + "_mask" in module._buffers


def resolve_parameter(model: nn.Module, name: str) -> Optional[nn.Parameter]:
    """The parameter a mask named ``name`` applies to: ``model``'s parameter ``name``, or for a
    weight under ``torch.nn.utils.prune`` its ``<name>_orig`` (None when there is neither)."""
    mod_name, _, p_name = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        return None
    p = module._parameters.get(p_name)
    if p is None and _under_torch_prune(module, p_name):
        p = module._parameters[p_name + "_orig"]
    return p


def check_mask(t, name: str = "mask", shape=None) -> torch.Tensor:
    """The one check of a binary mask: a tensor (bool, or numeric holding only 0 and 1) of
    ``shape`` (when given) -> a bool tensor on its device (no copy when already bool)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    t = t.detach()
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point() or t.is_complex() or t.dtype in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name}: expected binary values (0/1 or bool), found other values")
        return t != 0
    raise TypeError(f"{name}: expected a bool or numeric tensor, got {t.dtype}")


class LayerCount(NamedTuple):
    remaining: int
    total: int

    @property
    def density(self) -> float:
        return self.remaining / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


class Masks(Mapping):
    """Read-only mapping ``parameter name -> bool tensor`` (True = weight kept).

    ``Masks(dict)`` accepts bool tensors or numeric tensors holding only 0 and 1.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, masks: Mapping[str, torch.Tensor] = None, *, _counts=None):
        masks = {} if masks is None else masks
        if not isinstance(masks, Mapping):
            raise TypeError(f"Masks: expected a mapping name -> tensor, got {type(masks).__name__}")
        self._m: Dict[str, torch.Tensor] = {}
        for name, t in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"Masks: keys must be parameter names (str), got {name!r}")
            self._m[name] = check_mask(t, f"Masks: mask {name!r}").clone(
                memory_format=torch.contiguous_format)
        self._counts: Optional[Dict[str, int]] = dict(_counts) if _counts is not None else None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, include: Include = None) -> "Masks":
        """All-ones masks (nothing pruned) for ``prunable(model, include)``."""
        params = prunable(model, include)
        return cls._trusted({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()},
                            {n: p.numel() for n, p in params.items()})

    @classmethod
    def _trusted(cls, masks: Dict[str, torch.Tensor], counts=None) -> "Masks":
        """Wraps bool tensors the caller owns and guarantees valid (no copy, no checks)."""
        self = cls.__new__(cls)
        self._m = dict(masks)
        self._counts = dict(counts) if counts is not None else None
        return self

    # --- Mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return (f"Masks({len(self)} tensors, {self.remaining()}/{self.total()} remaining, "
                f"density={self.density():.4f})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if set(self.keys()) != set(other.keys()):
            return False
        for n, m in self._m.items():
            o = other[n]
            if not isinstance(o, torch.Tensor) or o.shape != m.shape:
                return False
            if not torch.equal(m, o.to(device=m.device, dtype=torch.bool)):
                return False
        return True

    # --- counts ------------------------------------------------------------------------------
    def _layer_counts(self) -> Dict[str, int]:
        if self._counts is None:
            self._counts = {n: int(m.count_nonzero()) for n, m in self._m.items()}
        return self._counts

    def remaining(self) -> int:
        """Number of weights kept (mask = 1), over all tensors."""
        return sum(self._layer_counts().values())

    def total(self) -> int:
        return sum(m.numel() for m in self._m.values())

    def density(self) -> float:
        """Fraction of prunable weights remaining (the paper's α^L after L levels)."""
        t = self.total()
        return self.remaining() / t if t else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def per_layer(self) -> Dict[str, LayerCount]:
        """Per tensor: ``LayerCount(remaining, total)`` with ``.density`` and ``.sparsity``."""
        c = self._layer_counts()
        return {n: LayerCount(c[n], m.numel()) for n, m in self._m.items()}

    # --- use with a model ---------------------------------------------------------------------
    def _params(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        out = {}
        for n, m in self._m.items():
            p = resolve_parameter(model, n)
            if p is None:
                raise ValueError(f"Masks: the model has no parameter named {n!r} (nor a "
                                 f"torch.nn.utils.prune {n}_orig)")
            if p.shape != m.shape:
                raise ValueError(f"Masks: mask {n!r} has shape {tuple(m.shape)} but the parameter "
                                 f"has shape {tuple(p.shape)}")
            out[n] = p
        return out

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place (w ← m ⊙ w); returns ``model``. A weight
        under ``torch.nn.utils.prune`` has its ``<name>_orig`` zeroed."""
        for n, p in self._params(model).items():
            p.mul_(self._m[n].to(p.device))
        return model

    def for_params(self, model: nn.Module) -> Dict[nn.Parameter, torch.Tensor]:
        """``{parameter: mask on its device}``, what :class:`fastimp.MaskedSGD` takes (for a
        weight under ``torch.nn.utils.prune``: its ``<name>_orig``, the trained parameter)."""
        return {p: self._m[n].to(p.device) for n, p in self._params(model).items()}

    def to(self, device) -> "Masks":
        return Masks._trusted({n: m.to(device) for n, m in self._m.items()}, self._counts)

    def cpu(self) -> "Masks":
        return self.to("cpu")

    def flat(self) -> torch.Tensor:
        """All masks concatenated in order (bool [total])."""
        if not self._m:
            return torch.zeros(0, dtype=torch.bool)
        return torch.cat([m.reshape(-1).cpu() for m in self._m.values()])

    # --- save / load --------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (temp file + ``os.replace``): safetensors, or ``torch.save`` for a path
        ending in ``.pt``/``.pth`` (or when safetensors is not installed)."""
        from fastimp._io import atomic_write, write_torch
        path = os.fspath(path)
        tensors = {n: m.detach().cpu().contiguous() for n, m in self._m.items()}
        try:
            from safetensors.torch import save as to_bytes
        except ImportError:  # safetensors is optional: torch.save, which load() also reads
            to_bytes = None

        def write(tmp):
            if path.endswith((".pt", ".pth")) or to_bytes is None:
                write_torch({"format": _FORMAT, "names": list(tensors), "masks": tensors}, tmp)
            else:  # into our temp file (safetensors' save_file renames its own: mode 0600)
                data = to_bytes(tensors, metadata={"format": _FORMAT,
                                                   "names": json.dumps(list(tensors))})
                with open(tmp, "wb") as f:
                    f.write(data)
        atomic_write(path, write)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device="cpu") -> "Masks":
        """Read masks written by :meth:`save` (either format), in their saved order."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Masks.load: no such file {path!r}")
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = json.loads(meta["names"]) if "names" in meta else list(f.keys())
                tensors = {n: f.get_tensor(n) for n in names}
        except Exception as exc:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                raise ValueError(f"Masks.load: {path!r} is neither a safetensors nor a torch.save "
                                 f"masks file ({exc})") from None
            if isinstance(obj, Mapping) and obj.get("format") == _FORMAT:
                tensors = {n: obj["masks"][n] for n in obj["names"]}
            elif isinstance(obj, Mapping):
                tensors = dict(obj)
            else:
                raise ValueError(f"Masks.load: {path!r} does not hold a mapping of masks")
        return cls(tensors).to(device)

    # --- torch.nn.utils.prune interop ---------------------------------------------------------
    def to_torch_prune(self, model: nn.Module) -> nn.Module:
        """Install the masks as ``torch.nn.utils.prune`` reparametrizations (``<name>_orig``
        parameter, ``<name>_mask`` buffer). An already pruned parameter gets its mask replaced.
        A tied weight (one parameter in several modules) is pruned in every module holding it."""
        from torch.nn.utils import prune
        for n, m in self._m.items():
            p = resolve_parameter(model, n)
            if p is None:
                raise ValueError(f"Masks.to_torch_prune: the model has no parameter {n!r}")
            if p.shape != m.shape:
                raise ValueError(f"Masks.to_torch_prune: mask {n!r} has shape "
                                 f"{tuple(m.shape)}, parameter has {tuple(p.shape)}")
            for module, p_name in _aliases(model, p):
                if _under_torch_prune(module, p_name):
                    mask_buf = module._buffers[p_name + "_mask"]
                    with torch.no_grad():
                        mask_buf.copy_(m.to(mask_buf.device, mask_buf.dtype))
                    setattr(module, p_name, module._parameters[p_name + "_orig"] * mask_buf)
                else:
                    prune.custom_from_mask(module, p_name, m.to(p.device, p.dtype))
        return model

    @classmethod
    def from_torch_prune(cls, model: nn.Module, remove: bool = False) -> "Masks":
        """Masks from the ``<name>_mask`` buffers ``torch.nn.utils.prune`` leaves in a model,
        keyed ``<module>.<name>`` (the name the parameter had before pruning). ``remove=True``
        also undoes the reparametrization (``torch.nn.utils.prune.remove``: ``<name>`` becomes a
        plain parameter holding m ⊙ w), so the model works with everything in fastimp."""
        out = {}
        pruned = []
        for mod_name, module in model.named_modules():
            for b_name, buf in list(module.named_buffers(recurse=False)):
                if not b_name.endswith("_mask"):
                    continue
                p_name = b_name[:-len("_mask")]
                if not _under_torch_prune(module, p_name):
                    continue
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = buf
                pruned.append((module, p_name))
        if not out:
            raise ValueError("Masks.from_torch_prune: the model has no torch.nn.utils.prune "
                             "masks (no '<name>_mask' buffers next to '<name>_orig' parameters)")
        masks = cls(out)
        if remove:
            from torch.nn.utils import prune
            for module, p_name in pruned:
                prune.remove(module, p_name)
        return masks


def _aliases(model: nn.Module, p: torch.Tensor):
    """Every (module, name) holding parameter ``p``, directly or as ``<name>_orig``."""
    out = []
    for module in model.modules():
        for key, q in module._parameters.items():
            if q is p:
                name = key[:-len("_orig")] if key.endswith("_orig") and \
                    _under_torch_prune(module, key[:-len("_orig")]) else key
                out.append((module, name))
    return out
