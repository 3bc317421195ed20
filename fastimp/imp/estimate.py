"""What a run will cost before it trains (``fastimp imp --dry-run``): the steps of every level, of
the whole run, and the memory each device needs — from the config alone, without the data set
(its sizes are known for the paper's data sets) and without building the model's weights (it is
built on the ``meta`` device).

Memory per device (training; fp32 master weights in every precision):
weights 4P + gradients 4P + momentum 4P (+ 2P of bf16 weight copies under bf16 autocast) + masks
(1 byte per prunable weight) + activations kept for the backward pass of one micro-batch
(the outputs of the model's leaf modules, in-place ones excepted: 4 bytes each in fp32, 2 in bf16)
+ the micro-batch itself. P = parameters. DistributedDataParallel's gradient buckets are views of
the gradients (``gradient_as_bucket_view``), so they add nothing. Not counted: the CUDA context
and allocator slack (~1-2 GiB), cuDNN workspaces.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# (train examples, test examples, classes, input shape) of the data sets whose size is known
KNOWN_DATASETS: Dict[str, Tuple[int, int, int, Tuple[int, ...]]] = {
    "imagenet": (1_281_167, 50_000, 1000, (3, 224, 224)),
    "cifar10": (50_000, 10_000, 10, (3, 32, 32)),
    "cifar100": (50_000, 10_000, 100, (3, 32, 32)),
    "mnist1d": (4_000, 1_000, 10, (40,)),
}


@dataclass
class DeviceMemory:
    """Bytes per device, by part."""
    weights: int
    gradients: int
    momentum: int
    low_precision_weights: int
    masks: int
    activations: int
    batch: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.momentum + self.low_precision_weights
                + self.masks + self.activations + self.batch)


@dataclass
class Estimate:
    """The plan of an IMP run on ``world_size`` devices (see the module docstring)."""
    world_size: int
    global_batch: int
    per_rank_batch: int          # the largest share of the global batch
    micro_batch: int             # examples per forward/backward on one device
    accumulation_steps: int
    precision: str
    iterations_per_epoch: int
    total_steps: int             # T
    levels: int                  # pruning rounds after level 0
    rewind_steps: List[int]
    replicates: int
    pretrain_steps: int          # per replicate: to the last rewind step
    level_steps: Dict[int, List[int]] = field(default_factory=dict)  # tau -> steps of each level
    parameters: int = 0
    prunable: int = 0
    memory: Optional[DeviceMemory] = None

    @property
    def steps_per_replicate(self) -> int:
        return self.pretrain_steps + sum(sum(v) for v in self.level_steps.values())

    @property
    def total_run_steps(self) -> int:
        """Optimizer steps of the whole run (every replicate, rewind step and level)."""
        return self.replicates * self.steps_per_replicate

    @property
    def examples(self) -> int:
        return self.total_run_steps * self.global_batch


def _dataset_facts(config, dataset=None):
    if dataset is not None:
        return (len(dataset.train), len(dataset.test), dataset.num_classes,
                tuple(dataset.input_shape))
    if config.dataset in KNOWN_DATASETS:
        return KNOWN_DATASETS[config.dataset]
    if config.dataset == "synthetic":
        kw = config.dataset_kwargs
        return (int(kw.get("train_size", 1024)), int(kw.get("test_size", 256)),
                int(kw.get("num_classes", 10)), tuple(kw.get("shape", (3, 32, 32))))
    raise ValueError(f"--dry-run: the size of dataset {config.dataset!r} is not known without "
                     f"loading it; known: {sorted(KNOWN_DATASETS)} and synthetic")


@functools.lru_cache(maxsize=16)
def _model_facts(name: str, num_classes: int, kwargs_json: str,
                 shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(parameters, prunable weights, activation elements per example) of a model built on the
    ``meta`` device (no weights are made)."""
    from fastimp.imp.preflight import build_model
    from fastimp.masks import prunable
    with torch.device("meta"):
        model = build_model(name, json.loads(kwargs_json), num_classes)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return P, sum(p.numel() for p in prunable(model).values()), \
        activation_elements(model, shape)


