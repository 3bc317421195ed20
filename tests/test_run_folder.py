"""Run folders users can trust (issue 12): fault injection over one finished tiny MNIST-1D run
(each bad file ends recomputed or in a one-line error naming it), rejected commands that leave
the folder byte-identical, the run-folder lock, stale temp files, the umask and Ctrl-C."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastimp import imp
from fastimp.cli import main
from fastimp.imp import load_run
from fastimp.imp.lock import RunLock, RunLockedError, read_holder
from fastimp.imp.verify import CorruptFileError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
# LRR: level L + 1 starts from w^(L), so a recomputed solution is checked too
ARGS = ["--preset", "mnist1d", "--levels", "2", "--strategy", "lrr", "--rewind-step", "0", "3",
        "--no-progress", "train.steps=20", "train.batch_size=64", "train.milestones=[10,15]",
        'model_kwargs={"channels":4}', "replicates=1"]


def _imp(out, *extra):
    return main(["imp", "--out", str(out), *ARGS, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run for the whole module: (OUT, run folder). Tests copy it, never edit it."""
    out = tmp_path_factory.mktemp("finished")
    assert _imp(out) == 0
    (run_dir,) = out.glob("imp_*")
    return out, run_dir


@pytest.fixture
def copy(finished, tmp_path):
    """A fresh copy of the finished run: (OUT, run folder)."""
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out, out / finished[1].name


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip(path):
    """Flip a byte in the middle of the largest tensor's data (torch.load alone would not notice)."""
    import struct
    import zipfile
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(err, name):
    lines = [l for l in err.strip().splitlines() if "error" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0], err
    return lines[0]


# ------------------------------------------------------------------------- fault injection
L1 = Path("seed_0", "rewind_3", "level_1")
FAULTS = [  # (file, damage): rerunning the same command recomputes it bit-identically
    (L1 / "solution.pt", _truncate),
    (L1 / "solution.pt", _flip),
    (L1 / "losses.pt", _truncate),
    (L1 / "stats.json", _truncate),
    (Path("seed_0", "rewind_3", "level_2", "mask.pt"), _flip),
    (Path("seed_0", "rewind_3", "level_0", "mask.pt"), _truncate),
    (Path("seed_0", "rewind_3", "rewind_state.pt"), _truncate),
    (Path("seed_0", "init.pt"), _flip),
    (Path("results.json"), _truncate),
    (Path("summary.json"), _truncate),
]


@pytest.mark.parametrize("name,damage", FAULTS, ids=[f"{p}-{d.__name__[1:]}" for p, d in FAULTS])
def test_bad_file_is_recomputed_on_rerun(finished, copy, capsys, name, damage):
    ref = load_run(finished[1])
    out, folder = copy
    damage(folder / name)
    assert _imp(out) == 0
    err = capsys.readouterr().err
    if name.suffix == ".pt" or name.name == "stats.json":
        assert str(folder / name) in err  # said what it recomputes
    run = load_run(folder)
    for tau in (0, 3):
        assert run.levels(tau) == [0, 1, 2]
        for L in (0, 1, 2):
            assert _states_equal(run.solution(L, tau), ref.solution(L, tau))
            assert run.mask(L, tau) == ref.mask(L, tau)
            assert torch.equal(run.losses(L, tau), ref.losses(L, tau))
            assert run.stats(L, tau)["test_error"] == ref.stats(L, tau)["test_error"]
        assert _states_equal(run.rewind_state(tau), ref.rewind_state(tau))
    assert _states_equal(torch.load(folder / "seed_0" / "init.pt"), ref.rewind_state(0))
    def results(d):
        return [{k: v for k, v in r.items() if k != "seconds"}
                for r in json.loads((d / "results.json").read_text())]
    assert results(folder) == results(finished[1])
    assert (folder / "summary.json").read_text() == (finished[1] / "summary.json").read_text()


ANALYSES = [  # (file, damage, a command that reads it)
    (L1 / "solution.pt", _flip, ["barrier", "--no-matrix", "--rewind-step", "3"]),
    (L1 / "stats.json", _truncate, ["report"]),
    (Path("seed_0", "rewind_3", "level_2", "mask.pt"), _truncate,
     ["plane", "--level", "1", "--rewind-step", "3", "--grid", "3"]),
    (Path("seed_0", "rewind_0", "rewind_state.pt"), _flip, None),
]


@pytest.mark.parametrize("name,damage,command", ANALYSES,
                         ids=[f"{p}-{d.__name__[1:]}" for p, d, _ in ANALYSES])
