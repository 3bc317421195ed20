"""Compile every Triton kernel variant the library can launch for GPU targets, without a GPU.

``python -m fastimp.kernels.compile_check [--arch 80 90] [--json PATH] [--markdown]
[--sweep] [--cuda-so PATH]``

Each variant (the ``variants()`` of every module in :mod:`fastimp.kernels`) goes through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (Triton's bundled ptxas
makes the cubin), and ``cuobjdump --dump-resource-usage`` reads its registers, stack and local
memory (spills). ``--cuda-so`` adds the CUDA kernels compiled into ``fastimp._C`` (sm_80/sm_90).
``--sweep`` compiles the masked SGD kernel over (BLOCK, num_warps) and shows the choice rule.
Exit status 1 when a variant does not compile or spills. Needs Triton's compiler, so it refuses
to run under ``TRITON_INTERPRET=1`` (the tests run it in a subprocess without it).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32


@dataclass
class Report:
    kernel: str
    arch: int
    num_warps: int
    regs: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.local == 0 and self.stack == 0

    def blocks_per_sm(self) -> int:
        """Resident programs per SM allowed by registers (and by the thread and block limits)."""
        threads = 32 * self.num_warps
        if self.regs <= 0:
            return 0
        regs_per_warp = ((self.regs * 32 + 255) // 256) * 256  # allocated per warp, in 256s
        by_regs = (REGS_PER_SM // regs_per_warp) // self.num_warps
        return min(by_regs, MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM)


def cuobjdump() -> Optional[str]:
    """Triton's bundled cuobjdump, else the one on the PATH."""
    try:
        import triton
        here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        if os.path.exists(here):
            return here
    except ImportError:  # pragma: no cover
        pass
    return shutil.which("cuobjdump")


_FN = re.compile(r"Function (\S+):")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = sm_(\d+)")


def resource_usage(path: str) -> List[tuple]:
    """(arch or None, function, regs, stack, shared, local) for every kernel in a cubin or .so."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's bundled one or the PATH)")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                         check=True).stdout
    rows, fn, arch = [], None, None
    for line in out.splitlines():
        if m := _ARCH.search(line):
            arch = int(m.group(1))
        if m := _FN.search(line):
            fn = m.group(1)
        elif (m := _RES.search(line)) and fn is not None:
            regs, stack, shared, local = map(int, m.groups())
            rows.append((arch, fn, regs, stack, shared, local))
            fn = None
    return rows


def all_variants(sweep_config=None) -> Iterable[tuple]:
    from fastimp.kernels import magnitude_threshold, masked_sgd, weight_points
    if sweep_config is not None:
        yield from masked_sgd.variants(sweep_config)
        return
    yield from masked_sgd.variants()
    yield from magnitude_threshold.variants()
    yield from weight_points.variants()


def compile_one(variant, arch: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, fn, signature, constexprs, aligned, warps = variant
    rep = Report(name, arch, warps)
    try:
        sig = dict(signature)
        for k in constexprs:
            sig[k] = "constexpr"
        names = list(fn.arg_names)
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned if k in names}
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            (_, _, rep.regs, rep.stack, rep.shared, rep.local), = resource_usage(f.name)
    except Exception as exc:  # noqa: BLE001 - reported, and the check fails
        rep.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return rep


def _compile_index(i: int, arch: int) -> Report:
    return compile_one(list(all_variants())[i], arch)


def cuda_so_reports(path: str) -> List[Report]:
    """The CUDA kernels of the compiled extension (block size from the source: see the .cu)."""
    threads = {"masked_sgd_kernel": 512}
    out = []
    for arch, fn, regs, stack, shared, local in resource_usage(path):
        short = re.sub(r"_ZN7fastimp\d+_GLOBAL__N__\w+?_cu_\w{8}\d+", "", fn)
        base = next((k for k in ("masked_sgd_kernel", "histogram_kernel", "write_simple_kernel",
                                 "count_equal_kernel", "write_ranked_kernel") if k in fn), fn)
        dtype = next((t for t, key in (("float16", "6__half"), ("bfloat16", "13__nv_bfloat16"),
                                       ("float64", "IdE"), ("float32", "IfE")) if key in fn), "")
        label = f"CUDA {base}{' ' + dtype if dtype else ''}"
        del short
        out.append(Report(label, arch or 0, threads.get(base, 256) // 32, regs, stack, local,
                          shared))
    return out


def markdown(reports: List[Report]) -> str:
    lines = ["| kernel | arch | warps | registers | stack B | spill (local) B | shared B | "
             "blocks/SM by registers | ok |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in reports:
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.num_warps} | {r.regs} | {r.stack} | "
                     f"{r.local} | {r.shared} | {r.blocks_per_sm()} | "
                     f"{'yes' if r.ok else 'NO ' + r.error} |")
    return "\n".join(lines)


def choose(reports: List[Report], blocks: Dict[tuple, int]) -> Report:
    """The masked SGD config with the most elements resident per SM (BLOCK x programs/SM), no
    spills; ties: the smaller BLOCK (less work lost in a tensor's last partial chunk)."""
    ok = [r for r in reports if r.ok]
    return max(ok, key=lambda r: (blocks[(r.kernel, r.num_warps)] * r.blocks_per_sm(),
                                  -blocks[(r.kernel, r.num_warps)]))


def sweep(archs: List[int]) -> tuple:
    """Registers of the fp32/bf16 momentum masked SGD kernel over (BLOCK, num_warps)."""
    reports, blocks = [], {}
    for block in (1024, 2048, 4096):
        for warps in (4, 8):
            for v in all_variants((block, warps)):
                if "momentum" not in v[0] or "no momentum" in v[0] or "unaligned" in v[0] or \
                        ("float32" not in v[0] and "bfloat16" not in v[0]):
                    continue
                v = (f"{v[0]} BLOCK {block}",) + v[1:]
                blocks[(v[0], warps)] = block
                for arch in archs:
                    reports.append(compile_one(v, arch))
    return reports, blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastimp.kernels.compile_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", help="write the reports here")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--sweep", action="store_true", help="masked SGD over (BLOCK, num_warps)")
    p.add_argument("--cuda-so", nargs="?", const="auto",
                   help="also the CUDA kernels of this fastimp._C build ('auto': the one next to "
                        "fastimp)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs Triton's compiler: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if args.sweep:
        reports, blocks = sweep(args.arch)
        print(markdown(reports))
        for arch in args.arch:
            best = choose([r for r in reports if r.arch == arch and "float32" in r.kernel],
                          blocks)
            print(f"\nsm_{arch}: chosen {best.kernel} with {best.num_warps} warps")
        return 0
    variants = list(all_variants())
    jobs = [(i, a) for i in range(len(variants)) for a in args.arch]
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            reports = pool.starmap(_compile_index, jobs)
    else:
        reports = [_compile_index(i, a) for i, a in jobs]
    if args.cuda_so:
        path = args.cuda_so
        if path == "auto":
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            found = glob.glob(os.path.join(here, "_C*.so"))
            path = found[0] if found else None
        if path:
            try:
                reports += cuda_so_reports(path)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"CUDA kernels not read: {exc}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok, "blocks_per_sm": r.blocks_per_sm()}
                       for r in reports], f, indent=1)
    if args.markdown:
        print(markdown(reports))
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(f"FAILED: {r.kernel} sm_{r.arch}: {r.error or f'spills {r.local} B, stack {r.stack} B'}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
