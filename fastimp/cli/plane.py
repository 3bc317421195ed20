"""``fastimp plane DIR [--level L ...]``: 2-D slices of the error landscape (Fig. 3: w(L), its
projection and w(L+1); ``--kind pruning``: Fig. 6's magnitude vs random pruning directions), per
replicate and their mean (:mod:`fastimp.analysis.planes`), at every level asked (default: all)."""
from fastimp.cli.barrier import add_common, device_of


def add_parser(sub):
    p = sub.add_parser("plane", help="2-D error landscape slices around IMP steps (Figs. 3, 6)",
                       description=__doc__)
    add_common(p)
    p.add_argument("--level", nargs="+", default=None, metavar="L",
                   help="levels L (default or 'all': every level that has what the plane needs)")
    p.add_argument("--kind", choices=["imp", "pruning"], default="imp",
                   help="imp: w(L), its projection and w(L+1) (Fig. 3); pruning: magnitude vs "
                        "random pruning of w(L) (Fig. 6)")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--grid", type=int, default=51, help="grid points per axis (default 51)")
    p.add_argument("--ratio", type=float, default=0.2, help="pruning ratio for --kind pruning")
    p.add_argument("--seed", type=int, default=0, help="random pruning seed for --kind pruning")
    p.set_defaults(func=run)


def levels_of(r, args, tau):
    """The levels asked, or every level with what the plane needs (L + 1 too for --kind imp)."""
    from fastimp.analysis.common import finished_levels, replicate_list
    done = finished_levels(r, tau, replicate_list(r, args.replicate))
    avail = [L for L in done if args.kind == "pruning" or L + 1 in done]
    if args.level is None or args.level == ["all"]:
        if not avail:
            raise ValueError(f"--level: no level of rewind step {tau} has what the "
                             f"{args.kind} plane needs (finished: {done})")
        return avail
    try:
        return [int(L) for L in args.level]
    except ValueError:
        raise ValueError(f"--level: expected level numbers or 'all', got {args.level}") from None


def run(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.planes import plane_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    tau = args.rewind_step if args.rewind_step is not None else r.rewind_steps[0]
    for L in levels_of(r, args, tau):
        plane_analysis(r, L, kind=args.kind, rewind_step=tau, replicate=args.replicate,
                       grid=args.grid, ratio=args.ratio, seed=args.seed,
                       max_examples=args.max_examples, batch_size=args.batch_size,
                       device=device_of(args), eps=args.eps, bn=args.bn,
                       bn_examples=args.bn_examples, chunk_size=args.chunk_size)
        print(f"wrote {paths.plane_json(r, args.kind, L, tau)}")
    return 0
