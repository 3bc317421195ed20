"""``fastimp report DIR``: figures and a Markdown summary of an IMP run folder."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="write PNG figures and report.md for an IMP run folder",
                       description="DIR is an IMP run folder (OUT/imp_<hash>) or an OUT holding "
                                   "exactly one. More folders (runs that differ from DIR only in "
                                   "the pruning ratio or strategy) are overlaid in Fig. 10.")
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("compare", nargs="*", metavar="DIR2",
                   help="runs to overlay with DIR (Fig. 10: e.g. adaptive vs fixed ratio)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.set_defaults(func=main)


def main(args) -> int:
    from fastimp.report import write_report
    path = write_report(args.dir, args.out, compare=args.compare or None)
    print(f"report: {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"  {png}")
    return 0
