"""The ``fastimp`` command. Each subcommand lives in its own module with ``add_parser(sub)``.

Errors are one line (``fastimp CMD: error: ...``, exit status 2; ``FASTIMP_DEBUG=1`` shows the
traceback instead); Ctrl-C is one line saying where it stopped (exit status 130)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

# Subcommand modules, in the order `fastimp --help` lists them.
COMMANDS = ("imp", "report", "paper", "barrier", "plane", "hessian", "prune_scan", "analyses",
            "backends_cmd")
# Commands that write analyses (and retraining branches) into the run folder DIR: they hold its
# lock (fastimp.imp.lock) as `fastimp imp` does, so that two never work on one run at once.
WRITES_INTO_RUN = ("paper", "barrier", "plane", "hessian", "prune-scan", "robustness", "weights",
                   "lrr-rewound")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (``default``
    in the text) or there is none to show (``None``/``False``: the help says what happens)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False \
                or default == argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {default})".strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastimp", description="Iterative Magnitude Pruning and error-landscape analyses.")
    from fastimp import __version__
    parser.add_argument("--version", action="version", version=f"fastimp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"fastimp.cli.{name}").add_parser(sub)
    for name in WRITES_INTO_RUN:
        sub.choices[name].add_argument(
            "--wait", action="store_true",
            help="if another process is working on this run, wait for it to finish (default: "
                 "exit with an error naming it)")
    return parser


def _holding_the_run_lock(args, prog: str) -> int:
    """``args.func(args)`` under DIR's lock: rank 0 holds it, the other ranks of a torchrun job
    stop with its error. A DIR that is not a run folder is left for the command to report."""
    from fastimp.imp import load_run
    from fastimp.imp.lock import describe_holder
    from fastimp.imp.parallel import run_lock
    try:
        folder = load_run(args.dir).dir  # DIR, or the one imp_<hash> inside it
    except (ValueError, OSError):
        return args.func(args)

    def on_wait(holder):
        print(f"{prog}: waiting for {describe_holder(holder)} to finish ...", file=sys.stderr,
              flush=True)
    with run_lock(folder, args.wait, on_wait, "runs"):
        return args.func(args)


def _errors():
    """What a command reports in one line: bad input, files, a busy or inconsistent run."""
    from fastimp.distributed import MaskMismatchError, RankStoppedError
    from fastimp.imp.lock import RunLockedError
    from fastimp.imp.verify import RecomputedDiffersError
    return (ValueError, TypeError, OSError, RunLockedError, RecomputedDiffersError,
            FloatingPointError, MaskMismatchError, RankStoppedError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started (e.g. while torch imports)
        print("fastimp: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE after an option that followed other overrides
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"fastimp {args.command}"
    debug = os.environ.get("FASTIMP_DEBUG", "") not in ("", "0")

    def show(message, category, filename, lineno, file=None, line=None):
        from fastimp.imp.verify import RecomputeWarning
        if issubclass(category, RecomputeWarning):
            print(f"{prog}: {message}", file=sys.stderr)
        else:
            _show(message, category, filename, lineno, file, line)
    _show = warnings.showwarning
    warnings.showwarning = show
    try:
        from fastimp.distributed.launch import run_command
        fn = (lambda: _holding_the_run_lock(args, prog)) if args.command in WRITES_INTO_RUN \
            else (lambda: args.func(args))
        return int(run_command(args.command, fn) or 0)
    except KeyboardInterrupt as exc:
        print(f"{prog}: {_one_line(exc) if str(exc) else 'interrupted (Ctrl-C)'}",
              file=sys.stderr)
        return 130
    except _errors() as exc:
        if debug:
            raise
        from fastimp.distributed import RankStoppedError
        if not (isinstance(exc, RankStoppedError) and os.environ.get("RANK", "0") != "0"):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)  # else rank 0 said it
        return 2
    finally:
        warnings.showwarning = _show