def test_analyses_name_a_bad_file_in_one_line(copy, capsys, name, damage, command):
    out, folder = copy
    damage(folder / name)
    run = load_run(folder)
    read = {"solution.pt": lambda: run.solution(1, 3), "stats.json": lambda: run.stats(1, 3),
            "mask.pt": lambda: run.mask(2, 3), "rewind_state.pt": lambda: run.rewind_state(0)}
    with pytest.raises(CorruptFileError, match=name.name):
        read[name.name]()
    if command is not None:
        extra = ["--max-examples", "64"] if command[0] != "report" else []
        assert main([command[0], str(folder), *command[1:], *extra]) == 2
        line = _one_line_error(capsys.readouterr().err, str(folder / name))
        assert "rerun" in line


def test_corrupt_config_is_one_line_and_writes_nothing(copy, capsys):
    out, folder = copy
    _truncate(folder / "config.json")
    before = snapshot(out)
    assert _imp(out) == 2
    line = _one_line_error(capsys.readouterr().err, str(folder / "config.json"))
    assert "rerun" in line and "delete it" in line
    assert snapshot(out) == before
    assert main(["report", str(folder)]) == 2
    _one_line_error(capsys.readouterr().err, "config.json")


def test_corrupt_matching_json_and_checkpoint(copy, capsys):
    out, folder = copy
    _truncate(folder / "matching.json")
    assert main(["report", str(folder)]) == 2
    line = _one_line_error(capsys.readouterr().err, "matching.json")
    assert "--eps" in line
    # a corrupt training checkpoint of an unfinished level is dropped: the level starts over
    ck = folder / "seed_0" / "rewind_0" / "level_3" / "checkpoint.pt"
    ck.write_bytes(b"PK\x03\x04 not really a zip")
    assert _imp(out, "--levels", "3") == 0  # rewrites matching.json too
    err = capsys.readouterr().err
    assert str(ck) in err and "starts over" in err
    run = load_run(folder)
    assert run.levels(0) == [0, 1, 2, 3] and run.eps() is None
    assert main(["report", str(folder)]) == 0


def test_recomputed_result_that_differs_is_refused(copy, capsys, monkeypatch):
    """On a device where training is not bit-reproducible, a recomputed w^(1) that level 2 did not
    start from must not pass silently: the original mask is put back and the error says what to
    delete."""
    from fastimp import training
    out, folder = copy
    _truncate(folder / L1 / "solution.pt")
    mask2 = (folder / L1.parent / "level_2" / "mask.pt").read_bytes()
    real = training.train_batched  # every IMP training goes through it

    def noisy(models, *a, on_run_end=None, **kw):
        def perturbed(i, result):
            with torch.no_grad():
                for p in models[i].parameters():
                    p.mul_(1 + 0.5 * torch.rand_like(p))
            on_run_end(i, result)
        return real(models, *a, on_run_end=perturbed, **kw)
    monkeypatch.setattr(training, "train_batched", noisy)
    assert _imp(out) == 2
    line = _one_line_error(capsys.readouterr().err, "level_2")
    assert "delete" in line and "not bit-reproducible" in line
    assert (folder / L1.parent / "level_2" / "mask.pt").read_bytes() == mask2


# ---------------------------------------------------------------------- rejected commands
@pytest.mark.parametrize("extra,message", [
    (["--rewind-step", "700"], "past the end of training"),
    (["--levels", "10", "pruning_fraction=0.9"], "at most 2 levels"),
    (["model=no_such_model"], "unknown model"),
    (['model_kwargs={"bogus": 1}'], "does not take"),
    (["model_kwargs={bad json"], "model_kwargs"),
    (["dataset=nope"], "nope"),
    (["train.bogus=1"], "train.bogus"),
    (["--eps", "-1"], "eps (--eps)"),
    (["--eps", "nan"], "eps (--eps)"),
])
def test_rejected_command_leaves_the_folder_byte_identical(copy, capsys, extra, message):
    out, folder = copy
    before = snapshot(out)
    entries = sorted(p.name for p in out.iterdir())
    assert _imp(out, *extra) == 2
    _one_line_error(capsys.readouterr().err, message)
    assert sorted(p.name for p in out.iterdir()) == entries  # no orphan imp_<hash> folder
    assert snapshot(out) == before
    assert main(["report", str(out)]) == 0  # still exactly one run


def test_a_plain_rerun_leaves_the_folder_byte_identical(copy):
    """Rerunning the finished command rewrites nothing: config.json keeps "seeds": null."""
    out, folder = copy
    before = snapshot(out)
    assert json.loads(before[f"{folder.name}/config.json"])["seeds"] is None
    assert _imp(out) == 0
    assert snapshot(out) == before


