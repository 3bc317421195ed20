"""Fig. 4 (Section 3.2, Definition 3.1; Appendix B, "Robustness at rewind point"): is SGD from the
level-L pruned rewind point m^(L) ⊙ w_tau robust to a random perturbation as large as the one IMP's
next mask makes?

For each rewind step tau, level L and replicate:

- rho = ||m^(L) ⊙ w_tau − m^(L+1) ⊙ w_tau||_2, the size of IMP's perturbation at the rewind point;
- ``perturbations`` random directions v, Gaussian on the alpha^L·D unpruned prunable coordinates
  of m^(L) only (no bias, BatchNorm parameter or pruned coordinate moves), ||v|| = rho;
- each m^(L) ⊙ w_tau + v trained to convergence under m^(L) with the IMP-WR schedule from tau
  (``Run.retrain``, those of every replicate of a level as one list);
- orange: the test error at the midpoint of the line between that solution and w^(L);
  blue: the midpoint between w^(L) and w^(L+1) (Fig. 2's successive-level midpoint).

Mean ± std over replicates (blue) and over replicates × perturbations (orange). Writes one file
per (rewind step, level, replicate) as soon as its perturbations are trained, so a rerun trains
only what is missing, and from every such file on disk written with the same parameters (those
of earlier calls too) ``analysis/robustness.json`` (per rewind step and level: rho, the blue and
orange means, stds and raw values) and ``robustness.png``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from fastimp.analysis import common, paths

DEFAULT_PERTURBATIONS = 4


def rho(rewind_state: Mapping[str, torch.Tensor], mask, next_mask) -> float:
    """||m^(L) ⊙ w_tau − m^(L+1) ⊙ w_tau||_2 (float64)."""
    total = 0.0
    for name, m in mask.items():
        removed = m.bool() & ~next_mask[name].bool()
        total += float(rewind_state[name].double()[removed].pow(2).sum())
    return math.sqrt(total)


def perturbed_start(rewind_state: Mapping[str, torch.Tensor], mask, norm: float,
                    generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """m ⊙ w_tau + v: v Gaussian on the unpruned coordinates of the masked (prunable) tensors only,
    scaled to ``norm``; every other entry (biases, BatchNorm parameters and buffers) is w_tau's."""
    noise = {}
    sq = 0.0
    for name, m in mask.items():
        w = rewind_state[name]
        v = torch.randn(w.shape, generator=generator, dtype=torch.float64) * m.bool()
        noise[name] = v
        sq += float(v.pow(2).sum())
    scale = norm / math.sqrt(sq) if sq > 0 else 0.0
    out = {k: v.clone() for k, v in rewind_state.items()}
    for name, m in mask.items():
        w = rewind_state[name]
        out[name] = (w.double() * m.bool() + scale * noise[name]).to(w.dtype)
    return out


def _generator(seed: int, run_seed: int, tau: int, level: int, k: int) -> torch.Generator:
    key = (((seed * 1_000_003 + run_seed) * 1009 + tau) * 9973 + level) * 101 + k
    return torch.Generator().manual_seed(key % (2 ** 63))


def robustness_analysis(run, levels: Optional[Sequence[int]] = None,
                        rewind_steps: Optional[Sequence[int]] = None, replicate=None,
                        perturbations: int = DEFAULT_PERTURBATIONS, seed: int = 0,
                        max_examples: Optional[int] = None, batch_size: Optional[int] = None,
                        device=None, bn: str = "interpolate", bn_examples: Optional[int] = 2048,
                        chunk_size: Optional[int] = None, progress: bool = False) -> Dict:
    """Fig. 4 for the levels L (default: all with a level L + 1) of every rewind step; see the
    module docstring. Resumable: finished (rewind step, level, replicate) parts are read back."""
    if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 1:
        raise ValueError(f"perturbations: expected an int >= 1, got {perturbations!r}")
    device = common.default_device(device)
    taus = common.rewind_list(run, rewind_steps)
    reps = common.replicate_list(run, replicate)
    base = {"perturbations": perturbations, "seed": seed, "max_examples": max_examples,
            "bn": bn, "bn_examples": bn_examples if bn == "reset" else None,
            "strategy": "wr"}
    todo: Dict = {}  # (tau, L) -> replicates to train
    for tau in taus:
        avail = common.finished_levels(run, tau, reps)
        for L in common.pick_levels([L for L in avail if L + 1 in avail], levels):
            for r in reps:
                p = paths.robustness_part(run, tau, L, r)
                if common.current(p, dict(base, rewind_step=tau, level=L, replicate=r)) is None:
                    todo.setdefault((tau, L), []).append(r)
    parts = {}
    if todo:
        model = run.build_model()
        data = common.load_data(run, "test", max_examples, batch_size, device)
        ekw = common.eval_kwargs(run, device, bn, bn_examples, chunk_size)
        for (tau, L), rs in todo.items():
            parts.update(_level(run, tau, L, rs, base, perturbations, seed, model, data, ekw,
                                device, progress))
    for (tau, L, r), p in paths.robustness_parts(run).items():   # and those of earlier calls
        if (tau, L, r) not in parts and tau in run.rewind_steps and r in run.replicates:
            done = common.current(p, dict(base, rewind_step=tau, level=L, replicate=r))
            if done is not None:
                parts[(tau, L, r)] = done
    everywhere = sorted({k[0] for k in parts} | set(taus))
    out = {"params": common.normalized(dict(base, rewind_steps=everywhere,
                                            replicates=sorted({k[2] for k in parts}),
                                            levels=sorted({k[1] for k in parts}))),
           "replicates": sorted({k[2] for k in parts}), "rewind_steps": {}}
    for tau in everywhere:
        rows = []
        for L in sorted({k[1] for k in parts if k[0] == tau}):
            got = [parts[(tau, L, r)] for r in run.replicates if (tau, L, r) in parts]
            rows.append(_aggregate(L, got))
        out["rewind_steps"][str(tau)] = rows
    from fastimp._io import save_json
    save_json(out, paths.robustness_json(run))
    if any(out["rewind_steps"].values()):
        plot(out, paths.robustness_png(run))
    return out


