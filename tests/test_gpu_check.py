"""``python -m benchmarks.gpu_check --dry-run``: the GPU session's one command runs its whole plan
on the CPU with tiny sizes, writes a report entry per step, and fails loudly without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out",
                           str(tmp_path)] + args, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1200)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    from benchmarks.gpu_check import STEPS
    proc = _run(["--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [s.name for s in STEPS]
    for name, s in steps.items():
        assert s["status"] in ("ok", "skipped"), (name, s)
    assert steps["kernels"]["status"] == "ok" and steps["kernels"]["data"]["failed"] == 0
    assert len(steps["kernels"]["data"]["checks"]) > 50
    for name in ("environment", "kernels", "batched_equality", "pytest_gpu", "bandwidth",
                 "resnet_steps", "batched", "histogram", "threshold", "weight_points",
                 "landscape", "hessian", "compile_check"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    eq = steps["batched_equality"]["data"]  # the CUDA path of bench_batched, graph emulated
    assert eq["ok"] and eq["graph_captured"]
    assert steps["batched"]["data"]["graphs_captured"]
    assert not report["incomplete"] and "INCOMPLETE" not in proc.stdout
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| step | status | seconds | summary |" in md and "commit" in md
    assert "#### kernels" in md and "| masked_sgd |" in md


def test_the_plan_fits_the_budget_correctness_first():
    """Every step's timeout together fits the default budget (8 minutes on an H100/H200), and
    the steps come by priority: kernel results, then the batched program's equality, then the
    timings."""
    from benchmarks import gpu_check
    assert gpu_check.planned_seconds() <= gpu_check.DEFAULT_BUDGET
    names = [s.name for s in gpu_check.STEPS]
    timings = ["resnet_steps", "bandwidth", "batched", "histogram", "threshold",
               "weight_points", "landscape", "hessian"]
    assert names.index("build") < names.index("kernels") < names.index("batched_equality")
    assert names.index("batched_equality") < min(names.index(t) for t in timings)
    assert names.index("pytest_gpu") < min(names.index(t) for t in timings)


def test_a_step_left_without_budget_makes_the_report_incomplete(tmp_path):
    proc = _run(["--dry-run", "--only", "wheels", "--budget", "1"], tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "INCOMPLETE" in proc.stdout
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["incomplete"] == ["wheels", "environment"]
    assert {s["status"] for s in report["steps"]} == {"budget"}
    assert "**INCOMPLETE**" in (tmp_path / "gpu_report.md").read_text()


def test_without_a_gpu_it_says_to_use_dry_run(tmp_path):
    from benchmarks import gpu_check
    if gpu_check._have_gpu():
        pytest.skip("a GPU is present")
    proc = _run([], tmp_path)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_a_step_that_hangs_is_killed_at_its_timeout(tmp_path):
    from benchmarks import gpu_check
    ctx = gpu_check.Ctx(out=tmp_path, dry=True, device="cpu")

    def hang(ctx):
        import time
        time.sleep(60)

    res = gpu_check.run_step(gpu_check.Step("hang", 1, hang), ctx, timeout=1.0)
    assert res["status"] == "timeout"
    res = gpu_check.run_step(gpu_check.Step("boom", 5, lambda c: 1 / 0), ctx, timeout=5.0)
    assert res["status"] == "failed" and "ZeroDivisionError" in res["summary"]
