"""``run(config, out_dir)``: Algorithm 1 of the paper with the retraining strategies of Section 2,
for several rewind steps and replicates, resumable.

Per replicate (seed s): build w_0, pre-train to every rewind step tau (one trajectory, snapshots
at each tau); then level by level, for each replicate and tau, train m^(L) . start (see
:mod:`fastimp.imp.strategies`), evaluate, prune 1 - alpha of the remaining weights (magnitude or
random) to get m^(L+1) and record ||w^(L) - m^(L+1) . w^(L)||. The trainings of a level (and the
replicates' pre-trainings) run as one batched program (``config.batch_runs``,
``fastimp.training.train_batched``); each keeps its own checkpoint. Every file is written
atomically; a level is finished when its ``stats.json`` exists, so a rerun skips finished levels
and an interrupted level resumes from its training checkpoints (bit-identical on the CPU).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from fastimp._io import load_json, load_torch, save_json, save_torch
from fastimp.imp.config import IMPConfig
from fastimp.imp.folder import Run, collect_results, level_dir, load_run, rewind_dir
from fastimp.imp.retraining import (DEFAULT_CHECKPOINT_EVERY, LevelTrainer, cpu_state,
                                     float_or_none, load_dataset, resolve_device,
                                     training_record, train_runs)
from fastimp.imp.matching import summarize
from fastimp.imp.strategies import PREVIOUS, level_plan
from fastimp.training import NonFiniteLossError


def projection_distance(model: torch.nn.Module, next_masks) -> float:
    """||w - m . w||_2 over the prunable weights: the norm of the weights the mask removes."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for name, m in next_masks.items():
        w = params[name].detach()
        removed = w.masked_select(~m.to(w.device))
        total += removed.double().pow(2).sum().cpu()
    return math.sqrt(float(total))


def _prune(model, fraction: float, masks, pruning: str, generator_seed: int):
    from fastimp.pruning import prune_magnitude, prune_random
    if pruning == "magnitude":
        new = prune_magnitude(model, fraction, masks=masks)
    else:
        g = torch.Generator().manual_seed(generator_seed)
        new = prune_random(model, fraction, masks=masks, generator=g)
    return new


def _adaptive_fraction(model, masks, train_data, dense_stats: Dict[str, Any],
                       dense_solution=None) -> float:
    """Appendix F through ``fastimp.theory.adaptive_pruning_ratio``: the largest ratio whose
    pruned projection keeps the train loss on the linear path below the dense network's train
    loss + eps (eps = std of the per-batch train loss over its last epoch), at least 0.2. The dense
    train loss is measured like the path's (``theory.train_lcs_threshold``: same data, same BN
    mode); ``dense_solution`` None: ``model`` is the dense solution (level 0)."""
    from fastimp.theory import adaptive_pruning_ratio, train_lcs_threshold
    if dense_stats.get("train_loss") is None or dense_stats.get("train_loss_epsilon") is None:
        raise RuntimeError("pruning_fraction='adaptive' needs the dense level's train loss and its "
                           "spread over the last epoch, which level 0 did not record")
    solution = {k: v.detach() for k, v in model.state_dict().items()}
    dense = solution if dense_solution is None else dense_solution
    threshold = train_lcs_threshold(model, dense, train_data,
                                    float(dense_stats["train_loss_epsilon"]),
                                    device=next(iter(solution.values())).device)
    return float(adaptive_pruning_ratio(model, solution, masks, train_data, threshold))


def write_results(folder: Path, config: IMPConfig, eps: Optional[float] = None):
    rows = collect_results(folder, config)
    summary = summarize(rows, eps=eps)
    matching = {(s["rewind_step"], s["level"]): s["matching"] for s in summary}
    for row in rows:
        row["matching"] = matching.get((row["rewind_step"], row["level"]))
    save_json(rows, folder / "results.json")
    save_json(summary, folder / "summary.json")
    save_json({"eps": eps}, folder / "matching.json")
    return rows, summary


