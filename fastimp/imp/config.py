"""``IMPConfig``: the hyperparameters of one IMP run (OpenLTH style: a dataclass, hashed to name the
run folder), with ``key=value`` overrides for the command line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

STRATEGIES = ("wr", "lrr", "ft")
PRUNINGS = ("magnitude", "random")

# Fields that say *how much* of the experiment to run or *where*, not *what* it computes: they do
# not enter the folder's hash, so a rerun with more levels, rewind steps or seeds reuses the folder.
# How each training runs does not either (docs/DISTRIBUTED.md); every level's stats.json records
# it (with the world size), so a folder may hold levels trained in different ways.
_NOT_HASHED = ("levels", "rewind_steps", "replicates", "seeds", "device", "data_root", "threads",
               "batch_runs", "precision", "per_device_batch", "channels_last", "num_workers")
PRECISIONS = ("fp32", "bf16")
# Finetuning's lr and weight decay decide only what IMP-FT levels compute: they enter the hash only
# for strategy "ft" and only when set, so WR / LRR folders and FT folders run before these fields
# existed (None = the schedule's final lr and the run's weight decay) keep their names.
_FINETUNE = ("finetune_lr", "finetune_weight_decay")


def _train_config_cls():
    from fastimp.training import TrainConfig
    return TrainConfig


def _default_train():
    return _train_config_cls()()


@dataclass
class IMPConfig:
    """Algorithm 1 of the paper (Section 2) with its retraining strategies.

    ``levels`` pruning rounds follow level 0 (dense), so levels 0..``levels`` are trained and the
    last has ``alpha**levels`` of the prunable weights (alpha = 1 - ``pruning_fraction``).
    ``strategy``: ``"wr"`` w^(L) = A_tau(m^(L) . w_tau, T - tau); ``"lrr"``
    w^(L) = A_0(m^(L) . w^(L-1), T); ``"ft"`` w^(L) = A_T(m^(L) . w^(L-1), T) (level 0 is
    A_tau(w_tau, T - tau) for all three).
    ``pruning_fraction``: 1 - alpha per level, or ``"adaptive"`` (Appendix F, via
    ``fastimp.theory.adaptive_pruning_ratio``). ``pruning``: ``"magnitude"`` or the ``"random"``
    control.
    ``seeds[r]`` seeds replicate r (initialization and data order); default ``range(replicates)``.
    ``threads``: torch intra-op threads during the run (None: torch's default; 1 is much faster for
    tiny CPU models on a busy machine). ``batch_runs``: how many trainings of a level (replicates x
    rewind steps) run as one batched program (``fastimp.training.train_batched``): ``"auto"`` (as
    many as fit; on the CPU only where batching is faster), an int (at most that many, packed), or
    1 (one after another, as before batching existed). ``levels``, ``rewind_steps``,
    ``replicates``, ``seeds``, ``device``, ``data_root``, ``threads`` and ``batch_runs`` do not
    enter the folder's hash.
    ``finetune_lr`` / ``finetune_weight_decay``: IMP-FT's retraining (Appendix B: a constant lr of
    the peak lr / 100, weight decay off); None keeps the schedule's lr at steps [T, 2T) (its final
    lr) resp. ``train.weight_decay``. They enter the hash only for ``strategy="ft"`` when set.
    How each training runs (docs/DISTRIBUTED.md; not hashed, recorded in every level's
    stats.json): ``precision`` ``"fp32"`` (default) or ``"bf16"`` (autocast; fp32 weights,
    optimizer and loss); ``per_device_batch``: at most that many examples per forward/backward on
    a device, the rest of its share of the batch by gradient accumulation (None: the whole
    share); ``channels_last``: 2-D conv nets in channels-last memory format; ``num_workers``:
    DataLoader workers of an image-folder data set (ImageNet; None: up to 8 per process).
    """
    model: str = "mnist1d_mlp"
    dataset: str = "mnist1d"
    train: Any = field(default_factory=_default_train)
    levels: int = 8
    pruning_fraction: Union[float, str] = 0.2
    pruning: str = "magnitude"
    strategy: str = "wr"
    rewind_steps: List[int] = field(default_factory=lambda: [0])
    replicates: int = 1
    seeds: Optional[List[int]] = None
    device: str = "cpu"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: Dict[str, Any] = field(default_factory=dict)
    data_root: Optional[str] = None
    threads: Optional[int] = None
    finetune_lr: Optional[float] = None
    finetune_weight_decay: Optional[float] = None
    batch_runs: Union[str, int] = "auto"
    precision: str = "fp32"
    per_device_batch: Optional[int] = None
    channels_last: bool = False
    num_workers: Optional[int] = None

    def __post_init__(self):
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> "IMPConfig":
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"IMPConfig.model: expected a model name, got {self.model!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"IMPConfig.dataset: expected a dataset name, got {self.dataset!r}")
        if isinstance(self.train, dict):
            self.train = from_dict(_train_config_cls(), self.train)
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 0:
            raise ValueError(f"IMPConfig.levels: expected an int >= 0, got {self.levels!r}")
        pf = self.pruning_fraction
        if isinstance(pf, str):
            if pf != "adaptive":
                try:
                    pf = float(pf)
                except ValueError:
                    raise ValueError("IMPConfig.pruning_fraction: expected a float in (0, 1) or "
                                     f"'adaptive', got {self.pruning_fraction!r}") from None
        if not isinstance(pf, str):
            if isinstance(pf, bool) or not isinstance(pf, (int, float)) \
                    or not 0.0 < float(pf) < 1.0:
                raise ValueError("IMPConfig.pruning_fraction: expected a float in (0, 1) or "
                                 f"'adaptive', got {self.pruning_fraction!r}")
            pf = float(pf)
        self.pruning_fraction = pf
        if self.pruning not in PRUNINGS:
            raise ValueError(f"IMPConfig.pruning: expected one of {PRUNINGS}, got {self.pruning!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"IMPConfig.strategy: expected one of {STRATEGIES}, "
                             f"got {self.strategy!r}")
        if isinstance(self.rewind_steps, (int, str)) and not isinstance(self.rewind_steps, bool):
            self.rewind_steps = [self.rewind_steps]
        steps = [_rewind_step(s) for s in self.rewind_steps]
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError("IMPConfig.rewind_steps: expected a non-empty list of step counts "
                             f">= 0, got {self.rewind_steps!r}")
        self.rewind_steps = sorted(set(steps))
        if self.seeds is not None:
            seeds = list(self.seeds)
            if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) \
                    or len(set(seeds)) != len(seeds):
                raise ValueError(f"IMPConfig.seeds: expected distinct ints, got {self.seeds!r}")
            self.seeds = seeds
            self.replicates = len(seeds)
        if not isinstance(self.replicates, int) or isinstance(self.replicates, bool) \
                or self.replicates < 1:
            raise ValueError(f"IMPConfig.replicates: expected an int >= 1, got {self.replicates!r}")
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"IMPConfig.threads: expected None or an int >= 1, "
                             f"got {self.threads!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"IMPConfig.precision: expected one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        for name in ("per_device_batch", "num_workers"):
            v = getattr(self, name)
            least = 1 if name == "per_device_batch" else 0
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ValueError(f"IMPConfig.{name}: expected None or an int >= {least}, "
                                 f"got {v!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"IMPConfig.channels_last: expected true or false, "
                             f"got {self.channels_last!r}")
        br = self.batch_runs
        if br != "auto" and (isinstance(br, bool) or not isinstance(br, int) or br < 1):
            raise ValueError(f"IMPConfig.batch_runs: expected 'auto' or an int >= 1, got {br!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"IMPConfig.device: expected a device string, got {self.device!r}")
        for name in ("model_kwargs", "dataset_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"IMPConfig.{name}: expected a JSON object of keyword arguments "
                                 f"such as {{\"hidden\": [16]}}, got {value!r}")
        for name in _FINETUNE:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                    or v == float("inf"):
                raise ValueError(f"IMPConfig.{name}: expected None or a finite number >= 0, "
                                 f"got {v!r}")
            setattr(self, name, float(v))
        return self

    @property
    def replicate_seeds(self) -> List[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.replicates))

    # -- naming ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "IMPConfig":
        return from_dict(cls, d)

    def hashed_dict(self) -> Dict[str, Any]:
        d = self.to_dict()
        for k in _NOT_HASHED:
            d.pop(k, None)
        for k in _FINETUNE:
            if self.strategy != "ft" or d.get(k) is None:
                d.pop(k, None)
        return d

    def hash(self) -> str:
        """Hash of the hyperparameters that decide what each level computes."""
        blob = json.dumps(self.hashed_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        return f"imp_{self.hash()}"

    def replace(self, **changes) -> "IMPConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Sequence[str]) -> "IMPConfig":
        return apply_overrides(self, overrides)


def _rewind_step(s):
    if isinstance(s, str):
        from fastimp import durations
        try:
            d = durations.parse(s)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"IMPConfig.rewind_steps: {exc}") from None
        if d.unit != "it":
            raise ValueError(f"IMPConfig.rewind_steps: give rewind steps in iterations (e.g. "
                             f"'2000it'), got {s!r}")
        return int(d.value)
    return s


# -- dataclass <-> dict ------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _dataclass_type(tp) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in getattr(tp, "__args__", ()) or ():
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls, d: Dict[str, Any]):
    """Rebuild dataclass ``cls`` from :func:`to_dict` output (nested dataclasses included); keys
    the class does not know raise a ValueError naming them."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_type(hints.get(k))
        if cls is IMPConfig and k == "train":
            sub = _train_config_cls()
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v)
        kwargs[k] = v
    return cls(**kwargs)


