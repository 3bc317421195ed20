"""Training durations as the field writes them: ``"62400it"``, ``"160ep"``, ``"2000ba"``.

Iterations (``it``, Composer's ``ba``) are optimizer steps; an epoch is ``iterations_per_epoch``
steps, which depends on ``drop_last``: CIFAR-10's 50,000 examples at batch size 128 give
``ceil(50000 / 128) = 391`` iterations per epoch without ``drop_last`` (OpenLTH) and
``floor(50000 / 128) = 390`` with it. The paper's 62,400 steps with drops at 31,200 / 46,800 are
160 / 80 / 120 epochs of 390. fastimp's presets give every duration in iterations, so that choice
only changes which examples an epoch visits, never the step count.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["Duration", "parse", "to_steps", "iterations_per_epoch", "format_duration"]

_UNITS = {"it": "it", "ba": "it", "ep": "ep", "": "it"}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(it|ba|ep)?\s*$")


@dataclass(frozen=True)
class Duration:
    """``value`` iterations (``unit="it"``) or epochs (``unit="ep"``)."""

    value: float
    unit: str = "it"

    def __post_init__(self):
        if self.unit not in ("it", "ep"):
            raise ValueError(f"Duration unit must be 'it' or 'ep', got {self.unit!r}")
        if not (self.value >= 0) or math.isinf(self.value):
            raise ValueError(f"Duration value must be a finite number >= 0, got {self.value!r}")
        if self.unit == "it" and self.value != int(self.value):
            raise ValueError(f"a duration in iterations must be whole, got {self.value!r}")

    def __str__(self) -> str:
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{v}{self.unit}"


DurationLike = Union[int, str, Duration]


def parse(d: DurationLike) -> Duration:
    """``"62400it"`` / ``"2000ba"`` / ``2000`` / ``"2000"`` -> iterations; ``"160ep"`` -> epochs."""
    if isinstance(d, Duration):
        return d
    if isinstance(d, bool):
        raise TypeError(f"duration must be an int or a string like '62400it' or '160ep', got {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise ValueError(f"duration must be >= 0, got {d}")
        return Duration(d, "it")
    if isinstance(d, float):
        if d != int(d):
            raise ValueError(f"a bare number is a count of iterations and must be whole, got {d}")
        return parse(int(d))
    if not isinstance(d, str):
        raise TypeError(f"duration must be an int or a string like '62400it' or '160ep', "
                        f"got {type(d).__name__}")
    m = _PATTERN.match(d.lower())
    if m is None:
        raise ValueError(f"cannot parse duration {d!r}: expected e.g. '62400it', '2000ba', "
                         f"'160ep' or a number of iterations")
    unit = _UNITS[m.group(2) or ""]
    value = float(m.group(1))
    if unit == "it":
        if value != int(value):
            raise ValueError(f"a duration in iterations must be whole, got {d!r}")
        value = int(value)
    elif value == int(value):
        value = int(value)
    return Duration(value, unit)


def iterations_per_epoch(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """``floor(N / B)`` with ``drop_last`` else ``ceil(N / B)``."""
    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def to_steps(d: DurationLike, iterations_per_epoch: Optional[int] = None) -> int:
    """The number of optimizer steps in ``d``; epochs need ``iterations_per_epoch``."""
    dur = parse(d)
    if dur.unit == "it":
        return int(dur.value)
    if iterations_per_epoch is None:
        raise ValueError(f"duration {str(dur)!r} is in epochs: iterations_per_epoch is required")
    if not isinstance(iterations_per_epoch, int) or iterations_per_epoch < 1:
        raise ValueError(f"iterations_per_epoch must be an int >= 1, got {iterations_per_epoch!r}")
    steps = dur.value * iterations_per_epoch
    if abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
        raise ValueError(f"duration {str(dur)!r} is not a whole number of steps at "
                         f"{iterations_per_epoch} iterations per epoch")
    return int(round(steps))


def format_duration(d: DurationLike) -> str:
    """Canonical string (``"62400it"``, ``"160ep"``), for run names."""
    return str(parse(d))
