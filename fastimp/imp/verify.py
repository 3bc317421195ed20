"""Integrity of IMP run folders: every file a rerun or an analysis reads is checked before use.

A ``.pt`` file must be an intact ``torch.save`` zip (each entry's CRC-32 is checked: ``torch.load``
alone reads flipped bytes silently) holding what it should (keys and shapes of the architecture,
finite weights; masks of the prunable weights; one loss per step); a JSON file must parse and hold
its fields. A bad file raises :class:`CorruptFileError`, one line naming the file and the fix.

A rerun (:func:`scan` before the level loop, :func:`confirm` after it) recomputes what it can:
a level whose solution, losses or stats are bad is trained again; a bad mask m^(L) retrains the
level that pruned it (L - 1); a bad rewind state is pre-trained again; a bad training checkpoint is
dropped (its level restarts); ``init.pt`` is rebuilt. Later levels were built from the lost files,
so a recomputed mask or solution that later levels used must come out equal to the one they used
(bit-identical on the CPU): otherwise the original is put back and :class:`RecomputedDiffersError`
says which levels to delete.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

import torch

RERUN_FIX = ("rerun the `fastimp imp` command that made this run (same arguments; see its "
             "config.json) to recompute it")


class CorruptFileError(ValueError):
    """A run-folder file is unreadable or does not hold what it should."""

    def __init__(self, path, problem: str, fix: str = RERUN_FIX):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{self.path} {problem}; {fix}")


class RecomputedDiffersError(RuntimeError):
    """A recomputed file differs from the one later levels were built from."""


class RecomputeWarning(UserWarning):
    """A bad run-folder file is being recomputed."""


def _why(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------------ reading
def read_json(path, fix: str = RERUN_FIX) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise CorruptFileError(path, f"is not readable JSON ({_why(exc)})", fix) from None


def check_zip(path, fix: str = RERUN_FIX) -> None:
    """``path`` is an intact zip (``torch.save``'s format): central directory and CRC-32s."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except FileNotFoundError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CorruptFileError(path, f"is truncated or not a torch.save file ({_why(exc)})",
                               fix) from None
    if bad is not None:
        raise CorruptFileError(path, f"is corrupt (checksum of its entry {bad!r} does not match)",
                               fix)


def read_torch(path, fix: str = RERUN_FIX) -> Any:
    check_zip(path, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFileError(path, f"cannot be loaded ({_why(exc)})", fix) from None


def read_config(path, fix: str = RERUN_FIX):
    from fastimp.imp.config import IMPConfig
    d = read_json(path, fix)
    try:
        return IMPConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"does not hold a valid IMP config ({_why(exc)})",
                               fix) from None


def expected_state(model: torch.nn.Module) -> Dict[str, torch.Size]:
    """Key -> shape of ``model.state_dict()``: what a solution or rewind state must hold."""
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state(path, state, expected: Optional[Dict[str, torch.Size]],
                fix: str = RERUN_FIX) -> Dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CorruptFileError(path, "does not hold a state dict (name -> tensor)", fix)
    if expected is not None:
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            raise CorruptFileError(path, "does not match the run's model (missing "
                                   f"{missing[:3]}, unexpected {extra[:3]})", fix)
        for k, shape in expected.items():
            if state[k].shape != shape:
                raise CorruptFileError(path, f"holds {k!r} of shape {tuple(state[k].shape)}, "
                                       f"the model's is {tuple(shape)}", fix)
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CorruptFileError(path, f"holds NaN or inf in {k!r}", fix)
    return state


def read_state(path, expected=None, fix: str = RERUN_FIX) -> Dict[str, torch.Tensor]:
    return check_state(path, read_torch(path, fix), expected, fix)


