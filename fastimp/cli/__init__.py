"""The ``fastimp`` command. Each subcommand lives in its own module with ``add_parser(sub)``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Subcommand modules, in the order `fastimp --help` lists them.
COMMANDS = ("imp", "report", "barrier", "plane", "hessian", "prune_scan", "backends_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastimp", description="Iterative Magnitude Pruning and error-landscape analyses.")
    from fastimp import __version__
    parser.add_argument("--version", action="version", version=f"fastimp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fastimp.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fastimp.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastimp {args.command}: error: {exc}", file=sys.stderr)
        return 2
