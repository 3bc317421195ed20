"""``fastimp imp``: run (or resume) IMP from a preset, with ``key=value`` overrides."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "imp", help="run Iterative Magnitude Pruning (IMP-WR / LRR / FT) from a preset",
        description="Run (or resume: finished levels are skipped) IMP into OUT/imp_<hash>/. "
                    "Overrides are key=value on the IMPConfig, e.g. train.lr=0.05 "
                    "train.steps=3000it pruning=random levels=5.")
    p.add_argument("--preset", required=True,
                   help="cifar10-resnet20, cifar100-resnet18, imagenet-resnet50 (Appendix B) or "
                        "mnist1d (small CPU default)")
    p.add_argument("--out", required=True, help="output folder; the run goes to OUT/imp_<hash>/")
    p.add_argument("--rewind-step", dest="rewind_steps", type=str, nargs="+", default=None,
                   metavar="STEP", help="rewind step(s) tau in iterations, e.g. 0 250 2000it "
                   "(default: the preset's)")
    p.add_argument("--levels", type=int, default=None,
                   help="pruning levels after level 0 (default: the preset's)")
    p.add_argument("--strategy", choices=("wr", "lrr", "ft"), default=None,
                   help="retraining: weight rewinding, lr rewinding or finetuning "
                        "(default: the preset's)")
    p.add_argument("--pruning", choices=("magnitude", "random"), default=None,
                   help="prune the smallest weights, or random ones as a control "
                        "(default: the preset's)")
    p.add_argument("--replicates", type=int, default=None,
                   help="independent runs (seeds 0..N-1), for means, stds and the matching eps "
                        "(default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="seeds of the replicates, instead of --replicates (default: 0..N-1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: the preset's)")
    p.add_argument("--eps", type=float, default=None,
                   help="matching threshold (default: std of the dense replicates' test errors)")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="training checkpoint period in steps")
    p.add_argument("--wait", action="store_true",
                   help="if another process is working on this run, wait for it to finish "
                        "(default: exit with an error naming it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps per level, steps of the whole run, memory per "
                        "device for 1-8 devices) and exit without training or reading the data")
    p.add_argument("--parallel", choices=("data", "runs"), default="data",
                   help="under torchrun: 'data' trains every run data-parallel over the ranks "
                        "(DistributedDataParallel); 'runs' gives each rank whole runs "
                        "(replicates x rewind steps)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="IMPConfig overrides")
    p.set_defaults(func=main)


def _config(args):
    from fastimp import presets
    from fastimp.imp.config import apply_overrides
    config = presets.get(args.preset)
    overrides = list(args.overrides)
    if args.rewind_steps is not None:
        # `--rewind-step 0 250 train.lr=0.05`: nargs="+" also swallowed the overrides after it
        steps = [s for part in args.rewind_steps if "=" not in part
                 for s in part.split(",") if s]
        overrides = [s for s in args.rewind_steps if "=" in s] + overrides
        if not steps:
            raise ValueError("--rewind-step: expected at least one step, e.g. --rewind-step 0 2000")
        overrides.append(f"rewind_steps={','.join(steps)}" if len(steps) > 1
                         else f"rewind_steps={steps[0]}")
    for key in ("levels", "strategy", "pruning", "replicates", "device"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.seeds is not None:
        overrides.append("seeds=[" + ",".join(str(s) for s in args.seeds) + "]")
    if args.replicates is not None and args.seeds is None:
        overrides.append("seeds=null")
    return apply_overrides(config, overrides)


def format_summary(summary) -> str:
    head = f"{'rewind':>7} {'level':>5} {'remaining':>10} {'test error':>17} {'matching':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        std = f"±{100 * s['test_error_std']:.2f}" if s["test_error_std"] is not None else ""
        err = f"{100 * s['test_error']:.2f}%{std}"
        m = {True: "yes", False: "no", None: "n/a"}[s["matching"]]
        lines.append(f"{s['rewind_step']:>7} {s['level']:>5} {100 * s['weights_remaining']:>9.2f}% "
                     f"{err:>17} {m:>8}")
    return "\n".join(lines)


def main(args) -> int:
    import sys

    from fastimp.imp import run
    from fastimp.imp.lock import describe_holder
    config = _config(args)
    if args.dry_run:
        return dry_run(config)

    def on_wait(holder):
        print(f"fastimp imp: waiting for {describe_holder(holder)} to finish ...",
              file=sys.stderr, flush=True)
    result = run(config, args.out, progress=not args.no_progress,
                 checkpoint_every=args.checkpoint_every, eps=args.eps, wait=args.wait,
                 on_wait=on_wait, parallel=args.parallel)
    if result is None:  # a rank that followed rank 0 and cannot see the folder
        return 0
    summary = result.summary(eps=args.eps)
    print(f"\nIMP run folder: {result.dir}")
    print(format_summary(summary))
    if summary and summary[0]["eps"] is None:
        print("matching: n/a with one replicate (eps = std of the dense replicates); pass --eps")
    print(f"report: fastimp report {result.dir}")
    return 0


def dry_run(config) -> int:
    """``--dry-run``: the plan of the run for this world size and for 1, 2, 4 and 8 devices."""
    from fastimp import distributed
    from fastimp.imp.estimate import estimate, format_estimate, format_table
    world = distributed.world_size() if distributed.active() else \
        int(__import__("os").environ.get("WORLD_SIZE", "1"))
    print(format_estimate(estimate(config, world), config))
    print()
    print(format_table(config, sorted({1, 2, 4, 8, world})))
    print("(dry run: nothing was trained or written)")
    return 0