def read_masks(path, expected: Optional[Dict[str, torch.Size]] = None, fix: str = RERUN_FIX):
    """``fastimp.Masks`` from ``path``; ``expected`` = prunable name -> shape."""
    from fastimp.masks import Masks
    if str(path).endswith((".pt", ".pth")):
        check_zip(path, fix)
    try:
        masks = Masks.load(path)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CorruptFileError(path, f"does not hold masks ({_why(exc)})", fix) from None
    if expected is not None:
        if list(masks) != list(expected):
            raise CorruptFileError(path, f"holds masks for {list(masks)[:3]}..., the model's "
                                   f"prunable weights are {list(expected)[:3]}...", fix)
        for n, shape in expected.items():
            if masks[n].shape != shape:
                raise CorruptFileError(path, f"holds the mask of {n!r} with shape "
                                       f"{tuple(masks[n].shape)}, the weight's is {tuple(shape)}",
                                       fix)
    return masks


_STATS_KEYS = ("level", "rewind_step", "seed", "test_error", "weights_remaining", "remaining",
               "total", "start_step", "end_step")


def read_stats(path, fix: str = RERUN_FIX, *, level=None, rewind_step=None,
               seed=None) -> Dict[str, Any]:
    """A level's ``stats.json``: its fields present, and of this level."""
    d = read_json(path, fix)
    if not isinstance(d, dict):
        raise CorruptFileError(path, "does not hold a JSON object", fix)
    missing = [k for k in _STATS_KEYS if k not in d]
    if missing:
        raise CorruptFileError(path, f"lacks the field(s) {missing}", fix)
    for k, want in (("level", level), ("rewind_step", rewind_step), ("seed", seed)):
        if want is not None and d[k] != want:
            raise CorruptFileError(path, f"says {k} {d[k]!r}, but it is in the folder of "
                                   f"{k} {want!r}", fix)
    err = d["test_error"]
    if isinstance(err, bool) or not isinstance(err, (int, float)) or not 0 <= err <= 1:
        raise CorruptFileError(path, f"holds test_error {err!r}, expected a fraction in [0, 1]",
                               fix)
    for k in ("remaining", "total", "start_step", "end_step"):
        if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 0:
            raise CorruptFileError(path, f"holds {k} {d[k]!r}, expected an int >= 0", fix)
    return d


def read_losses(path, n_steps: Optional[int] = None, fix: str = RERUN_FIX) -> torch.Tensor:
    t = read_torch(path, fix)
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
        raise CorruptFileError(path, "does not hold a 1-D float tensor of train losses", fix)
    if n_steps is not None and t.numel() != n_steps:
        raise CorruptFileError(path, f"holds {t.numel()} losses, the level ran {n_steps} steps",
                               fix)
    return t


