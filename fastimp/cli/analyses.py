"""``fastimp robustness DIR`` (Fig. 4), ``fastimp weights DIR`` (Figs. 7, 9) and
``fastimp lrr-rewound DIR`` (Fig. 8): the analyses of :mod:`fastimp.analysis` that ``fastimp
paper`` runs, one at a time. Each is resumable and covers every replicate."""
from __future__ import annotations


def _common(p):
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--levels", type=int, nargs="+", default=None, metavar="L",
                   help="levels (default: all that apply)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_parser(sub):
    p = sub.add_parser("robustness", help="Fig. 4: SGD's robustness to random perturbations at "
                                          "the rewind point", description=_doc("robustness"))
    _common(p)
    p.add_argument("--rewind-step", type=int, nargs="+", default=None,
                   help="rewind steps (default: all)")
    p.add_argument("--perturbations", type=int, default=4, help="per replicate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random perturbations")
    p.add_argument("--max-examples", type=int, default=None,
                   help="midpoints evaluated on the first N test examples (default: all)")
    p.set_defaults(func=robustness)

    p = sub.add_parser("weights", help="Figs. 7, 9: weight CDFs after projection and WR / LRR / "
                                       "FT retraining", description=_doc("weights"))
    _common(p)
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's last")
    p.set_defaults(func=weights)

    p = sub.add_parser("lrr-rewound", help="Fig. 8: IMP-LRR masks retrained from the rewind point",
                       description=_doc("lrr_rewound"))
    _common(p)
    p.add_argument("--rewind-step", type=int, nargs="+", default=None,
                   help="rewind steps (default: all)")
    p.set_defaults(func=lrr_rewound)


def _doc(name):
    import importlib
    return importlib.import_module(f"fastimp.analysis.{name}").__doc__


def robustness(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.robustness import robustness_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    out = robustness_analysis(r, levels=args.levels, rewind_steps=args.rewind_step,
                              perturbations=args.perturbations, seed=args.seed,
                              max_examples=args.max_examples, device=args.device)
    for tau, rows in out["rewind_steps"].items():
        for row in rows:
            print(f"rewind {tau} level {row['level']}: rho {row['rho']['mean']:.4g}, midpoint "
                  f"error blue {100 * row['blue']['mean']:.2f}%, orange "
                  f"{100 * row['orange']['mean']:.2f}%")
    print(f"wrote {paths.robustness_json(r)}")
    return 0


def weights(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.weights import weights_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    weights_analysis(r, levels=args.levels, rewind_step=args.rewind_step, device=args.device)
    print(f"wrote {paths.weights_json(r)}")
    return 0


def lrr_rewound(args) -> int:
    from fastimp.analysis import paths
    from fastimp.analysis.lrr_rewound import lrr_rewound_analysis
    from fastimp.imp import load_run
    r = load_run(args.dir)
    lrr_rewound_analysis(r, levels=args.levels, rewind_steps=args.rewind_step,
                         device=args.device)
    print(f"wrote {paths.lrr_rewound_json(r)}")
    return 0
