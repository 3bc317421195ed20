"""``fastimp plane DIR --level L``: a 2-D slice of the error landscape (Fig. 3: w(L), its
projection and w(L+1); ``--kind pruning``: Fig. 6's magnitude vs random pruning directions)."""
from fastimp.cli.barrier import add_common, device_of


def add_parser(sub):
    p = sub.add_parser("plane", help="2-D error landscape slice around an IMP step (Figs. 3, 6)")
    add_common(p)
    p.add_argument("--level", type=int, required=True, help="level L")
    p.add_argument("--kind", choices=["imp", "pruning"], default="imp",
                   help="imp: w(L), its projection and w(L+1) (Fig. 3); pruning: magnitude vs "
                        "random pruning of w(L) (Fig. 6)")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--grid", type=int, default=51, help="grid points per axis (default 51)")
    p.add_argument("--ratio", type=float, default=0.2, help="pruning ratio for --kind pruning")
    p.add_argument("--seed", type=int, default=0, help="random pruning seed for --kind pruning")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastimp.imp import load_run
    from fastimp.landscape.runs import plane_analysis, plane_json
    r = load_run(args.dir)
    out = plane_analysis(r, args.level, kind=args.kind, rewind_step=args.rewind_step,
                         replicate=args.replicate, grid=args.grid, ratio=args.ratio,
                         seed=args.seed, max_examples=args.max_examples,
                         batch_size=args.batch_size, device=device_of(args), eps=args.eps,
                         bn=args.bn, bn_examples=args.bn_examples, chunk_size=args.chunk_size)
    print(f"wrote {r.analysis_dir / plane_json(args.kind, args.level, out['rewind_step'])}")
    return 0
