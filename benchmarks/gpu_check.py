"""``python -m benchmarks.gpu_check --out DIR [--dry-run] [--only STEP ...] [--budget S]``

One command that verifies every kernel on a GPU and times it, for a short GPU lease: no network,
the machine's own torch/triton. Steps, by priority (correctness first, then timings; each with
its own timeout, its result written to ``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` as soon
as it finishes):

  wheels        install ``.whl/*.whl`` (mnist1d, pyhessian: ``make gpu-wheels`` fetches them)
  environment   card, driver, CUDA, torch, triton, Python, commit
  build         build fastimp._C for the local card only (TORCH_CUDA_ARCH_LIST=<its sm>)
  kernels       every kernel backend vs its reference: edge sizes, misaligned views, dtypes,
                lr tensors, CUDA-graph replay, > 2^31 elements (benchmarks/kernel_checks.py)
  batched_equality  judged: a few float64 steps of packed ResNet-20 runs against separate ones,
                and the CUDA-graph program against the eager one (bench_batched.equality_check)
  pytest_gpu    the gpu-marked tests (opcheck of the cuda/triton ops, a compiled MaskedSGD step)
  resnet_steps  ResNet-18/50 MaskedSGD steps vs torch's fused SGD + mask; host time; CUDA graphs
  bandwidth     masked SGD at 2^28 elements (fp32, bf16) as a share of copy_
  batched       run-steps/s of 12 ResNet-20 runs: eager loop, packed, + CUDA graph, fp32/bf16
  histogram     histogram atomics: Gaussian vs uniform keys, relaxed vs acq_rel; whole threshold
  threshold     prune_magnitude vs global_unstructured and cat + kthvalue (ResNet-18/50)
  weight_points weight_points vs addmm and the reference
  landscape     the landscape slice benchmark (quick sizes)
  hessian       fastimp.hessian vs PyHessian (quick sizes)
  compile_check registers and spills of every Triton variant on the local arch, and the CUDA ones

``--dry-run`` runs the same plan on the CPU with tiny sizes (Triton through its interpreter, no
build, CUDA graphs emulated): CI runs it, so the command is known to work before a GPU session
needs it. Python steps run in forked children (the parent never touches CUDA), so a hung kernel
costs its timeout only. The steps' timeouts add up to less than ``--budget`` (default 470 s: 8
minutes on an H100/H200; a dry run gets 4x both); a step the budget leaves no time for is
reported as ``budget``, the report says INCOMPLETE and the exit status is 3 (1: a step failed).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ctx:
    out: Path
    dry: bool
    device: str
    env: Dict[str, str] = field(default_factory=dict)  # environment for subprocesses
    info: Dict[str, object] = field(default_factory=dict)  # what the environment step found


@dataclass
class Step:
    name: str
    timeout: float  # seconds on a GPU (a dry run gets more: the CPU is slower)
    fn: Callable[[Ctx], Dict]
    child: bool = True  # run in a forked child (Python work) or in this process (subprocesses)


# -- helpers ------------------------------------------------------------------------------------
def _sh(cmd: List[str], timeout: float, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:] if text else ""


def _tables_md(tables) -> str:
    return "\n\n".join(t.render().replace("## ", "#### ", 1) for t in tables)


def _prepare_child(ctx: Ctx) -> None:
    """In a child: on the CPU the interpreter for Triton and one torch thread (tiny sizes: more
    threads only spin against each other), quiet numpy warnings."""
    if ctx.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        torch.set_num_threads(1)
    os.environ.update(ctx.env)
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)


# -- steps --------------------------------------------------------------------------------------
def step_wheels(ctx: Ctx) -> Dict:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return {"status": "skipped", "summary": "no .whl/*.whl (run `make gpu-wheels` where pip "
                                                "works, and carry .whl)"}
    site = Path(os.environ.get("FASTIMP_GPU_SITE", "/tmp/fastimp-gpu-site"))
    proc = _sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)] + wheels,
               timeout=60)
    if proc.returncode != 0:
        return {"status": "failed", "summary": "pip install of .whl failed",
                "log": _tail(proc.stderr)}
    sys.path.insert(0, str(site))
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {"status": "ok", "summary": ", ".join(Path(w).name.split("-")[0] for w in wheels)}


def step_environment(ctx: Ctx) -> Dict:
    import torch
    info: Dict[str, object] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cpu_cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(), "device": ctx.device}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "missing"
    commit = _sh(["git", "rev-parse", "--short", "HEAD"], 10)
    dirty = _sh(["git", "status", "--porcelain", "--untracked-files=no"], 10)
    info["commit"] = (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip()
                                                             else "")
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count)
        smi = shutil.which("nvidia-smi")
        if smi:
            q = _sh([smi, "--query-gpu=driver_version,clocks.sm,clocks.mem",
                     "--format=csv,noheader"], 20)
            info["driver"] = q.stdout.strip().split(",")[0] if q.returncode == 0 else "?"
    else:
        info.update(card=f"no GPU ({platform.processor() or platform.machine()})",
                    capability="-", driver="-")
    nvcc = shutil.which("nvcc")
    if nvcc:
        v = _sh([nvcc, "--version"], 20).stdout
        info["nvcc"] = (re.findall(r"release ([\d.]+)", v) or ["?"])[0]
    return {"status": "ok", "summary": f"{info['card']}, torch {info['torch']}, "
                                       f"triton {info['triton']}, commit {info['commit']}",
            "data": info}


def step_build(ctx: Ctx) -> Dict:
    cap = str(ctx.info.get("capability", ""))
    env = dict(os.environ, **ctx.env)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    check = [sys.executable, "-c", "from fastimp import _ext; assert _ext._C is not None, "
             "_ext.error; print('cuda kernels:', _ext.cuda_compiled())"]
    if ctx.dry:
        proc = _sh(check, 120, env=env)
        return {"status": "ok" if proc.returncode == 0 else "failed",
                "summary": "dry run: not built; " + (proc.stdout.strip() or _tail(proc.stderr, 300)),
                "data": {"would_run": f"TORCH_CUDA_ARCH_LIST=<sm> FASTIMP_BUILD_CUDA=1 "
                                      f"{' '.join(cmd)}"}}
    env.update(TORCH_CUDA_ARCH_LIST=cap, FASTIMP_BUILD_CUDA="1",
               MAX_JOBS=str(os.cpu_count() or 4))
    for so in glob.glob(str(ROOT / "fastimp" / "_C*.so")):
        os.unlink(so)  # a build for another Python or torch must not be picked up
    t0 = time.time()
    proc = _sh(cmd, ctx.info.get("_timeout", 300), env=env)
    built = time.time() - t0
    ok = _sh(check, 120, env=env)
    status = "ok" if proc.returncode == 0 and ok.returncode == 0 and "True" in ok.stdout \
        else "failed"
    return {"status": status, "summary": f"sm_{cap.replace('.', '')} in {built:.0f} s; "
                                         f"{ok.stdout.strip() or _tail(ok.stderr, 300)}",
            "log": _tail(proc.stderr) if status != "ok" else ""}


def step_kernels(ctx: Ctx) -> Dict:
    from benchmarks import kernel_checks
    res = kernel_checks.run(ctx.device, ctx.dry)
    n = len(res["checks"])
    return {"status": "ok" if res["failed"] == 0 else "failed",
            "summary": f"{n - res['failed']}/{n} checks pass", "markdown":
                kernel_checks.markdown(res), "data": res}


def step_pytest(ctx: Ctx) -> Dict:
    env = dict(os.environ, **ctx.env)
    proc = _sh([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                "tests"], ctx.info.get("_timeout", 240), env=env)
    last = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    summary = last[-1] if last else _tail(proc.stderr, 200)
    ok = proc.returncode in (0, 5)  # 5: nothing collected
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return {"status": "ok" if ok else "failed", "summary": summary,
            "markdown": "\n".join(f"- {f}" for f in fails[:30]),
            "log": "" if ok else _tail(proc.stdout, 4000)}


def step_bandwidth(ctx: Ctx) -> Dict:
    from benchmarks.bench_masked_sgd import bandwidth_table
    t = bandwidth_table(ctx.device, 2 ** 16 if ctx.dry else 2 ** 28, repeat=3 if ctx.dry else 20)
    shares = [f"{r.case.split(',')[0]} {r.impl.split('(')[-1].rstrip(')')} "
              f"{r.extra.split('= ')[-1].split()[0]}" for r in t.rows if "of copy_" in r.extra]
    return {"status": "ok", "summary": "share of copy_: " + (", ".join(shares) or "no backend"),
            "markdown": _tables_md([t])}


def _fastest(table, prefix: str, case_filter: str = "") -> str:
    rows = [r for r in table.rows if r.impl.startswith(prefix) and case_filter in r.case
            and ":" not in r.impl and r.seconds == r.seconds]
    if not rows:
        return "n/a"
    order = sorted(rows, key=lambda r: r.seconds)
    return " < ".join(f"{r.impl[len(prefix):].strip(' ()')}" for r in order)


def step_resnet(ctx: Ctx) -> Dict:
    from benchmarks import bench_masked_sgd as b
    b._backend._load_ops()
    models = ["tiny"] if ctx.dry else ["resnet18", "resnet50"]
    t = b._table(ctx.device, models, 3 if ctx.dry else 20,
                 f"masked SGD step (momentum 0.9, wd 5e-4, fp32) on {ctx.device}")
    order = _fastest(t, "fastimp MaskedSGD", models[-1])
    return {"status": "ok", "summary": f"{models[-1]} eager, fastest first: {order}",
            "markdown": _tables_md([t])}


def step_histogram(ctx: Ctx) -> Dict:
    from benchmarks.bench_pruning import histogram_table
    t = histogram_table(ctx.device, 2 ** 12 if ctx.dry else 2 ** 26, repeat=3 if ctx.dry else 20)
    return {"status": "ok", "summary": "whole threshold on Gaussian weights, fastest first: " +
            _fastest(t, "whole threshold", "Gaussian"), "markdown": _tables_md([t])}


def step_threshold(ctx: Ctx) -> Dict:
    from benchmarks.bench_pruning import tables
    ts = tables(ctx.device, True, models=("tiny",) if ctx.dry else ("resnet18", "resnet50"))
    rows = [r for r in ts[0].rows if r.impl == "fastimp.prune_magnitude"]
    return {"status": "ok", "summary": "; ".join(
        f"{r.case}: {ts[0].speedup(r):.2f}x vs global_unstructured" for r in rows[-2:]),
        "markdown": _tables_md(ts)}


def step_weight_points(ctx: Ctx) -> Dict:
    from benchmarks.bench_weight_points import CASES, table
    t = table(ctx.device, [("tiny", 5000, 2, 3)] if ctx.dry else CASES, 3 if ctx.dry else 10)
    fast = [r for r in t.rows if r.impl.startswith("fastimp")]
    return {"status": "ok", "summary": "; ".join(f"{r.case} {r.impl[8:]}: {r.extra}"
                                                  for r in fast[-2:]),
            "markdown": _tables_md([t])}


def step_landscape(ctx: Ctx) -> Dict:
    from benchmarks import bench_landscape as bl
    if ctx.dry:
        import fastimp.models as models
        from benchmarks.common import Table
        t = Table(f"landscape (dry run: MNIST-1D MLP, 3x3 slice, 100 images, {ctx.device})")
        bl._case(t, "MNIST-1D MLP", models.get("mnist1d_mlp", seed=0), (40,), 100, "slice", 3,
                 ctx.device, 1)
        ts = [t]
    else:
        ts = bl.tables(ctx.device, quick=True)
    return {"status": "ok", "summary": f"{len(ts[0].rows)} rows", "markdown": _tables_md(ts)}


def step_hessian(ctx: Ctx) -> Dict:
    try:
        import pyhessian  # noqa: F401
        note = "with PyHessian"
    except ImportError:
        note = "PyHessian not installed: fastimp only"
    if ctx.dry:
        import torch
        from torch import nn
        from benchmarks.common import Table
        from fastimp.hessian import Hessian
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        data = [(torch.randn(64, 8), torch.randint(0, 3, (64,)))]
        t = Table(f"Hessian (dry run: tiny MLP, {ctx.device})")
        t0 = time.perf_counter()
        vals, _ = Hessian(model, nn.CrossEntropyLoss(), data, seed=0).eigenvalues(top_n=1)
        t.add("top-1 eigenvalue", "fastimp Lanczos", time.perf_counter() - t0,
              extra=f"{vals[0]:.4g}")
        ts = [t]
    else:
        from benchmarks.bench_hessian import tables
        ts = tables(ctx.device, quick=True)
    return {"status": "ok", "summary": note, "markdown": _tables_md(ts)}


def step_batched_equality(ctx: Ctx) -> Dict:
    from benchmarks.bench_batched import equality_check
    res = equality_check(ctx.device, **(dict(runs=2, batch_size=4, side=8, width=4)
                                        if ctx.dry else {}))
    tol = res["tolerance"]
    return {"status": "ok" if res["ok"] else "failed",
            "summary": f"{res['steps']} float64 steps of {res['runs']} runs: packed vs separate "
                       f"{res['packed_vs_separate']:.1e} (<= {tol['packed_vs_separate']:g}), "
                       f"graph vs eager {res['graph_vs_eager']:.1e} "
                       f"(<= {tol['graph_vs_eager']:g}); pruned weights 0: "
                       f"{res['pruned_weights_zero']}; graph captured: {res['graph_captured']}",
            "data": res}


def step_batched(ctx: Ctx) -> Dict:
    from benchmarks.bench_batched import gpu_check, gpu_table
    res = gpu_check(ctx.device, **(dict(runs=2, batch_size=4, steps=1) if ctx.dry else {}))
    return {"status": "ok", "summary": f"best packed {res['speedup_vs_eager_loop']:.2f}x the "
                                       f"eager loop; a 62,400-step training "
                                       f"{res['full_training_seconds_per_run']:.0f} s per run "
                                       f"amortised; graphs captured: {res['graphs_captured']}",
            "markdown": _tables_md([gpu_table(res)]), "data": res}


def step_compile_check(ctx: Ctx) -> Dict:
    env = {k: v for k, v in dict(os.environ, **ctx.env).items() if k != "TRITON_INTERPRET"}
    arch = str(ctx.info.get("capability", "9.0")).replace(".", "") if not ctx.dry else "90"
    path = ctx.out / ".compile_check.json"
    proc = _sh([sys.executable, "-m", "fastimp.kernels.compile_check", "--arch", arch,
                "--json", str(path), "--markdown", "--cuda-so", "--jobs",
                str(max(1, min(8, (os.cpu_count() or 2) - 1)))], ctx.info.get("_timeout", 120),
               env=env)
    try:
        rows = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        rows = []
    bad = [r for r in rows if not r["ok"]]
    return {"status": "ok" if proc.returncode == 0 and rows else "failed",
            "summary": f"{len(rows) - len(bad)}/{len(rows)} kernels compile without spills "
                       f"(sm_{arch})", "markdown": proc.stdout.strip(),
            "log": _tail(proc.stderr) if proc.returncode else ""}


# By priority: what the GPU must confirm first (the build, the kernels' results, the batched
# program's equality, the gpu tests), then timings, then the register counts the CPU already has.
# Timeouts are what each step may take on an H100/H200 (typical: well under half); they add up
# to less than DEFAULT_BUDGET, so no step is left without time unless one overruns.
STEPS = [
    Step("wheels", 10, step_wheels, child=False),
    Step("environment", 10, step_environment),
    Step("build", 135, step_build, child=False),
    Step("kernels", 70, step_kernels),
    Step("batched_equality", 25, step_batched_equality),
    Step("pytest_gpu", 70, step_pytest, child=False),
    Step("resnet_steps", 20, step_resnet),
    Step("bandwidth", 12, step_bandwidth),
    Step("batched", 25, step_batched),
    Step("histogram", 8, step_histogram),
    Step("threshold", 12, step_threshold),
    Step("weight_points", 8, step_weight_points),
    Step("landscape", 12, step_landscape),
    Step("hessian", 15, step_hessian),
    Step("compile_check", 20, step_compile_check, child=False),
]
DEFAULT_BUDGET = 470.0  # seconds: 8 minutes on an H100/H200, less a margin for the lease
DRY_FACTOR = 4          # a dry run's timeouts and budget (the CPU and the interpreter are slower)
STEP_OVERHEAD = 1.0     # seconds per step outside its timeout (fork, report writing)


def planned_seconds(steps=None) -> float:
    """The plan's worst case on a GPU: every step at its timeout."""
    steps = STEPS if steps is None else steps
    return sum(s.timeout + STEP_OVERHEAD for s in steps)


