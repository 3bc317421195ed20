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

from fastimp.imp import verify
from fastimp.imp.config import IMPConfig


def level_dir(folder: Path, seed: int, rewind_step: int, level: int) -> Path:
    return Path(folder) / f"seed_{seed}" / f"rewind_{rewind_step}" / f"level_{level}"


def rewind_dir(folder: Path, seed: int, rewind_step: int) -> Path:
    return Path(folder) / f"seed_{seed}" / f"rewind_{rewind_step}"


def collect_results(folder: Path, config: IMPConfig) -> List[Dict[str, Any]]:
    """The ``stats.json`` of every finished level (verified), per replicate, rewind step, level."""
    rows = []
    for r, seed in enumerate(config.replicate_seeds):
        for tau in config.rewind_steps:
            L = 0
            while (level_dir(folder, seed, tau, L) / "stats.json").exists():
                st = verify.read_stats(level_dir(folder, seed, tau, L) / "stats.json",
                                       level=L, rewind_step=tau, seed=seed)
                st["replicate"] = r
                rows.append(st)
                L += 1
    return rows


class Run:
    """A finished (or partly finished) IMP run folder; see ``docs/ARCHITECTURE.md``."""

    def __init__(self, folder):
        self.dir = Path(folder)
        if not (self.dir / "config.json").exists():
            raise FileNotFoundError(f"{self.dir} is not an IMP run folder (no config.json); "
                                    "run `fastimp imp` first or pass the imp_<hash> folder")
        self.config: IMPConfig = verify.read_config(self.dir / "config.json")
        self._dataset = None
        self._shapes = None

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
        from fastimp.analysis.paths import analysis_dir
        return analysis_dir(self)

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
    # Every file is verified as it is read (fastimp.imp.verify): a bad one raises a one-line
    # CorruptFileError naming it and the fix (rerunning `fastimp imp` recomputes it).
    def _expected(self):
        """(state dict key -> shape, prunable name -> shape) of the run's architecture."""
        if self._shapes is None:
            from fastimp.masks import prunable
            model = self.build_model()
            self._shapes = (verify.expected_state(model),
                            {n: p.shape for n, p in prunable(model).items()})
        return self._shapes

    def solution(self, level: int, rewind_step=None, replicate: int = 0) -> Dict[str, torch.Tensor]:
        """State dict of the level-L solution w^(L) (CPU)."""
        self._require_finished(level, rewind_step, replicate)
        return verify.read_state(self._level_path(level, rewind_step, replicate, "solution.pt"),
                                 self._expected()[0])

    def mask(self, level: int, rewind_step=None, replicate: int = 0):
        """m^(L), the mask level L trained under (level 0: all ones); ``fastimp.Masks``."""
        return verify.read_masks(self._level_path(level, rewind_step, replicate, "mask.pt"),
                                 self._expected()[1])

    def stats(self, level: int, rewind_step=None, replicate: int = 0) -> Dict[str, Any]:
        tau, seed = self._key(rewind_step, replicate)
        return verify.read_stats(self._level_path(level, rewind_step, replicate, "stats.json"),
                                 level=int(level), rewind_step=tau, seed=seed)

    def losses(self, level: int, rewind_step=None, replicate: int = 0) -> torch.Tensor:
        """Train loss of every step of level L's training."""
        st = self.stats(level, rewind_step, replicate)
        return verify.read_losses(self._level_path(level, rewind_step, replicate, "losses.pt"),
                                  st["end_step"] - st["start_step"])

    def rewind_state(self, rewind_step=None, replicate: int = 0) -> Dict[str, torch.Tensor]:
        """w_tau, the rewind point (state dict, CPU)."""
        tau, seed = self._key(rewind_step, replicate)
        path = rewind_dir(self.dir, seed, tau) / "rewind_state.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (pre-training not finished?)")
        return verify.read_state(path, self._expected()[0])

    def _require_finished(self, level, rewind_step, replicate):
        self._level_path(level, rewind_step, replicate, "stats.json")

    def eps(self) -> Optional[float]:
        """The matching eps the run was given (``DIR/matching.json``), or None."""
        path = self.dir / "matching.json"
        if not path.exists():
            return None
        d = verify.read_json(path, "rerun `fastimp imp` with the same arguments (and --eps if "
                                   "you gave one) to rewrite it")
        eps = d.get("eps") if isinstance(d, dict) else "?"
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
            raise verify.CorruptFileError(path, f"holds eps {eps!r}, expected a number or null")
        return eps

    def results(self) -> List[Dict[str, Any]]:
        """One entry per finished level (its ``stats.json`` + ``matching``), per replicate and
        rewind step: what ``DIR/results.json`` holds, read from the levels themselves."""
        from fastimp.imp.matching import summarize
        rows = collect_results(self.dir, self.config)
        matching = {(s["rewind_step"], s["level"]): s["matching"]
                    for s in summarize(rows, eps=self.eps())}
        for row in rows:
            row["matching"] = matching.get((row["rewind_step"], row["level"]))
        return rows

    def summary(self, eps: Optional[float] = None) -> List[Dict[str, Any]]:
        """Per rewind step and level: mean/std test error over replicates and ``matching``
        (Definition 2.2; eps = std of the dense replicates unless given)."""
        from fastimp.imp.matching import summarize
        if eps is None:
            eps = self.eps()  # the eps the run was given
        return summarize(collect_results(self.dir, self.config), eps=eps)

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
                progress: bool = False, start=None, on_result=None):
        """Train ``masks`` with the run's retraining strategy -> (state_dict, stats).

        WR trains ``masks . w_tau`` over steps [tau, T) (``level`` is not needed); LRR and FT start
        from ``masks . w^(level)`` (the solution that was pruned; required) over [0, T) resp.
        [T, 2T). ``strategy`` overrides the run's (e.g. ``"wr"`` retrains LRR masks from the rewind
        point, Appendix D). The result is what level ``level + 1`` would be with ``masks``.
        ``start`` (a state dict) replaces the weights training starts from (the mask is applied).

        Several runs: ``masks`` a list, and ``rewind_step`` / ``replicate`` / ``level`` / ``start``
        one value each or lists of the same length -> a list of ``(state_dict, stats)``.
        ``on_result(i, state_dict, stats)`` is called as soon as run ``i`` is trained, so that a
        long list's finished runs can be written before the rest is done.
        """
        from fastimp.imp.retraining import retrain
        return retrain(self, masks, rewind_step=rewind_step, replicate=replicate, level=level,
                       strategy=strategy, device=device, progress=progress, start=start,
                       on_result=on_result)


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