def test_rejected_eps_on_a_fresh_folder_creates_nothing(tmp_path, capsys):
    assert _imp(tmp_path, "--eps", "-1") == 2
    _one_line_error(capsys.readouterr().err, "eps (--eps)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,cause", [
    (['model_kwargs={"channels":-3}'], "channels: expected an int >= 1, got -3"),
    (['model_kwargs={"channels":1.5}'], "channels: expected an int >= 1, got 1.5"),
    (["model=mnist1d_mlp", 'model_kwargs={"hidden":[-1]}'], "hidden: expected a list"),
    (["model=mnist1d_mlp", 'model_kwargs={"hidden":[0]}'], "hidden: expected a list"),
    (["--dry-run", 'model_kwargs={"channels":-3}'], "channels: expected an int >= 1"),
])
def test_a_model_that_cannot_be_built_is_one_line_naming_model_kwargs(tmp_path, capsys, extra,
                                                                      cause):
    assert _imp(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_kwargs" in err and cause in err, err
    assert ("mnist1d_mlp" if "model=mnist1d_mlp" in extra else "mnist1d_conv") in err
    assert list(tmp_path.iterdir()) == []


def test_a_factory_raising_anything_is_one_line_naming_model_kwargs(tmp_path, capsys):
    from fastimp import models

    @models.register("_fails_to_build")
    def _fails(num_classes=10, depth=1):
        raise RuntimeError("depth must be even")
    try:
        assert _imp(tmp_path, "model=_fails_to_build", 'model_kwargs={"depth":3}') == 2
    finally:
        models.registry._FACTORIES.pop("_fails_to_build")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model_kwargs" in err and "_fails_to_build" in err and "depth must be even" in err


def test_one_line_errors_for_bad_paths(copy, tmp_path, capsys):
    out, folder = copy
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["imp", "--out", str(a_file), *ARGS]) == 2
    _one_line_error(capsys.readouterr().err, "is a file")
    assert a_file.read_text() == "x"
    assert main(["report", str(folder), "--out", str(a_file)]) == 2
    _one_line_error(capsys.readouterr().err, "is a file")
    only_config = tmp_path / "empty_run"
    only_config.mkdir()
    shutil.copy(folder / "config.json", only_config / "config.json")
    assert main(["report", str(only_config)]) == 2
    _one_line_error(capsys.readouterr().err, "nothing to report")
    assert not (only_config / "report").exists()


# ------------------------------------------------------------------ lock, temp files, umask
def test_second_process_is_told_who_holds_the_run(copy, capsys):
    out, folder = copy
    with RunLock(folder):
        holder = read_holder(folder)
        assert holder["pid"] == os.getpid()
        before = snapshot(folder)
        assert _imp(out) == 2
        line = _one_line_error(capsys.readouterr().err, f"pid {os.getpid()}")
        assert "in use" in line and "--wait" in line
        assert snapshot(folder) == before
    assert read_holder(folder) is None and (folder / ".lock").read_bytes() == b""


def test_wait_runs_after_the_holder_finishes(copy):
    out, folder = copy
    cfg = load_run(folder).config.replace(levels=3)
    waited, result = threading.Event(), {}

    def second():
        result["run"] = imp.run(cfg, out, progress=False, wait=True,
                                on_wait=lambda holder: waited.set())
    lock = RunLock(folder).acquire()
    t = threading.Thread(target=second)
    t.start()
    try:
        assert waited.wait(timeout=120)
        assert t.is_alive()
        assert not (folder / "seed_0" / "rewind_0" / "level_3" / "stats.json").exists()
    finally:
        lock.release()
    t.join(timeout=600)
    assert result["run"].levels(0) == [0, 1, 2, 3]


def _refused_then_queued(args, holder_pid, capsys):
    """``main(args)`` while ``holder_pid`` holds the run: a one-line error naming it; then
    ``args + --wait`` in a thread, returned once it says it is waiting (with its exit-code box)."""
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err, f"pid {holder_pid}")
    assert "in use" in line and "--wait" in line
    rc = {}
    waiting = threading.Thread(target=lambda: rc.setdefault("rc", main(args + ["--wait"])))
    waiting.start()
    while "waiting for" not in capsys.readouterr().err:
        assert waiting.is_alive()
        time.sleep(0.02)
    return waiting, rc