def _pretrain(ctxs: List[LevelTrainer], folder: Path, rewind_steps: List[int], batch_runs,
              recompute=()):
    """w_0 and the rewind points w_tau of every replicate: one trajectory per replicate (dense,
    from step 0), the replicates trained as one batched program, snapshots at each tau. When a
    bad rewind state is recomputed (``recompute``: its seeds), the other replicates train along
    as companions, so that it comes out of the very batch it first came from."""
    jobs = []
    for ctx in ctxs:
        seed = ctx.seed
        missing = [t for t in rewind_steps
                   if not (rewind_dir(folder, seed, t) / "rewind_state.pt").exists()]
        if not missing:
            for stale in (folder / f"seed_{seed}").glob("pretrain_to_*.checkpoint.pt"):
                stale.unlink()  # left by a program killed after this replicate was done
            continue
        for tau in missing:
            if tau > ctx.total_steps:
                raise ValueError(f"rewind_steps: {tau} is past the end of training "
                                 f"(T = {ctx.total_steps} steps)")
        model = ctx.build_model()
        init = cpu_state(model)
        save_torch(init, folder / f"seed_{seed}" / "init.pt")
        if 0 in missing:
            save_torch(init, rewind_dir(folder, seed, 0) / "rewind_state.pt")
        end = max(missing)
        if end == 0:
            continue
        jobs.append((ctx, model, end, set(missing), _pretrain_checkpoint(folder, seed, end), False))
    if not jobs:
        return
    if any(j[0].seed in recompute for j in jobs):
        end = max(j[2] for j in jobs)
        have = {j[0].seed for j in jobs}
        jobs += [(ctx, ctx.build_model(), end, set(), _pretrain_checkpoint(folder, ctx.seed, end),
                  True) for ctx in ctxs if ctx.seed not in have]
        jobs.sort(key=lambda j: ctxs.index(j[0]))

    def snapshot(step, view):
        for i in view.runs:
            ctx, _, _, wanted, _, _ = jobs[i]
            if step in wanted:
                state = {k: v.to("cpu") for k, v in view.state_dict(i).items()}
                save_torch(state, rewind_dir(folder, ctx.seed, step) / "rewind_state.pt")
    try:
        train_runs([j[0] for j in jobs], [j[1] for j in jobs], [None] * len(jobs),
                   [0] * len(jobs), [j[2] for j in jobs], [j[4] for j in jobs], snapshot,
                   batch_runs, companions=[j[5] for j in jobs])
    except NonFiniteLossError as exc:
        ctx = jobs[exc.run or 0][0]
        raise exc.located(f"pre-training of replicate {ctx.replicate} (seed {ctx.seed})") \
            from None


def _pretrain_checkpoint(folder: Path, seed: int, end: int) -> Path:
    ckpt = folder / f"seed_{seed}" / f"pretrain_to_{end}.checkpoint.pt"
    for stale in ckpt.parent.glob("pretrain_to_*.checkpoint.pt"):
        if stale != ckpt:  # an interrupted pre-training towards other rewind steps
            stale.unlink()
    return ckpt


class _LevelJob:
    """One (replicate, rewind step) at one level: its mask, start weights and plan. A companion
    (a finished level trained again only so that the others train in their first batch) writes
    nothing but its checkpoints."""

    def __init__(self, ctx: LevelTrainer, folder: Path, tau: int, level: int,
                 companion: bool = False):
        from fastimp.masks import Masks
        cfg = ctx.config
        self.ctx, self.tau, self.level, self.companion = ctx, tau, level, companion
        self.dir = d = level_dir(folder, ctx.seed, tau, level)
        self.model = ctx.build_model()
        if level == 0 and not companion:
            self.masks = Masks.ones(self.model)
            self.masks.save(d / "mask.pt")
        elif (d / "mask.pt").exists():
            self.masks = Masks.load(d / "mask.pt")
        else:  # the previous level finished before its next mask was written
            raise FileNotFoundError(f"{d / 'mask.pt'} is missing; delete "
                                    f"{level_dir(folder, ctx.seed, tau, level - 1)} and rerun")
        self.plan = level_plan(cfg.strategy, level, tau, ctx.total_steps)
        if self.plan.start == PREVIOUS:
            start = load_torch(level_dir(folder, ctx.seed, tau, level - 1) / "solution.pt")
        else:
            start = load_torch(rewind_dir(folder, ctx.seed, tau) / "rewind_state.pt")
        self.model.load_state_dict(start)
        self.model.to(ctx.device)
        self.masks_dev = self.masks.to(ctx.device)

    def where(self) -> str:
        return (f"level {self.level}, rewind step {self.tau}, replicate {self.ctx.replicate} "
                f"(seed {self.ctx.seed})")


