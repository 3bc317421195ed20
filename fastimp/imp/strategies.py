"""The retraining strategies of Section 2: what level L starts from and which part of the learning
rate schedule it runs.

With A_t(w, t') = train w for t' steps from the algorithm state (lr schedule, data order) at step t:

- IMP-WR  (weight rewinding):   w^(L) = A_tau(m^(L) . w_tau,     T - tau)
- IMP-LRR (lr rewinding):       w^(L) = A_0  (m^(L) . w^(L-1),   T)
- IMP-FT  (finetuning):         w^(L) = A_T  (m^(L) . w^(L-1),   T)   (the final, small lr)

Level 0 is dense training from the rewind point for every strategy: A_tau(w_tau, T - tau).
IMP-FT's steps [T, 2T) run at Appendix B's finetuning lr and weight decay when the config gives
them (``finetune_train_config``).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastimp.imp.config import STRATEGIES

REWIND = "rewind_point"        # start from m^(L) . w_tau
PREVIOUS = "previous_solution"  # start from m^(L) . w^(L-1)


def finetune_train_config(train, finetune_lr=None, finetune_weight_decay=None):
    """The train config of IMP-FT's steps [T, 2T) (Appendix B: "a learning rate ... 100 times
    smaller than the peak learning rate", constant, "turning off the weight decay").

    ``finetune_lr`` set: a constant lr (no warm-up, no decay); None: the schedule's lr at those
    steps, i.e. its final lr. ``finetune_weight_decay`` set: that decay; None: ``train``'s."""
    changes = {}
    if finetune_lr is not None:
        changes.update(lr=float(finetune_lr), schedule="constant", warmup_steps=0, milestones=())
    if finetune_weight_decay is not None:
        changes["weight_decay"] = float(finetune_weight_decay)
    return train.replace(**changes) if changes else train


@dataclass(frozen=True)
class LevelPlan:
    """Level L trains ``m^(L) . start`` over global steps ``[start_step, end_step)``."""
    start: str
    start_step: int
    end_step: int

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


def level_plan(strategy: str, level: int, rewind_step: int, total_steps: int) -> LevelPlan:
    """Where level ``level`` starts and which steps of the schedule it runs (see module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"level: expected an int >= 0, got {level!r}")
    if not 0 <= rewind_step <= total_steps:
        raise ValueError(f"rewind_step: expected 0 <= rewind_step <= T = {total_steps}, "
                         f"got {rewind_step}")
    T = total_steps
    if level == 0 or strategy == "wr":
        return LevelPlan(REWIND, rewind_step, T)
    if strategy == "lrr":
        return LevelPlan(PREVIOUS, 0, T)
    return LevelPlan(PREVIOUS, T, 2 * T)
