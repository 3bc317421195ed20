"""`fastimp imp` and `fastimp report` end to end on a tiny MNIST-1D run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["train.steps=20", "train.batch_size=64", "train.milestones=[10,15]",
        "model_kwargs={\"channels\":4}", "replicates=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROOT = Path(__file__).resolve().parents[1]


def _fastimp(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastimp", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_imp_and_report_commands(tmp_path):
    out = tmp_path / "out"
    p = _fastimp("imp", "--preset", "mnist1d", "--out", str(out), "--levels", "2",
                 "--no-progress", "--rewind-step", "0", "5", *TINY)
    assert p.returncode == 0, p.stderr
    runs = list(out.glob("imp_*"))
    assert len(runs) == 1
    assert "test error" in p.stdout and "matching" in p.stdout and str(runs[0]) in p.stdout
    results = json.loads((runs[0] / "results.json").read_text())
    assert {(r["rewind_step"], r["replicate"], r["level"]) for r in results} == \
        {(t, r, L) for t in (0, 5) for r in (0, 1) for L in (0, 1, 2)}
    cfg = json.loads((runs[0] / "config.json").read_text())
    assert cfg["train"]["steps"] == 20 and cfg["model_kwargs"] == {"channels": 4}

    from fastimp.cli import main
    assert main(["report", str(out)]) == 0
    report = runs[0] / "report"
    md = (report / "report.md").read_text()
    assert "| rewind step | level |" in md and "imp_error.png" in md
    for png in ("imp_error.png", "imp_projection.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_in_process_resume_and_errors(tmp_path, capsys):
    from fastimp.cli import main
    args = ["imp", "--preset", "mnist1d", "--out", str(tmp_path), "--levels", "1",
            "--no-progress", "--strategy", "lrr", *TINY, "replicates=1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "n/a" in first and "--eps" in first  # one replicate: matching needs an explicit eps
    assert main(args + ["--eps", "0.05"]) == 0  # rerun: finished levels are skipped
    assert "yes" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert main(["imp", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown name" in capsys.readouterr().err
    assert main(["imp", "--preset", "mnist1d", "--out", str(tmp_path), "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_sections_are_extensible(tmp_path):
    from fastimp import imp, report
    from fastimp.imp.config import apply_overrides
    from fastimp import presets
    cfg = apply_overrides(presets.get("mnist1d"), TINY + ["levels=1", "replicates=1"])
    run = imp.run(cfg, tmp_path, progress=False)
    seen = []

    @report.register_section(name="test-extra", order=150)
    def extra(r, report_dir):
        seen.append(r.dir)
        (report_dir / "extra.txt").write_text("x")
        return "## Extra section"
    try:
        path = report.write_report(run.dir)
    finally:
        report._SECTIONS[:] = [s for s in report._SECTIONS if s.name != "test-extra"]
    text = path.read_text()
    assert seen == [run.dir] and "## Extra section" in text
    assert text.index("## Fig. 11") < text.index("## Extra section")


def test_imp_arguments_become_overrides():
    from fastimp.cli import build_parser
    from fastimp.cli.imp import _config
    parse = build_parser().parse_args
    c = _config(parse(["imp", "--preset", "cifar10-resnet20", "--out", "x", "--rewind-step", "0",
                       "2000it", "train.lr=0.05", "--seeds", "3", "5", "--strategy", "lrr",
                       "--levels", "4", "--pruning", "random"]))
    assert (c.rewind_steps, c.replicate_seeds, c.train.lr, c.strategy, c.levels, c.pruning) == \
        ([0, 2000], [3, 5], 0.05, "lrr", 4, "random")
    assert c.train.total_steps(390) == 62400  # the rest of the preset is kept
    c = _config(parse(["imp", "--preset", "mnist1d", "--out", "x", "--replicates", "5"]))
    assert c.replicate_seeds == [0, 1, 2, 3, 4]


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from fastimp.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings or a.dest}: no help")
            elif a.option_strings and not a.required and a.default is not False:
                helptext = p._get_formatter()._expand_help(a)
                if "default" not in helptext.lower():
                    missing.append(f"{name} {a.option_strings}: default not shown")
        assert "(default: " in text or name == "backends"
    assert missing == []
    imp = sub.choices["imp"].format_help()
    for opt in ("--pruning", "--replicates", "--seeds", "--wait"):
        assert opt in imp
    assert "(default: 500)" in " ".join(imp.split())  # --checkpoint-every


def test_imp_plots_label_every_level(tmp_path):
    """The error plot's log axis names every level's weights remaining; the projection plot's
    level axis has integer ticks only."""
    from fastimp.report import plot_imp_error, plot_projection_distance
    alpha, levels = 0.8, 12
    summary = [{"rewind_step": 0, "level": L, "weights_remaining": alpha ** L,
                "test_error": 0.1 + 0.01 * L, "test_error_std": None, "eps": None,
                "dense_error": 0.1} for L in range(levels + 1)]
    fig = plot_imp_error(summary)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"{100 * alpha ** L:.3g}" for L in range(levels + 1)]
    assert labels[:4] == ["100", "80", "64", "51.2"]
    results = [{"rewind_step": 0, "replicate": 0, "level": L, "projection_distance": 1.0 / (L + 1)}
               for L in range(3)]
    fig = plot_projection_distance(results)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_plane_figure_says_what_it_shows():
    import numpy as np

    from fastimp.landscape.figures import plot_plane
    g = np.linspace(-1, 2, 9)
    err = (np.add.outer(g ** 2, g ** 2) / 10).tolist()
    res = {"kind": "imp", "level": 3, "rewind_step": 0, "xs": g.tolist(), "ys": g.tolist(),
           "error": err, "points": [[0, 0], [1, 0], [1, 0.5]], "matching_error": 0.2,
           "labels": ["w(L)", "m(L+1)⊙w(L)", "w(L+1)"]}
    fig = plot_plane(res, "imp")
    ax = fig.axes[0]
    title = ax.get_title()
    assert "3 → 4" in title and "plane_" not in title
    assert "w(3) → m(4)⊙w(3)" in ax.get_xlabel() and "w(4)" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("matching: error = 20%") for t in legend)
    assert "w(3): level-3 solution" in legend and "w(4): level-4 solution" in legend
    assert "axial subspace of m(4)" in legend
    res.update(kind="pruning", ratio=0.2, labels=["w(L)", "magnitude", "random"])
    ax = plot_plane(res, "pruning").axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "magnitude pruning 20% of w(3)" in legend and "random pruning 20% of w(3)" in legend


def test_hessian_forward_mode_raises_no_future_warning():
    """torch's first forward-mode AD call warns about torch.jit.script; `fastimp hessian` must not
    pass it on (a fresh process: the warning comes once per process)."""
    code = ("import torch; from torch import nn; import torch.nn.functional as F\n"
            "from fastimp.hessian import HVPOperator\n"
            "torch.manual_seed(0); m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))\n"
            "x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))\n"
            "op = HVPOperator(m, F.cross_entropy, (x, y), method='forward-over-reverse')\n"
            "print(op.matvec(torch.randn(2, op.D_A)).shape)\n")
    p = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and "FutureWarning" not in p.stderr, p.stderr


INTERRUPT_AT_TORCH_IMPORT = """
import builtins, os, runpy, signal, sys
real = builtins.__import__
def hook(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while torch imports
    return real(name, *args, **kwargs)
builtins.__import__ = hook
sys.argv = ["fastimp", "backends"]
runpy.run_module("fastimp", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_starting_is_one_line_and_exit_130():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH_IMPORT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == "fastimp: interrupted (Ctrl-C)", res.stderr