# ------------------------------------------------------------------------------ a rerun
@dataclass
class Repair:
    """What :func:`scan` found bad in a run folder and what recomputes it."""
    folder: Path
    levels: Set[Tuple[int, int, int]] = field(default_factory=set)   # (seed, tau, L): retrain
    rewind_states: Set[Tuple[int, int]] = field(default_factory=set)  # (seed, tau): pre-train
    init: Set[int] = field(default_factory=set)                        # seeds: rebuild init.pt
    delete: Dict[Path, Tuple[str, str]] = field(default_factory=dict)  # bad file: why, action
    # files later levels were built from that recomputing overwrites: path -> (bytes, content)
    keep: Dict[Path, Tuple[bytes, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.levels or self.rewind_states or self.init or self.delete)


def _bad(call, *args, **kw):
    """(value, None) or (None, problem) for one of the readers above."""
    try:
        return call(*args, **kw), None
    except CorruptFileError as exc:
        return None, exc.problem


def _started(d: Path) -> bool:
    return (d / "stats.json").exists() or (d / "checkpoint.pt").exists()


def scan(folder, config, model: torch.nn.Module) -> Repair:
    """Check every file of ``folder`` (an IMP run of ``config``; ``model`` gives the expected
    shapes) and plan the recomputation of the bad ones; nothing is changed yet (:func:`apply`)."""
    from fastimp.imp.folder import level_dir, rewind_dir
    from fastimp.masks import prunable
    folder = Path(folder)
    rep = Repair(folder)
    state = expected_state(model)
    shapes = {n: p.shape for n, p in prunable(model).items()}
    for seed in config.replicate_seeds:
        sdir = folder / f"seed_{seed}"
        if (sdir / "init.pt").exists():
            _, why = _bad(read_state, sdir / "init.pt", state)
            if why:
                rep.init.add(seed)
                rep.delete[sdir / "init.pt"] = (why, "rebuilding it")
        for ck in sorted(sdir.glob("pretrain_to_*.checkpoint.pt")):
            _, why = _bad(check_zip, ck)
            if why:
                rep.delete[ck] = (why, "deleting it (pre-training starts over)")
        for tau in config.rewind_steps:
            rs = rewind_dir(folder, seed, tau) / "rewind_state.pt"
            if rs.exists():
                _, why = _bad(read_state, rs, state)
                if why:
                    rep.rewind_states.add((seed, tau))
                    rep.delete[rs] = (why, f"pre-training to step {tau} again")
            L = 0
            while level_dir(folder, seed, tau, L).is_dir():
                _scan_level(rep, config, folder, seed, tau, L, state, shapes)
                L += 1
    for seed, tau, L in sorted(rep.levels):
        _keep_consumed(rep, config, folder, seed, tau, L, state, shapes)
    return rep


def _scan_level(rep: Repair, config, folder: Path, seed: int, tau: int, L: int, state, shapes):
    from fastimp.imp.folder import level_dir
    d = level_dir(folder, seed, tau, L)
    mask_path = d / "mask.pt"
    masks, mask_why = (None, None)
    if mask_path.exists():
        masks, mask_why = _bad(read_masks, mask_path, shapes)
    if (d / "checkpoint.pt").exists():
        _, why = _bad(check_zip, d / "checkpoint.pt")
        if why:
            rep.delete[d / "checkpoint.pt"] = (why, f"deleting it (level {L} starts over)")
    if not (d / "stats.json").exists():
        if mask_why:
            prev = level_dir(folder, seed, tau, L - 1)
            if L > 0 and (prev / "stats.json").exists():
                rep.levels.add((seed, tau, L - 1))  # the level that pruned it writes it again
            rep.delete[mask_path] = (mask_why, f"retraining level {L - 1}, which pruned it"
                                     if L > 0 else "writing it again")
        return
    bad = {}
    stats, why = _bad(read_stats, d / "stats.json", level=L, rewind_step=tau, seed=seed)
    if why:
        bad["stats.json"] = why
    if not mask_path.exists():
        mask_why = "is missing"
    elif masks is not None and stats is not None and \
            (masks.remaining(), masks.total()) != (stats["remaining"], stats["total"]):
        mask_why = (f"keeps {masks.remaining()} of {masks.total()} weights, but stats.json says "
                    f"level {L} trained {stats['remaining']} of {stats['total']}")
    if mask_why:
        rep.delete[mask_path] = (mask_why, f"retraining level {L - 1}, which pruned it, and level "
                                 f"{L}" if L > 0 else "retraining level 0")
        rep.levels.add((seed, tau, max(L - 1, 0)))
        if L > 0:
            rep.levels.add((seed, tau, L))  # trained under a mask we cannot check: again
    if not (d / "solution.pt").exists():
        bad["solution.pt"] = "is missing"
    else:
        _, why = _bad(read_state, d / "solution.pt", state)
        if why:
            bad["solution.pt"] = why
    n = stats["end_step"] - stats["start_step"] if stats is not None else None
    if not (d / "losses.pt").exists():
        bad["losses.pt"] = "is missing"
    else:
        _, why = _bad(read_losses, d / "losses.pt", n)
        if why:
            bad["losses.pt"] = why
    if bad:
        rep.levels.add((seed, tau, L))
        for name, why in bad.items():
            rep.delete[d / name] = (why, f"retraining level {L}")


def _keep_consumed(rep: Repair, config, folder: Path, seed: int, tau: int, L: int, state, shapes):
    """Remember the good outputs of level L that the started level L + 1 was built from."""
    from fastimp.imp.folder import level_dir
    from fastimp.imp.strategies import PREVIOUS, level_plan
    nxt = level_dir(folder, seed, tau, L + 1)
    if not _started(nxt) or (seed, tau, L + 1) in rep.levels:
        return
    files = [(nxt / "mask.pt", read_masks, shapes)]
    if level_plan(config.strategy, L + 1, 0, 1).start == PREVIOUS:
        files.append((level_dir(folder, seed, tau, L) / "solution.pt", read_state, state))
    for path, reader, expected in files:
        if path.exists() and path not in rep.delete:
            value, why = _bad(reader, path, expected)
            if not why:
                rep.keep[path] = (path.read_bytes(), value)


def apply(rep: Repair) -> None:
    """Warn about every bad file, delete it and the ``stats.json`` of every level to retrain (so
    the level loop trains it again), and rebuild ``init.pt``."""
    for path, (why, action) in sorted(rep.delete.items()):
        warnings.warn(f"{path} {why}: {action}", RecomputeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
    from fastimp.imp.folder import level_dir
    for seed, tau, L in sorted(rep.levels):
        (level_dir(rep.folder, seed, tau, L) / "stats.json").unlink(missing_ok=True)


def rebuild_init(rep: Repair, config, num_classes: int) -> None:
    """Write ``seed_<s>/init.pt`` again: w_0 is a function of the seed (built on the CPU)."""
    from fastimp import models
    from fastimp._io import save_torch
    from fastimp.imp.retraining import cpu_state, replicate_train_config
    for seed in sorted(rep.init):
        path = rep.folder / f"seed_{seed}" / "init.pt"
        if not path.exists():
            model = models.get(config.model, num_classes=num_classes,
                               seed=replicate_train_config(config, seed).init_seed,
                               **config.model_kwargs)
            save_torch(cpu_state(model), path)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) for k in a)
    return a == b  # Masks


