"""``fastimp hessian DIR --level L``: the Hessian of the train loss at the level-L solution,
restricted to its mask (top eigenvalues, trace, SLQ density) and Lemma 3.1's intersection
threshold d*(R) and largest pruning ratio f_max(R) (Section 3.3, Fig. 5). Writes JSON, NPZ and
PNGs under ``DIR/analysis/hessian/``."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("hessian", help="Hessian eigenvalues, trace, spectral density and the "
                                       "intersection threshold at an IMP level",
                       description=__doc__)
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--level", type=int, required=True, help="IMP level L")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--replicate", type=int, default=0, help="replicate index (0..N-1)")
    p.add_argument("--top-n", type=int, default=5, help="top eigenvalues (Lanczos)")
    p.add_argument("--tol", type=float, default=1e-4, help="eigenvalue relative error bound")
    p.add_argument("--iterations", type=int, default=128,
                   help="SLQ Lanczos steps (the paper: 512 on CIFAR-10, 128 on ImageNet)")
    p.add_argument("--runs", type=int, default=4, help="SLQ random starts (the paper: 4)")
    p.add_argument("--trace-samples", type=int, default=100, help="Hutchinson samples")
    p.add_argument("--subset", type=int, default=None,
                   help="random subset of the train set (the paper: 25,000 on ImageNet; "
                        "default: all of it)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per batch (default: the run's training batch size)")
    p.add_argument("--probes-per-pass", type=int, default=16,
                   help="Hessian-vector products per pass over the data")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="add weight_decay/2 |w|^2 to the loss (default: the data loss only)")
    p.add_argument("--eps", type=float, default=None,
                   help="ε of the train-loss sublevel set (default: Appendix B's estimate from "
                        "`fastimp prune-scan` at this level if present, else the std of the dense "
                        "run's per-batch train loss over its last epoch, Appendix F)")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing width of the "
                   "density plot (default: 1%% of the spectrum's range)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes and subset")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run)


def _tag(level, tau, replicate) -> str:
    return f"level_{level}_rewind_{tau}_rep_{replicate}"


def out_dir(run, level, tau, replicate) -> Path:
    return Path(run.analysis_dir) / "hessian" / _tag(level, tau, replicate)


def _epsilon(run, args, tau):
    if args.eps is not None:
        return float(args.eps), "given (--eps)"
    from fastimp.cli.prune_scan import scan_path
    from fastimp._io import load_json
    path = scan_path(run, args.level, tau, args.replicate)
    if path.exists():
        eps = load_json(path).get("eps_train")
        if eps is not None and eps > 0:
            return float(eps), "Appendix B (fit of train loss vs test error, prune-scan)"
    stats = run.stats(0, rewind_step=tau, replicate=args.replicate)
    eps = stats.get("train_loss_epsilon")
    if eps is None or not eps > 0:
        raise ValueError("--eps: not given and the dense level recorded no train_loss_epsilon")
    return float(eps), "Appendix F (std of the dense run's per-batch train loss, last epoch)"


def projection_distances(model_state, masks, ratios, method="magnitude", seed=0):
    """R(f) = ||w^(L) − m'⊙w^(L)||_2 of pruning a further fraction f of the unmasked weights."""
    import torch

    from fastimp.pruning import prune_magnitude, prune_random
    weights = {n: model_state[n].float() for n in masks}
    out = []
    for f in ratios:
        if method == "magnitude":
            new = prune_magnitude(weights, f, masks=masks)
        else:
            new = prune_random(weights, f, masks=masks,
                               generator=torch.Generator().manual_seed(seed))
        sq = sum(float((w * (~new[n].to(w.device))).pow(2).sum()) for n, w in weights.items())
        out.append(sq ** 0.5)
    return out


