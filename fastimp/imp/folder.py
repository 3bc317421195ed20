"""IMP run folders: the layout on disk and :class:`Run`, the read side (``load_run``).

::

    OUT/imp_<hash>/                 named by the hyperparameters that decide the results
      config.json                   the IMPConfig (rewind steps, seeds, levels: union of all runs)
      results.json                  one entry per (rewind step, replicate, level) finished
      summary.json                  per rewind step and level: mean/std over replicates, matching
      matching.json                 {"eps": the eps given to the run, or null}
      seed_<s>/init.pt              w_0 of the replicate with seed s
      seed_<s>/rewind_<tau>/rewind_state.pt        w_tau
      seed_<s>/rewind_<tau>/level_<L>/mask.pt      m^(L) (fastimp.Masks)
                                      solution.pt  w^(L) (state dict, CPU)
                                      losses.pt    train loss per step
                                      stats.json   written last: the level is finished
      analysis/                     where the landscape / Hessian commands write
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from fastimp._io import load_json, load_torch
from fastimp.imp.config import IMPConfig


def level_dir(folder: Path, seed: int, rewind_step: int, level: int) -> Path:
    return Path(folder) / f"seed_{seed}" / f"rewind_{rewind_step}" / f"level_{level}"


def rewind_dir(folder: Path, seed: int, rewind_step: int) -> Path:
    return Path(folder) / f"seed_{seed}" / f"rewind_{rewind_step}"


def load_masks(path):
    from fastimp.masks import Masks
    return Masks.load(path)


class Run:
    """A finished (or partly finished) IMP run folder; see ``docs/ARCHITECTURE.md``."""

    def __init__(self, folder):
        self.dir = Path(folder)
        if not (self.dir / "config.json").exists():
            raise FileNotFoundError(f"{self.dir} is not an IMP run folder (no config.json); "
                                    "run `fastimp imp` first or pass the imp_<hash> folder")
        self.config: IMPConfig = IMPConfig.from_dict(load_json(self.dir / "config.json"))
        self._dataset = None

    def __repr__(self):
        return f"Run({str(self.dir)!r}, strategy={self.config.strategy!r})"

    # -- what is there -------------------------------------------------------------------
    @property
    def rewind_steps(self) -> List[int]:
        return list(self.config.rewind_steps)

    @property
    def seeds(self) -> List[int]:
        return self.config.replicate_seeds

    @property
    def replicates(self) -> List[int]:
        return list(range(len(self.seeds)))

    @property
    def analysis_dir(self) -> Path:
        d = self.dir / "analysis"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _key(self, rewind_step, replicate) -> Tuple[int, int]:
        tau = self.rewind_steps[0] if rewind_step is None else int(rewind_step)
        if tau not in self.rewind_steps:
            raise ValueError(f"rewind_step: {rewind_step!r} is not one of this run's rewind steps "
                             f"{self.rewind_steps}")
        if not isinstance(replicate, int) or not 0 <= replicate < len(self.seeds):
            raise ValueError(f"replicate: expected an index in [0, {len(self.seeds)}), got "
                             f"{replicate!r}")
        return tau, self.seeds[replicate]

    def levels(self, rewind_step=None, replicate: int = 0) -> List[int]:
        """The finished levels (those with stats.json), in order."""
        tau, seed = self._key(rewind_step, replicate)
        out = []
        L = 0
        while (level_dir(self.dir, seed, tau, L) / "stats.json").exists():
            out.append(L)
            L += 1
        return out

    def _level_path(self, level, rewind_step, replicate, name) -> Path:
        tau, seed = self._key(rewind_step, replicate)
        path = level_dir(self.dir, seed, tau, int(level)) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (level {level} of rewind step {tau}, "
                                    f"replicate {replicate} not finished?)")
        return path

    # -- per level -------------------------------------------------------------------------
    def solution(self, level: int, rewind_step=None, replicate: int = 0) -> Dict[str, torch.Tensor]:
        """State dict of the level-L solution w^(L) (CPU)."""
        self._require_finished(level, rewind_step, replicate)
        return load_torch(self._level_path(level, rewind_step, replicate, "solution.pt"))

    def mask(self, level: int, rewind_step=None, replicate: int = 0):
        """m^(L), the mask level L trained under (level 0: all ones); ``fastimp.Masks``."""
        return load_masks(self._level_path(level, rewind_step, replicate, "mask.pt"))

    def stats(self, level: int, rewind_step=None, replicate: int = 0) -> Dict[str, Any]:
        return load_json(self._level_path(level, rewind_step, replicate, "stats.json"))

    def losses(self, level: int, rewind_step=None, replicate: int = 0) -> torch.Tensor:
        """Train loss of every step of level L's training."""
        return load_torch(self._level_path(level, rewind_step, replicate, "losses.pt"))

    def rewind_state(self, rewind_step=None, replicate: int = 0) -> Dict[str, torch.Tensor]:
        """w_tau, the rewind point (state dict, CPU)."""
        tau, seed = self._key(rewind_step, replicate)
        path = rewind_dir(self.dir, seed, tau) / "rewind_state.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (pre-training not finished?)")
        return load_torch(path)

    def _require_finished(self, level, rewind_step, replicate):
        self._level_path(level, rewind_step, replicate, "stats.json")

    def results(self) -> List[Dict[str, Any]]:
        path = self.dir / "results.json"
        return load_json(path) if path.exists() else []

    def summary(self, eps: Optional[float] = None) -> List[Dict[str, Any]]:
        """Per rewind step and level: mean/std test error over replicates and ``matching``
        (Definition 2.2; eps = std of the dense replicates unless given)."""
        from fastimp.imp.matching import summarize
        if eps is None and (self.dir / "matching.json").exists():
            eps = load_json(self.dir / "matching.json").get("eps")  # the eps the run was given
        return summarize(self.results(), eps=eps)

    # -- model and data --------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """A fresh model of the run's architecture on the CPU (weights: load a solution)."""
        from fastimp import models
        return models.get(self.config.model, num_classes=self.dataset().num_classes,
                          seed=0, **self.config.model_kwargs)

    def dataset(self, device="cpu"):
        if self._dataset is None or str(self._dataset.device) != str(torch.device(device)):
            from fastimp.imp.retraining import load_dataset
            self._dataset = load_dataset(self.config, device=device)
        return self._dataset

    def train_data(self, batch_size: Optional[int] = None, device="cpu", *, augment=False,
                   shuffle=False):
        """The training set as an iterable of (x, y) (in order, unaugmented by default)."""
        return self.dataset(device).loader(
            "train", batch_size or self.config.train.batch_size, shuffle=shuffle,
            augment=augment, drop_last=False, seed=0, device=device)

    def test_data(self, batch_size: Optional[int] = None, device="cpu"):
        """The test set as an iterable of (x, y)."""
        return self.dataset(device).loader("test", batch_size or self.config.train.batch_size,
                                           device=device)

    # -- more training -------------------------------------------------------------------
    def retrain(self, masks, rewind_step=None, replicate=0, level=None, *,
                strategy: Optional[str] = None, device: Optional[str] = None,
                progress: bool = False, start=None):
        """Train ``masks`` with the run's retraining strategy -> (state_dict, stats).

        WR trains ``masks . w_tau`` over steps [tau, T) (``level`` is not needed); LRR and FT start
        from ``masks . w^(level)`` (the solution that was pruned; required) over [0, T) resp.
        [T, 2T). ``strategy`` overrides the run's (e.g. ``"wr"`` retrains LRR masks from the rewind
        point, Appendix D). The result is what level ``level + 1`` would be with ``masks``.
        ``start`` (a state dict) replaces the weights training starts from (the mask is applied).

        Several runs: ``masks`` a list, and ``rewind_step`` / ``replicate`` / ``level`` / ``start``
        one value each or lists of the same length -> a list of ``(state_dict, stats)``.
        """
        from fastimp.imp.retraining import retrain
        return retrain(self, masks, rewind_step=rewind_step, replicate=replicate, level=level,
                       strategy=strategy, device=device, progress=progress, start=start)


def load_run(folder) -> Run:
    """Open an IMP run folder (``OUT/imp_<hash>``; an ``OUT`` holding exactly one is accepted)."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and folder.is_dir():
        runs = sorted(p for p in folder.glob("imp_*") if (p / "config.json").exists())
        if len(runs) == 1:
            folder = runs[0]
        elif len(runs) > 1:
            raise ValueError(f"{folder} holds {len(runs)} IMP runs "
                             f"({', '.join(p.name for p in runs)}); pass one of them")
    return Run(folder)