def confirm(rep: Repair, config, model: torch.nn.Module, device) -> None:
    """After the level loop: every recomputed file later levels were built from must equal the
    original; otherwise put the original back and raise :class:`RecomputedDiffersError`."""
    from fastimp.masks import prunable
    state = expected_state(model)
    shapes = {n: p.shape for n, p in prunable(model).items()}
    for path, (data, old) in sorted(rep.keep.items()):
        if not path.exists():
            continue
        reader, expected = (read_masks, shapes) if path.name == "mask.pt" else (read_state, state)
        new, _ = _bad(reader, path, expected)
        if new is not None and _same(old, new):
            continue
        from fastimp._io import atomic_write
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        L = int(path.parent.name.split("_")[1]) - (1 if path.name == "mask.pt" else 0)
        producer = path.parent.with_name(f"level_{L}")
        consumer = path.parent.with_name(f"level_{L + 1}")
        raise RecomputedDiffersError(
            f"recomputing {producer} gave another {path.name} than the one {consumer.name} and "
            f"the levels after it were built from (training on {device} is not "
            f"bit-reproducible); delete {consumer} and every later level_* beside it, then "
            "rerun to recompute them")


def interrupted_at(folder, config) -> str:
    """Where a run of ``config`` stands: the first unfinished piece, in the order the runner
    works (per seed: pre-training, then per rewind step the levels in order)."""
    from fastimp.imp.folder import level_dir, rewind_dir
    folder = Path(folder)
    total = len(config.replicate_seeds) * len(config.rewind_steps) * (config.levels + 1)
    done = 0
    first = None
    for r, seed in enumerate(config.replicate_seeds):
        for tau in config.rewind_steps:
            if first is None and not (rewind_dir(folder, seed, tau) / "rewind_state.pt").exists():
                first = f"pre-training of replicate {r} (seed {seed}) to step {tau}"
            for L in range(config.levels + 1):
                if (level_dir(folder, seed, tau, L) / "stats.json").exists():
                    done += 1
                elif first is None:
                    first = f"level {L} of replicate {r} (seed {seed}), rewind step {tau}"
    where = first or "the end (every level finished)"
    return f"{where}; {done} of {total} levels finished"