@pytest.mark.parametrize("command", ["barrier", "paper"])
def test_analysis_commands_hold_the_run_lock(copy, capsys, command):
    """The commands that write into a run folder take its lock too: busy -> a one-line error
    naming the holder and nothing written; --wait -> they run once the holder is done."""
    from fastimp.cli import WRITES_INTO_RUN
    out, folder = copy
    assert command in WRITES_INTO_RUN
    target = out if command == "paper" else folder  # OUT holding one run names that run
    args = [command, str(target), "--max-examples", "200"] + (
        ["--quick", "--no-progress", "--skip", "planes_imp", "robustness", "prune_scan",
         "hessian", "planes_pruning", "weights", "lrr_rewound"] if command == "paper" else [])
    lock = RunLock(folder).acquire()
    try:
        before = snapshot(folder)
        waiting, rc = _refused_then_queued(args, os.getpid(), capsys)
        assert waiting.is_alive() and snapshot(folder) == before
    finally:
        lock.release()
    waiting.join(timeout=600)
    assert rc["rc"] == 0 and snapshot(folder) != before
    assert read_holder(folder) is None


def test_two_concurrent_processes_and_a_killed_holder(copy, capsys):
    """While one `fastimp imp` process works on a run, a second command exits naming it, and a
    third with --wait queues; `kill -9` of the first frees the run and the waiting one finishes
    the work (the second and third run in this process, the first in its own)."""
    out, folder = copy
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["imp", "--out", str(out), *ARGS, "--levels", "4"]
    first = subprocess.Popen([sys.executable, "-m", "fastimp", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while read_holder(folder) is None:
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # holds the lock, makes no progress
        assert read_holder(folder)["pid"] == first.pid
        waiting, rc = _refused_then_queued(args, first.pid, capsys)
        first.kill()  # kill -9: the kernel releases its lock
        first.wait()
        waiting.join(timeout=600)
    finally:
        first.kill()
    assert rc["rc"] == 0
    run = load_run(folder)
    assert run.levels(0) == run.levels(3) == [0, 1, 2, 3, 4]
    assert not list(folder.rglob(".*.tmp*")) and read_holder(folder) is None


def test_stale_temp_files_are_cleaned(copy):
    from fastimp._io import _host
    out, folder = copy
    d = folder / L1
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = d / f".solution.pt.{dead.pid}@{_host()}.0a1b2c3d.tmp.pt"
    alive = d / f".solution.pt.{os.getpid()}@{_host()}.0a1b2c3e.tmp.pt"
    legacy = d / ".stats.json.k2j_3x9a.tmp.json"  # an older fastimp's name: stale when old
    young = d / ".stats.json.k2j_3x9b.tmp.json"
    for p in (stale, alive, legacy, young):
        p.write_bytes(b"x" * 1000)
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    assert _imp(out) == 0
    assert not stale.exists() and not legacy.exists()
    assert alive.exists() and young.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert _imp(tmp_path, "--levels", "0", "--rewind-step", "0") == 0
        assert main(["report", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {p.name for p in files if p.stat().st_mode & 0o777 != mode} == set()
    dirs = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert {p.stat().st_mode & 0o777 for p in dirs} == {0o777 & ~umask}


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_saved_masks_follow_the_umask(tmp_path, umask, mode, name):
    from fastimp.masks import Masks
    masks = Masks({"w": torch.rand(3, 4) > 0.5})
    old = os.umask(umask)
    try:
        masks.save(tmp_path / name)
    finally:
        os.umask(old)
    assert (tmp_path / name).stat().st_mode & 0o777 == mode
    assert Masks.load(tmp_path / name) == masks
    assert [p.name for p in tmp_path.iterdir()] == [name]


# --------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_says_where_and_rerun_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastimp", "imp", "--out", str(tmp_path), "--preset", "mnist1d",
           "--levels", "0", "--rewind-step", "0", "--no-progress", "--checkpoint-every", "20",
           "train.steps=600", "train.batch_size=32", "train.milestones=[400,500]",
           'model_kwargs={"channels":4}', "replicates=1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        while not list(tmp_path.glob("imp_*/seed_0/rewind_0/level_0/checkpoint.pt")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "level 0 of replicate 0 (seed 0), rewind step 0" in err
    assert "rerun the same command to resume" in err
    (folder,) = tmp_path.glob("imp_*")
    assert not list(folder.rglob(".*.tmp*"))
    assert main(cmd[3:]) == 0  # the same command, here in-process: it resumes
    assert load_run(folder).levels() == [0]


def test_the_same_object_is_written_as_the_same_bytes(tmp_path):
    from fastimp._io import save_torch
    obj = {"w": torch.arange(10.0), "b": torch.ones(3)}
    save_torch(obj, tmp_path / "a.pt")
    save_torch(obj, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert _states_equal(torch.load(tmp_path / "a.pt"), obj)
