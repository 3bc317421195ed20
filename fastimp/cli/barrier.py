"""``fastimp barrier DIR``: error along the path through every IMP level and the barrier matrix
(the paper's Fig. 2), per replicate and their mean (:mod:`fastimp.analysis.barriers`), written to
DIR/analysis/barrier.json and PNGs."""


def add_common(p):
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--replicate", type=int, default=None,
                   help="one replicate (default: every replicate, then their mean)")
    p.add_argument("--bn", choices=["interpolate", "reset"], default="interpolate",
                   help="BatchNorm statistics: interpolated like the weights (the paper) or "
                        "recomputed per point on training data")
    p.add_argument("--bn-examples", type=int, default=2048,
                   help="training examples for --bn reset (default 2048)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="evaluate on the first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per batch (default: the run's training batch size)")
    p.add_argument("--chunk-size", type=int, default=None, help="points per batched forward "
                   "(default: what fits in memory)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--eps", type=float, default=None,
                   help="matching epsilon (default: std of the dense replicates)")


def device_of(args):
    from fastimp.analysis.common import default_device
    return default_device(args.device)


def add_parser(sub):
    p = sub.add_parser("barrier", help="error barriers along the path of IMP solutions (Fig. 2)")
    add_common(p)
    p.add_argument("--rewind-step", type=int, nargs="*", default=None,
                   help="rewind steps to draw paths for (default: all)")
    p.add_argument("--betas", type=float, nargs="*", default=None,
                   help="interpolation points in [0, 1] (default 0, 0.1, ..., 1)")
    p.add_argument("--matrix-rewind-step", type=int, default=None,
                   help="rewind step of the barrier matrix (default: the last)")
    p.add_argument("--no-matrix", action="store_true", help="skip the barrier matrix")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.barriers import barrier_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    out = barrier_analysis(r, rewind_steps=args.rewind_step, replicate=args.replicate,
                           betas=args.betas, matrix_rewind_step=args.matrix_rewind_step,
                           matrix=not args.no_matrix, max_examples=args.max_examples,
                           batch_size=args.batch_size, device=device_of(args), eps=args.eps,
                           bn=args.bn, bn_examples=args.bn_examples, chunk_size=args.chunk_size)
    n = len(out["replicates"])
    for tau, p in out["paths"].items():
        worst = max(s["barrier"] for s in p["segments"])
        print(f"rewind step {tau}: levels {p['levels'][0]}..{p['levels'][-1]}, largest barrier "
              f"between successive levels {100 * worst:.2f}% (mean of {n} replicate(s))")
    print(f"wrote {paths.barrier_json(r)}")
    return 0
