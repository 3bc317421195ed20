"""``fastimp hessian DIR --level L``: the Hessian of the train loss at the level-L solution,
restricted to its mask (top eigenvalues, trace, SLQ density) and Lemma 3.1's intersection
threshold d*(R) and largest pruning ratio f_max(R) (Section 3.3, Fig. 5), per replicate and their
mean (:mod:`fastimp.analysis.hessian`). Writes JSON, NPZ and PNGs under ``DIR/analysis/hessian/``."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("hessian", help="Hessian eigenvalues, trace, spectral density and the "
                                       "intersection threshold at an IMP level",
                       description=__doc__)
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--level", type=int, required=True, help="IMP level L")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--replicate", type=int, default=None,
                   help="one replicate (default: every replicate, then their mean)")
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
    p.add_argument("--nonpositive", choices=("flat", "exclude"), default="flat",
                   help="Lemma 3.1 with eigenvalues <= 0: 'flat' counts them as fully flat "
                        "(r = inf, the default), 'exclude' drops them and renormalizes the rest")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing width of the "
                   "density plot (default: 1%% of the spectrum's range)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes and subset")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.hessian import hessian_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    res = hessian_analysis(
        r, args.level, rewind_step=args.rewind_step, replicate=args.replicate, top_n=args.top_n,
        tol=args.tol, iterations=args.iterations, runs=args.runs,
        trace_samples=args.trace_samples, subset=args.subset, batch_size=args.batch_size,
        probes_per_pass=args.probes_per_pass, weight_decay=args.weight_decay, eps=args.eps,
        nonpositive=args.nonpositive, sigma=args.sigma, seed=args.seed, device=args.device)
    tau = res["rewind_step"]
    reps = [args.replicate] if args.replicate is not None else r.replicates
    for rep in reps:
        print(f"wrote {paths.hessian_dir(r, args.level, tau, rep)}/{paths.HESSIAN_JSON}, "
              f"{paths.DENSITY_NPZ}, {paths.DENSITY_PNG}, {paths.THRESHOLD_PNG}")
    if args.replicate is None:
        print(f"wrote {paths.hessian_summary_json(r, args.level, tau)} (mean of {len(reps)})")
    return 0