def run(args) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fastimp import theory
    from fastimp.hessian import Hessian
    from fastimp.imp import load_run
    from fastimp._io import save_json

    r = load_run(args.dir)
    tau = args.rewind_step if args.rewind_step is not None else r.rewind_steps[0]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = r.build_model()
    solution = r.solution(args.level, rewind_step=tau, replicate=args.replicate)
    model.load_state_dict(solution)
    model.to(device)
    masks = r.mask(args.level, rewind_step=tau, replicate=args.replicate)
    data = r.train_data(batch_size=args.batch_size, device=device)
    hess = Hessian(model, F.cross_entropy, data, dict(masks), seed=args.seed,
                   subset=args.subset, probes_per_pass=args.probes_per_pass,
                   weight_decay=args.weight_decay)
    out = out_dir(r, args.level, tau, args.replicate)
    print(f"hessian: level {args.level}, D_A = {hess.D_A}, {hess.op.num_examples} examples, "
          f"device {device}")
    eigenvalues, _ = hess.eigenvalues(top_n=min(args.top_n, hess.D_A), tol=args.tol,
                                      max_iter=max(100, 4 * args.top_n))
    print("top eigenvalues:", ", ".join(f"{v:.5g}" for v in eigenvalues))
    samples = hess.trace(n_samples=args.trace_samples)
    tr, tr_err = float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples))) \
        if len(samples) > 1 else float("nan")
    print(f"trace: {tr:.5g} ± {tr_err:.2g}")
    density = hess.density(iterations=args.iterations, n_runs=args.runs)
    density.meta.update({"level": args.level, "rewind_step": tau, "replicate": args.replicate})
    density.save(out / "density.npz")
    density.plot(out / "density.png", sigma=args.sigma,
                 title=f"Hessian spectrum, level {args.level} (D_A = {hess.D_A})")

    eps, eps_source = _epsilon(r, args, tau)
    ratios = [round(0.1 * i, 1) for i in range(1, 10)]
    R_mag = projection_distances(solution, masks, ratios)
    R_grid = np.linspace(0.0, 1.5 * max(R_mag + [1e-12]), 101)
    d_star = theory.intersection_threshold(density, eps, R_grid)
    f_max = theory.max_pruning_ratio(density, eps, R_grid, n_prunable=masks.remaining())
    f_mag = theory.max_pruning_ratio(density, eps, lambda f: float(np.interp(f, [0] + ratios,
                                                                             [0] + R_mag)),
                                     n_prunable=masks.remaining())
    result = {
        "level": args.level, "rewind_step": tau, "replicate": args.replicate,
        "D_A": hess.D_A, "n_prunable_remaining": int(masks.remaining()),
        "num_examples": hess.op.num_examples, "weight_decay": args.weight_decay,
        "batchnorm": "eval", "eigenvalues": eigenvalues, "trace": tr, "trace_stderr": tr_err,
        "trace_samples": len(samples), "density": "density.npz",
        "density_iterations": density.meta["iterations"], "density_runs": args.runs,
        "eps": eps, "eps_source": eps_source,
        "curve": {"R": R_grid.tolist(), "d_star": np.asarray(d_star).tolist(),
                  "f_max": np.asarray(f_max).tolist()},
        "magnitude_projection": {"ratio": ratios, "R": R_mag},
        "f_max_magnitude_projection": f_mag,
    }
    save_json(result, out / "hessian.json")
    plot_threshold(result, out / "threshold.png")
    print(f"eps = {eps:.4g} ({eps_source}); largest pruning ratio with magnitude pruning's "
          f"projection distance: {f_mag:.3f}")
    print(f"wrote {out}/hessian.json, density.npz, density.png, threshold.png")
    return 0


def plot_threshold(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastimp.hessian.density import _save_fig
    fig, ax = plt.subplots(figsize=(5, 3.5))
    c = result["curve"]
    ax.plot(c["R"], c["f_max"], "k-", label="theory: max pruning ratio (Lemma 3.1)")
    mp = result["magnitude_projection"]
    ax.plot(mp["R"], mp["ratio"], "b.--", alpha=0.6, label="magnitude pruning: R(f)")
    ax.set_xlabel("projection distance R")
    ax.set_ylabel("pruning ratio f")
    ax.set_ylim(0, 1)
    ax.set_title(f"level {result['level']}: ε = {result['eps']:.3g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