# -- running ------------------------------------------------------------------------------------
def _child_main(step: Step, ctx: Ctx, conn) -> None:
    try:
        _prepare_child(ctx)
        res = step.fn(ctx)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        res = {"status": "failed", "summary": f"{type(exc).__name__}: {exc}"[:300],
               "log": _tail(traceback.format_exc(), 3000)}
    conn.send(res)
    conn.close()


def run_step(step: Step, ctx: Ctx, timeout: float) -> Dict:
    ctx.info["_timeout"] = timeout
    if not step.child:
        try:
            return step.fn(ctx)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "summary": f"over its {timeout:.0f} s"}
        except Exception as exc:  # noqa: BLE001
            return {"status": "failed", "summary": f"{type(exc).__name__}: {exc}"[:300],
                    "log": _tail(traceback.format_exc(), 3000)}
    fork = mp.get_context("fork")
    recv, send = fork.Pipe(duplex=False)
    proc = fork.Process(target=_child_main, args=(step, ctx, send), daemon=True)
    proc.start()
    send.close()
    res = None
    if recv.poll(timeout):
        try:
            res = recv.recv()
        except EOFError:
            res = None
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return res or {"status": "timeout", "summary": f"over its {timeout:.0f} s: killed"}
    return res or {"status": "failed", "summary": f"the child died (exit code {proc.exitcode})"}


