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

    @report.register_section(name="test-extra", order=50)
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
    assert text.index("## IMP") < text.index("## Extra section")


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