# -- key=value overrides --------------------------------------------------------------------
def _parse_value(text: str, current: Any) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if value is None:
        return None
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (list, tuple)) and not isinstance(value, list):
        if isinstance(value, str) and "," in value:
            return [_parse_value(v.strip(), current[0] if current else None)
                    for v in value.split(",")]
        return [value]
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def apply_overrides(config, overrides: Sequence[str]):
    """Return a copy of ``config`` with ``key=value`` overrides applied; dotted keys reach into
    nested dataclasses (``train.lr=0.05``); values parse as JSON, else as strings."""
    import copy
    config = copy.deepcopy(config)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.lr=0.05")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        target = config
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ValueError(f"override {item!r}: unknown key {key!r}")
            target = getattr(target, part)
        name = parts[-1]
        if isinstance(target, dict):
            target[name] = _parse_value(text, target.get(name))
            continue
        is_dc = dataclasses.is_dataclass(target)
        if not is_dc or name not in {f.name for f in dataclasses.fields(target)}:
            known = sorted(f.name for f in dataclasses.fields(target)) if is_dc else []
            raise ValueError(f"override {item!r}: unknown key {key!r}"
                             + (f"; known here: {known}" if known else ""))
        setattr(target, name, _parse_value(text, getattr(target, name)))
    # re-run validation of every dataclass touched (dataclasses with __post_init__ validate there)
    config = from_dict(type(config), to_dict(config))
    return config
