"""``python -m benchmarks [--only NAME] [--device cpu|cuda] [--quick]``: ratio tables of fastimp
against the baselines users have today, measured side by side in one run.

Each module ``benchmarks/bench_<name>.py`` exposes ``tables(device, quick) -> list[Table]``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import pkgutil
import subprocess

import torch

import benchmarks
from benchmarks.common import machine


def main() -> int:
    mods = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_"))
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", nargs="*", choices=mods, help="run only these benchmark modules")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    args = p.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"# fastimp benchmarks — {datetime.date.today()} — commit {commit}\n")
    print(f"machine: {machine()}; device: {args.device}\n")
    for name in args.only or mods:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        for table in module.tables(args.device, args.quick):
            print(table.render())
            print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