def _level(run, tau, level, reps, base, K, seed, model, data, ekw, device, progress) -> Dict:
    """The K perturbations of each of ``reps`` at (``tau``, ``level``) as one training list; each
    replicate's part is written as soon as its K runs are trained."""
    masks, starts, sizes = [], [], {}
    for r in reps:
        w_tau = run.rewind_state(tau, r)
        mask = run.mask(level, tau, r)
        sizes[r] = rho(w_tau, mask, run.mask(level + 1, tau, r))
        masks += [mask] * K
        starts += [perturbed_start(w_tau, mask, sizes[r],
                                   _generator(seed, run.seeds[r], tau, level, k))
                   for k in range(K)]
    owner = [r for r in reps for _ in range(K)]
    results: Dict = {r: {} for r in reps}
    parts: Dict = {}

    def finished(i, sd, stats):
        r = owner[i]
        results[r][i] = (sd, stats)
        if len(results[r]) == K and (tau, level, r) not in parts:
            trained = [results[r][j] for j in sorted(results[r])]
            parts[(tau, level, r)] = _part(run, tau, level, r, sizes[r], trained, base, model,
                                           data, ekw)
    # evaluating a part is collective under torchrun: there, only after the whole list
    trained = run.retrain(masks, rewind_step=tau, replicate=owner, strategy="wr", start=starts,
                          device=device, progress=progress,
                          on_result=None if common.split_over_ranks() else finished)
    for i, (sd, stats) in enumerate(trained):
        if (tau, level, owner[i]) not in parts:
            finished(i, sd, stats)
    return parts


def _part(run, tau, level, r, size, trained, base, model, data, ekw) -> Dict:
    from fastimp.landscape.barrier import error_barrier
    mask = run.mask(level, tau, r)
    w_L, w_next = run.solution(level, tau, r), run.solution(level + 1, tau, r)
    blue = error_barrier(model, w_L, w_next, data, betas=[0.5], **ekw)
    orange = [error_barrier(model, w_L, sol, data, betas=[0.5], **ekw) for sol, _ in trained]
    result = {"rewind_step": tau, "level": level, "replicate": r, "seed": run.seeds[r],
              "rho": size, "weights_remaining": float(mask.density()),
              "blue_midpoint_error": blue.midpoint_error,
              "orange_midpoint_error": [c.midpoint_error for c in orange],
              "blue_barrier": blue.barrier, "orange_barrier": [c.barrier for c in orange],
              "solution_error": float(blue.error[0]), "next_solution_error": float(blue.error[-1]),
              "perturbed_test_error": [float(st["test_error"]) for _, st in trained],
              "perturbed_eval_error": [float(c.error[-1]) for c in orange]}
    return common.write(paths.robustness_part(run, tau, level, r),
                        dict(base, rewind_step=tau, level=level, replicate=r), result)


def _aggregate(level: int, parts: List[Dict]) -> Dict:
    blue = [p["blue_midpoint_error"] for p in parts]
    orange = [e for p in parts for e in p["orange_midpoint_error"]]
    row = {"level": level, "replicates": [p["replicate"] for p in parts],
           "weights_remaining": common.mean_std(p["weights_remaining"] for p in parts)["mean"],
           "rho": common.mean_std(p["rho"] for p in parts),
           "blue": common.mean_std(blue), "orange": common.mean_std(orange),
           "blue_barrier": common.mean_std(p["blue_barrier"] for p in parts),
           "orange_barrier": common.mean_std(e for p in parts for e in p["orange_barrier"]),
           "solution_error": common.mean_std(p["solution_error"] for p in parts),
           "perturbed_test_error": common.mean_std(e for p in parts
                                                   for e in p["perturbed_test_error"]),
           "raw": {"rho": [p["rho"] for p in parts], "blue": blue,
                   "orange": [p["orange_midpoint_error"] for p in parts]}}
    return row


def plot(result: Dict, png):
    """Fig. 4 right: midpoint test error between w^(L) and w^(L+1) (blue) and between w^(L) and the
    trained perturbation (orange) per level, one panel per rewind step, mean ± std."""
    plt = common.plt()
    taus = [t for t, rows in result["rewind_steps"].items() if rows]
    fig, axes = plt.subplots(1, len(taus), figsize=(4.2 * len(taus), 3.4), squeeze=False)
    for ax, tau in zip(axes[0], taus):
        rows = result["rewind_steps"][tau]
        x = [r["level"] for r in rows]
        for key, color, label in (("blue", "tab:blue", "w(L) <-> w(L+1) (IMP)"),
                                  ("orange", "tab:orange", "w(L) <-> perturbed, retrained")):
            y = [100 * r[key]["mean"] for r in rows]
            e = [100 * (r[key]["std"] or 0.0) for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, color=color, label=label)
        ax.plot(x, [100 * r["solution_error"]["mean"] for r in rows], "k:", lw=1,
                label="w(L)")
        ax.set_xlabel("level L")
        common.integer_levels(ax)
        ax.set_ylabel("midpoint test error (%)")
        ax.set_title(f"rewind step {tau}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, png)