def report_markdown(report: Dict) -> str:
    info = report["environment"]
    lines = [f"### GPU check — {info.get('card', '?')} — {info.get('date', '?')} — commit "
             f"{info.get('commit', '?')}", "",
             f"Machine: {info.get('card', '?')} (sm {info.get('capability', '?')}, "
             f"{info.get('memory_gib', '?')} GiB, {info.get('multiprocessors', '?')} SMs), driver "
             f"{info.get('driver', '?')}, CUDA runtime {info.get('cuda_runtime', '?')}, nvcc "
             f"{info.get('nvcc', '?')}, torch {info.get('torch', '?')}, triton "
             f"{info.get('triton', '?')}, Python {info.get('python', '?')}, "
             f"{info.get('cpu_cores', '?')} CPU cores.", "",
             f"Command: `{report['command']}`{' (dry run: CPU, tiny sizes)' if report['dry_run'] else ''}"
             f"; {report['seconds']:.0f} s in all.", ""]
    if report.get("incomplete"):
        lines += [f"**INCOMPLETE**: no time was left for {', '.join(report['incomplete'])}.", ""]
    lines += ["| step | status | seconds | summary |", "|---|---|---:|---|"]
    for s in report["steps"]:
        summary = str(s.get("summary", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {summary} |")
    for s in report["steps"]:
        if s.get("markdown"):
            lines += ["", f"#### {s['name']}", "", s["markdown"]]
        if s.get("log") and s["status"] != "ok":
            lines += ["", f"<details><summary>{s['name']} log</summary>", "", "```",
                      s["log"], "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_report(report: Dict, out: Path) -> None:
    from fastimp._io import atomic_write, save_json

    def write_md(tmp):
        Path(tmp).write_text(report_markdown(report))
    save_json(report, out / "gpu_report.json")
    atomic_write(out / "gpu_report.md", write_md)


def _have_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return _sh([smi, "-L"], 30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="folder for gpu_report.json / gpu_report.md")
    p.add_argument("--dry-run", action="store_true", help="the same plan on the CPU, tiny sizes")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS],
                   help="run only these steps (environment always runs)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole command (default {DEFAULT_BUDGET:.0f}; "
                        f"{DRY_FACTOR}x with --dry-run)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not _have_gpu():
        print("gpu_check: no GPU here (nvidia-smi -L failed); use --dry-run on a CPU",
              file=sys.stderr)
        return 2
    factor = DRY_FACTOR if args.dry_run else 1
    budget = args.budget or DEFAULT_BUDGET * factor
    ctx = Ctx(out=out, dry=args.dry_run, device="cpu" if args.dry_run else "cuda")
    import torch  # noqa: F401  (imported once here, before forking; CUDA is never touched here)
    start = time.time()
    report: Dict = {"command": " ".join(["python -m benchmarks.gpu_check"] + (argv or sys.argv[1:])),
                    "dry_run": args.dry_run, "environment": {}, "steps": [], "seconds": 0.0}
    for step in STEPS:
        if args.only and step.name not in args.only and step.name != "environment":
            continue
        left = budget - (time.time() - start)
        timeout = min(step.timeout * factor, left - STEP_OVERHEAD)
        t0 = time.time()
        if timeout < min(5.0, step.timeout * factor):
            res = {"status": "budget", "summary": f"not run: {left:.0f} s of the budget left"}
        else:
            print(f"[gpu_check] {step.name} (timeout {timeout:.0f} s) ...", flush=True)
            res = run_step(step, ctx, timeout)
        res = {"name": step.name, "seconds": time.time() - t0, **res}
        if step.name == "environment" and res.get("data"):
            report["environment"] = res["data"]
            ctx.info.update(res["data"])
        report["steps"].append(res)
        report["incomplete"] = [x["name"] for x in report["steps"] if x["status"] == "budget"]
        report["seconds"] = time.time() - start
        write_report(report, out)
        print(f"[gpu_check] {step.name}: {res['status']} ({res['seconds']:.1f} s) "
              f"{res.get('summary', '')}", flush=True)
    bad = [s["name"] for s in report["steps"] if s["status"] in ("failed", "timeout")]
    print(f"[gpu_check] done in {report['seconds']:.0f} s; report: {out / 'gpu_report.md'}"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    print("\n".join(f"  {s['name']:<16} {s['status']:<8} {s['seconds']:6.1f} s  "
                    f"{str(s.get('summary', ''))[:100]}" for s in report["steps"]))
    if report.get("incomplete"):
        print(f"[gpu_check] INCOMPLETE: no time left for {', '.join(report['incomplete'])} "
              f"(budget {budget:.0f} s)")
    return 1 if bad else (3 if report.get("incomplete") else 0)


if __name__ == "__main__":
    raise SystemExit(main())