def activation_elements(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """Elements kept for the backward pass per example: the outputs of the leaf modules of a
    training-mode forward on the ``meta`` device (in-place ones share their input's storage)."""
    total = [0]

    def hook(mod, _inputs, out):
        if isinstance(out, torch.Tensor) and not getattr(mod, "inplace", False):
            total[0] += out.numel()
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            model(torch.empty(1, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total[0]


def estimate(config, world_size: int = 1, dataset=None) -> Estimate:
    """The :class:`Estimate` of ``config`` on ``world_size`` data-parallel devices (``dataset``:
    a loaded one, else the sizes in ``KNOWN_DATASETS``). Nothing is trained or read from disk."""
    from fastimp.durations import iterations_per_epoch
    from fastimp.imp.strategies import level_plan
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    n_train, _, num_classes, shape = _dataset_facts(config, dataset)
    cfg = config.train
    B = cfg.batch_size
    ipe = iterations_per_epoch(n_train, B, cfg.drop_last)
    T = cfg.total_steps(ipe)
    share = math.ceil(B / world_size)
    per_device = getattr(config, "per_device_batch", None)
    micro = share if per_device is None else min(int(per_device), share)
    accumulation = math.ceil(share / micro)
    precision = getattr(config, "precision", "fp32")
    level_steps = {tau: [level_plan(config.strategy, L, tau, T).steps
                         for L in range(config.levels + 1)] for tau in config.rewind_steps}
    P, n_prunable, act = _model_facts(config.model, num_classes,
                                      json.dumps(config.model_kwargs, sort_keys=True),
                                      tuple(shape))
    acts = act * micro * (2 if precision == "bf16" else 4)
    memory = DeviceMemory(weights=4 * P, gradients=4 * P, momentum=4 * P,
                          low_precision_weights=2 * P if precision == "bf16" else 0,
                          masks=n_prunable, activations=acts,
                          batch=micro * math.prod(shape) * 4)
    return Estimate(world_size=world_size, global_batch=B, per_rank_batch=share,
                    micro_batch=micro, accumulation_steps=accumulation, precision=precision,
                    iterations_per_epoch=ipe, total_steps=T, levels=config.levels,
                    rewind_steps=list(config.rewind_steps), replicates=len(config.replicate_seeds),
                    pretrain_steps=max(config.rewind_steps), level_steps=level_steps,
                    parameters=P, prunable=n_prunable, memory=memory)


def format_table(config, world_sizes: Sequence[int] = (1, 2, 4, 8), dataset=None) -> str:
    """Per-device batch, accumulation and memory for several device counts."""
    head = f"{'devices':>7} {'per device':>10} {'micro-batch':>11} {'accumulation':>12} " \
           f"{'memory/device':>13}"
    rows = [head]
    for w in world_sizes:
        e = estimate(config, w, dataset)
        rows.append(f"{w:>7} {e.per_rank_batch:>10} {e.micro_batch:>11} "
                    f"{e.accumulation_steps:>12} {_gib(e.memory.total):>13}")
    return "\n".join(rows)


def _gib(n: int) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def format_estimate(e: Estimate, config=None) -> str:
    """The plan as ``fastimp imp --dry-run`` prints it."""
    m = e.memory
    lines = []
    if config is not None:
        lines.append(f"run: {config.model} on {config.dataset}, IMP-{config.strategy.upper()}, "
                     f"{e.levels} pruning levels after level 0, rewind steps {e.rewind_steps}, "
                     f"{e.replicates} replicate(s); folder OUT/{config.folder_name()}")
    lines += [
        f"model: {e.parameters:,} parameters, {e.prunable:,} prunable",
        f"devices: {e.world_size} (data parallel); global batch {e.global_batch} = "
        f"{e.world_size} x {e.per_rank_batch}" + ("" if e.global_batch % e.world_size == 0 else
                                                   " (the last ranks take one example less)")
        + f"; per device {e.accumulation_steps} micro-batch(es) of {e.micro_batch}"
        + (" (gradient accumulation)" if e.accumulation_steps > 1 else "")
        + f"; precision {e.precision}",
        f"steps: T = {e.total_steps:,} ({e.iterations_per_epoch:,} per epoch); pre-training "
        f"{e.pretrain_steps:,} per replicate",
    ]
    for tau, steps in e.level_steps.items():
        same = len(set(steps)) == 1
        desc = f"{steps[0]:,} each" if same else ", ".join(f"{s:,}" for s in steps)
        lines.append(f"  rewind step {tau:,}: {len(steps)} levels x steps per level: {desc} "
                     f"(= {sum(steps):,})")
    lines.append(f"whole run: {e.total_run_steps:,} optimizer steps ({e.replicates} replicate(s) "
                 f"x {e.steps_per_replicate:,}), {e.examples:,} examples")
    lines.append(
        f"memory per device (estimate): {_gib(m.total)} = weights {_gib(m.weights)} + "
        f"gradients {_gib(m.gradients)} + momentum {_gib(m.momentum)}"
        + (f" + bf16 copies {_gib(m.low_precision_weights)}" if m.low_precision_weights else "")
        + f" + masks {_gib(m.masks)} + activations of {e.micro_batch} examples "
        f"{_gib(m.activations)} + batch {_gib(m.batch)} (plus the CUDA context, ~1-2 GiB)")
    return "\n".join(lines)