def _train_level(jobs: List[_LevelJob], batch_runs, on_run_end) -> None:
    """Train the level of every job as one batched program; each keeps its checkpoint file and
    is finished (``on_run_end(i, result)``) as soon as its training ends."""
    try:
        train_runs([j.ctx for j in jobs], [j.model for j in jobs], [j.masks_dev for j in jobs],
                   [j.plan.start_step for j in jobs], [j.plan.end_step for j in jobs],
                   [j.dir / "checkpoint.pt" for j in jobs], batch_runs=batch_runs,
                   on_run_end=on_run_end, companions=[j.companion for j in jobs])
    except NonFiniteLossError as exc:
        raise exc.located(jobs[exc.run or 0].where()) from None


def _finish_level(job: _LevelJob, folder: Path, result,
                  dense_stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Evaluate, save the solution and losses, prune to the next mask, write stats.json."""
    from fastimp import training
    ctx, cfg, tau, level, model = job.ctx, job.ctx.config, job.tau, job.level, job.model
    masks, masks_dev, plan, d = job.masks, job.masks_dev, job.plan, job.dir
    test_error, test_loss = training.evaluate(model, ctx.test_loader)
    save_torch(cpu_state(model), d / "solution.pt")
    save_torch(result.losses.detach().cpu(), d / "losses.pt")

    if cfg.pruning_fraction == "adaptive":
        stats0 = dense_stats if dense_stats is not None else {
            "train_loss": result.train_loss, "train_loss_epsilon": result.train_loss_epsilon}
        train_data = ctx.dataset.loader("train", ctx.train_cfg.batch_size, shuffle=False,
                                        augment=False, device=str(ctx.device))
        dense = None if level == 0 else \
            load_torch(level_dir(folder, ctx.seed, tau, 0) / "solution.pt")
        fraction = _adaptive_fraction(model, masks_dev, train_data, stats0, dense)
    else:
        fraction = float(cfg.pruning_fraction)
    gen_seed = (ctx.seed * 1_000_003 + tau * 1009 + level) % (2 ** 63)
    next_masks = _prune(model, fraction, masks_dev, cfg.pruning, gen_seed)
    distance = projection_distance(model, next_masks)
    next_masks.to("cpu").save(level_dir(folder, ctx.seed, tau, level + 1) / "mask.pt")

    remaining, total = int(masks.remaining()), int(masks.total())
    stats = {
        "level": level, "rewind_step": tau, "seed": ctx.seed, "replicate": ctx.replicate,
        "strategy": cfg.strategy, "pruning": cfg.pruning,
        "weights_remaining": remaining / total if total else 1.0,
        "remaining": remaining, "total": total,
        "sparsity": 1.0 - (remaining / total if total else 1.0),
        "test_error": float(test_error), "test_loss": float(test_loss),
        "train_loss": float_or_none(result.train_loss),
        "train_loss_epsilon": float_or_none(result.train_loss_epsilon),
        "projection_distance": distance,
        "next_pruning_fraction": fraction,
        "next_weights_remaining": int(next_masks.remaining()) / total if total else 1.0,
        "start_step": plan.start_step, "end_step": plan.end_step,
        "start": plan.start, "seconds": result.seconds,
        **training_record(ctx, result, getattr(ctx, "parallel", "none")),
    }
    save_json(stats, d / "stats.json")
    return stats


def run(config: IMPConfig, out_dir, progress: bool = True, *,
        on_step: Optional[Callable] = None, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        eps: Optional[float] = None, wait: bool = False,
        on_wait: Optional[Callable] = None, parallel: str = "data") -> Optional[Run]:
    """Run (or resume) IMP; returns the :class:`Run` of ``out_dir/imp_<hash>``.

    ``on_step(step, model, optimizer)`` is called after every training step (tests use it to
    interrupt a run); training checkpoints are written every ``checkpoint_every`` steps.
    ``eps`` fixes the matching threshold (else the std of the dense replicates' test errors).

    Everything is checked before anything is written (:mod:`fastimp.imp.preflight`). One process
    at a time works on a run folder (:mod:`fastimp.imp.lock`): another one raises
    ``RunLockedError`` naming it, or with ``wait=True`` waits for it (``on_wait(holder)`` first).
    The folder's files are verified and bad ones recomputed (:mod:`fastimp.imp.verify`); temp
    files of killed writers are deleted. Ctrl-C raises :class:`Interrupted` saying where.

    Under torchrun (every rank calling it, docs/DISTRIBUTED.md): ``parallel="data"`` trains every
    run data-parallel over the ranks (rank 0 runs this loop, writes and holds the lock; the other
    ranks follow it and return its Run, or None when they cannot see the folder);
    ``parallel="runs"`` gives each rank a share of the (replicate, rewind step) runs, which it
    trains (batched) and writes; rank 0 holds the lock and writes results.json at the end.
    """
    from fastimp.distributed import data_parallel
    from fastimp.imp import parallel as par
    if not isinstance(config, IMPConfig):
        raise TypeError(f"config: expected an IMPConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected an int >= 1, got {checkpoint_every!r}")
    mode = par.mode(parallel)
    if mode == "data" and not par.is_main():
        return par.follower_run(data_parallel.follow())
    with (data_parallel.leading() if mode == "data" else par.nothing()) as leader:
        return _locked_run(config, out_dir, progress, on_step, checkpoint_every, eps, wait,
                           on_wait, mode, leader)


def _locked_run(config, out_dir, progress, on_step, checkpoint_every, eps, wait, on_wait, mode,
                leader) -> Run:
    from fastimp._io import clean_stale_tmp
    from fastimp.imp import parallel as par
    from fastimp.imp import preflight, verify
    device = resolve_device(config.device)
    plan = preflight.check(config, out_dir, device, eps)  # nothing is written before this
    folder = plan.folder
    if leader is not None:
        leader.folder = folder
    with par.run_lock(folder, wait, on_wait, mode):
        def check_folder():
            # again under the lock: another process may have extended the run meanwhile
            merged = preflight.merge_config(preflight.read_config(folder), config, folder)
            clean_stale_tmp(folder)
            repair = verify.scan(folder, merged, plan.model)
            verify.apply(repair)
            save_json(merged.to_dict(), folder / "config.json")
            from fastimp.analysis.paths import analysis_dir
            analysis_dir(folder)
            return merged, repair
        # rank 0 checks and repairs the folder; with --parallel runs every rank gets the result
        merged, repair = par.on_main(mode, check_folder)

        threads = torch.get_num_threads()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            _run(config, merged, folder, device, progress, on_step, checkpoint_every, eps,
                 dataset=plan.dataset, repair=repair, mode=mode)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted at {verify.interrupted_at(folder, merged)}; "
                              "finished levels are kept and an unfinished one resumes from "
                              f"its last checkpoint (every {checkpoint_every} steps): rerun the "
                              "same command to resume") from None
        finally:
            torch.set_num_threads(threads)
        par.barrier(mode)  # every rank's runs are finished

        def finish():
            verify.rebuild_init(repair, merged, plan.dataset.num_classes)
            verify.confirm(repair, merged, plan.model, device)
            write_results(folder, merged, eps=eps)
        par.on_main(mode, finish)
    return load_run(folder)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run`; the message says where it stopped and how to resume."""


def _run(config, merged, folder, device, progress, on_step, checkpoint_every, eps, dataset=None,
         repair=None, mode="none"):
    """Level by level: all replicates x rewind steps of a level train as one batched program
    (``config.batch_runs``), then each is evaluated and pruned; finished levels are skipped.
    ``repair``: what ``verify.scan`` found to recompute (those retrain with their companions)."""
    dataset = dataset if dataset is not None else load_dataset(config, device=device)
    ctxs = []
    for seed in config.replicate_seeds:
        ctx = LevelTrainer(config, seed, device, dataset, on_step, False, checkpoint_every)
        ctx.replicate = merged.replicate_seeds.index(seed)
        ctx.progress = progress and ctx.total_steps > 2000  # a bar per training when long
        ctx.parallel = mode
        ctxs.append(ctx)
    runs = [(ctx, tau) for ctx in ctxs for tau in config.rewind_steps]
    pre = ctxs
    if mode == "runs":  # this rank's share of the pre-trainings, then of the runs
        from fastimp.distributed import shard
        pre = [ctxs[i] for i in shard(len(ctxs))]
        runs = [runs[i] for i in shard(len(runs))]
    writes_results = mode != "runs"
    bar = None
    if progress:
        from tqdm.auto import tqdm
        n_runs = len(runs)
        bar = tqdm(total=n_runs * (config.levels + 1), unit="training",
                   desc=f"IMP-{config.strategy.upper()} {config.model}: {config.levels + 1} "
                        f"levels x {n_runs} run{'s' if n_runs > 1 else ''}")
    try:
        _pretrain(pre, folder, config.rewind_steps, config.batch_runs,
                  {seed for seed, _ in repair.rewind_states} if repair else ())
        if mode == "runs":
            from fastimp.distributed import barrier
            barrier()  # every replicate's rewind points are written
        for level in range(config.levels + 1):
            todo, done = [], []
            for ctx, tau in runs:
                stats_path = level_dir(folder, ctx.seed, tau, level) / "stats.json"
                if stats_path.exists():
                    _advance(bar, level, config.levels, load_json(stats_path))
                    done.append((ctx, tau))
                else:
                    todo.append((ctx, tau))
            jobs = _level_jobs(folder, level, runs, todo, done, repair)
            if not any(not j.companion for j in jobs):
                continue

            def finish(i, result, jobs=jobs, level=level):
                job = jobs[i]
                if job.companion:
                    return
                dense = None if level == 0 else load_json(
                    level_dir(folder, job.ctx.seed, job.tau, 0) / "stats.json")
                stats = _finish_level(job, folder, result, dense)
                if writes_results:  # --parallel runs: rank 0, once every rank has finished
                    write_results(folder, merged, eps=eps)
                _advance(bar, level, config.levels, stats)
            _train_level(jobs, config.batch_runs, finish)
    finally:
        if bar is not None:
            bar.close()


def _level_jobs(folder: Path, level: int, runs, todo, done, repair) -> List[_LevelJob]:
    """The trainings of ``level``: every unfinished run, and as companions the finished runs it
    was first batched with (so that it comes out bit-identical): all of the level's runs when
    one is recomputed (``repair``), those whose checkpoint shows their program was killed after
    they finished; in the runs' order. Checkpoints left in finished levels are removed."""
    if not todo:
        for ctx, tau in done:
            (level_dir(folder, ctx.seed, tau, level) / "checkpoint.pt").unlink(missing_ok=True)
        return []
    recomputed = repair is not None and any((ctx.seed, tau, level) in repair.levels
                                            for ctx, tau in todo)
    company = {(ctx.seed, tau) for ctx, tau in done
               if recomputed or (level_dir(folder, ctx.seed, tau, level) / "checkpoint.pt")
               .exists()}
    return [_LevelJob(ctx, folder, tau, level, companion=(ctx.seed, tau) in company)
            for ctx, tau in runs if (ctx, tau) in todo or (ctx.seed, tau) in company]


def _advance(bar, level: int, levels: int, stats: Dict[str, Any]) -> None:
    if bar is not None:
        bar.set_postfix(level=f"{level}/{levels}", seed=stats["seed"],
                        rewind=stats["rewind_step"], err=f"{stats['test_error']:.3f}",
                        left=f"{stats['weights_remaining']:.3f}")
        bar.update(1)
