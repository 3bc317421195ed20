"""``fastimp prune-scan DIR --level L``: the Fig. 5 experiment (:mod:`fastimp.analysis.prune_scan`).
At level L, prune a further fraction f = 0.1 ... 0.9 of w^(L)'s weights with magnitude and with
random pruning, retrain each mask with the run's strategy, and record whether the result is
matching (Definition 2.2) and the distances R; per replicate and their mean, plotted against the
theory curve of ``fastimp hessian`` at this level (earlier levels in gray). Resumable: finished
retrainings are read back."""
from __future__ import annotations

from fastimp.analysis.prune_scan import DEFAULT_RATIOS


def add_parser(sub):
    p = sub.add_parser("prune-scan", help="Fig. 5: scan pruning ratios at a level, retrain, "
                                          "compare with the Hessian theory", description=__doc__)
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--level", type=int, required=True, help="IMP level L")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--replicate", type=int, default=None,
                   help="one replicate (default: every replicate, then their mean)")
    p.add_argument("--ratios", default=",".join(str(f) for f in DEFAULT_RATIOS),
                   help="comma-separated pruning ratios")
    p.add_argument("--methods", default="magnitude,random", help="magnitude and/or random")
    p.add_argument("--eps-matching", type=float, default=None,
                   help="matching tolerance (default: the run's, i.e. the std of the dense "
                        "replicates' test errors)")
    p.add_argument("--distance", choices=("projection", "retrained"), default="projection",
                   help="R on the plot's x axis: ||w^(L) - m'⊙w^(L)|| (Section 3.3) or "
                        "||w^(L+1) - w^(L)|| (Appendix B)")
    p.add_argument("--seed", type=int, default=0, help="random pruning seed")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.prune_scan import prune_scan_analysis
    from fastimp.imp import load_run
    try:
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ratios: expected comma-separated numbers, got {args.ratios!r}") \
            from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    r = load_run(args.dir)
    res = prune_scan_analysis(r, args.level, rewind_step=args.rewind_step,
                              replicate=args.replicate, ratios=ratios, methods=methods,
                              eps_matching=args.eps_matching, distance=args.distance,
                              seed=args.seed, device=args.device)
    path = paths.prune_scan_json(r, args.level, res["rewind_step"], args.replicate)
    print(f"eps_train (Appendix B) = {res['eps_train']}; wrote {path} and "
          f"{path.with_suffix('.png')}")
    return 0
