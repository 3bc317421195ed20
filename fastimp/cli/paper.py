"""``fastimp paper DIR [--levels L ...] [--quick]``: every analysis of the paper that applies to the
run folder DIR (barriers, IMP-step and pruning planes, robustness, pruning-ratio scan and
Hessian, weight CDFs with the missing retraining branches, LRR masks rewound), resumably: a rerun
does only what is missing. Then DIR/report/report.md with one section per figure (Figs. 2-11) and
a line naming the figures that could not be made, and why (:mod:`fastimp.analysis.paper`)."""
from __future__ import annotations


def add_parser(sub):
    from fastimp.analysis.paper import STEPS
    p = sub.add_parser("paper", help="every analysis of the paper on a run folder, then the "
                                     "report with Figs. 2-11", description=__doc__)
    p.add_argument("dir", help="IMP run folder (OUT/imp_<hash>)")
    p.add_argument("--levels", type=int, nargs="+", default=None, metavar="L",
                   help="levels of the per-level analyses (planes, robustness, scan, Hessian, "
                        "weights; default: all). Barriers always use every level")
    p.add_argument("--quick", action="store_true",
                   help="smaller grids (21x21), 2 perturbations per replicate, pruning ratios "
                        "0.2/0.5/0.8, a short Hessian (32 Lanczos steps, 1 run, 1000 examples)")
    p.add_argument("--skip", nargs="+", default=(), choices=STEPS, metavar="STEP",
                   help=f"steps not to run: {', '.join(STEPS)} (default: none)")
    p.add_argument("--compare", nargs="+", default=(), metavar="DIR2",
                   help="runs that differ only in the pruning ratio or strategy, for Fig. 10 "
                        "(default: such runs next to DIR)")
    p.add_argument("--eps", type=float, default=None,
                   help="matching tolerance (default: std of the dense replicates' errors)")
    p.add_argument("--nonpositive", choices=("flat", "exclude"), default="flat",
                   help="Lemma 3.1 with Hessian eigenvalues <= 0 (Fig. 5)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="landscape evaluations on the first N test examples (default: all)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the run's `threads`)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=main)


def main(args) -> int:
    from fastimp.analysis.paper import paper_analysis
    from fastimp.imp import load_run
    run = load_run(args.dir)
    path = paper_analysis(run, levels=args.levels, quick=args.quick, skip=args.skip,
                          compare=args.compare, eps=args.eps, nonpositive=args.nonpositive,
                          max_examples=args.max_examples, device=args.device,
                          threads=args.threads, progress=not args.no_progress)
    text = path.read_text()
    note = next((line for line in text.splitlines() if line.startswith(("Figures not made",
                                                                         "Every figure"))), "")
    print(f"report: {path}")
    if note:
        print(note)
    return 0
