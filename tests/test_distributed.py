"""torch.distributed (issue 11), on the CPU with gloo and 2 processes started by the tests as
torchrun starts them (tests/distributed_harness.py): masks broadcast and verified (a mismatch is
an error on every rank), landscape points and Hessian probes split over the ranks equal to one
process, the analysis commands under torchrun equal to one process, and the pieces that need no
second process (shares, checksums, rank-0-only writes, the Slurm script, --dry-run)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastimp import distributed as D

sys.path.insert(0, os.path.dirname(__file__))
from distributed_harness import launch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ no second process needed
def test_shards_are_contiguous_balanced_and_cover_everything():
    for n in (0, 1, 5, 7, 16):
        for w in (1, 2, 3, 8):
            parts = [D.shard(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert D.shard(5) == range(5)               # no process group: everything
    with pytest.raises(ValueError, match="n:"):
        D.shard(-1)


def test_without_a_process_group_everything_is_one_process():
    assert not D.active() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    assert D.agree({"a": 1}) == {"a": 1} and D.all_gather_objects(3) == [3]
    assert D.spread([1, 2, 3], lambda xs: [x + 1 for x in xs]) == [2, 3, 4]
    masks = {"w": torch.tensor([True, False])}
    D.verify_masks(masks)                        # nothing to compare with
    assert D.broadcast_masks(masks) == masks


def test_mask_checksum_sees_every_bit_name_and_order():
    g = torch.Generator().manual_seed(0)
    m = {"a": torch.rand(5, 7, generator=g) < 0.5, "b": torch.rand(3, generator=g) < 0.5}
    c = D.masks_checksum(m)
    assert torch.equal(c, D.masks_checksum({k: v.clone() for k, v in m.items()}))
    for i in range(35):
        flipped = dict(m, a=m["a"].clone())
        flipped["a"].view(-1)[i] ^= True
        d = D.masks_checksum(flipped)
        assert d[1] != c[1] and d[0] == c[0] and d[2] == c[2]
    assert D.masks_checksum({"b": m["b"], "a": m["a"]})[0] != c[0]          # order
    assert D.masks_checksum({"a": m["a"].reshape(7, 5), "b": m["b"]})[0] != c[0]  # shape
    assert torch.equal(D.masks_checksum({k: v.to(torch.uint8) for k, v in m.items()}), c)


def test_main_writes_lets_only_rank_0_write(tmp_path, monkeypatch):
    from fastimp._io import save_json, writes_enabled
    monkeypatch.setattr(D.env, "rank", lambda: 1)
    with D.main_writes():
        assert not writes_enabled()
        save_json({"a": 1}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists() and writes_enabled()
    monkeypatch.setattr(D.env, "rank", lambda: 0)
    with D.main_writes():
        save_json({"a": 1}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_slurm_script_starts_torchrun_per_node_with_a_c10d_rendezvous(tmp_path):
    """examples/slurm/fastimp.sbatch with stand-ins for srun and scontrol: the command it runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_ / "srun").write_text("#!/bin/sh\necho \"srun $*\"\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="64")
    env.pop("OMP_NUM_THREADS", None)
    script = ROOT / "examples" / "slurm" / "fastimp.sbatch"
    out = subprocess.run(["bash", str(script), "imp", "--preset", "imagenet-resnet50", "--out",
                          "/shared/runs", "data_root=/shared/imagenet"], env=env,
                         capture_output=True, text=True, check=True).stdout
    cmd = out.strip().splitlines()[-1]
    assert cmd.startswith("srun --kill-on-bad-exit=1 ")
    for part in ("-m torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
                 "--rdzv_id=4242", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=gpu-node-07:29500",
                 "-m fastimp imp --preset imagenet-resnet50 --out /shared/runs "
                 "data_root=/shared/imagenet"):
        assert part in cmd, (part, cmd)
    bad = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_dry_run_prints_the_plan_without_data_or_writes(tmp_path, capsys):
    from fastimp.cli import main
    from fastimp.imp.estimate import estimate
    from fastimp import presets
    out = tmp_path / "runs"
    assert main(["imp", "--preset", "imagenet-resnet50", "--out", str(out), "--dry-run",
                 "data_root=/nonexistent/imagenet"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    cfg = presets.get("imagenet-resnet50")
    e = estimate(cfg, 8)
    # Appendix B: T = 15,970; 13 levels per rewind step 0, 1250, 5000; 4 replicates
    assert e.total_steps == 15970 and e.level_steps[1250] == [15970 - 1250] * 13
    assert e.total_run_steps == 4 * (5000 + 13 * (15970 + 14720 + 10970))
    assert f"whole run: {estimate(cfg, 1).total_run_steps:,} optimizer steps" in text
    assert "T = 15,970" in text and "13 levels x steps per level: 14,720 each" in text
    assert "memory per device (estimate)" in text
    # ResNet-50: 25.6 M parameters; activations ~85 MiB per example in fp32 (leaf outputs)
    assert e.parameters == 25_557_032
    per_example = e.memory.activations / e.micro_batch / (2 if e.precision == "bf16" else 4)
    assert 20e6 < per_example < 25e6
    assert e.per_rank_batch * 8 == 2048


# --------------------------------------------------------------------- 2 processes, gloo
def _tiny_run(**kw):
    from fastimp.imp import IMPConfig
    from fastimp.training import TrainConfig
    train = TrainConfig(steps=24, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        schedule="step", milestones=(12, 18), gamma=0.1)
    base = dict(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=1,
                rewind_steps=[0], replicates=2, model_kwargs={"hidden": [16]})
    base.update(kw)
    return IMPConfig(**base)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process job runs every scenario of distributed_worker.py (startup is the cost):
    returns (output folder, {scenario: [rank 0's, rank 1's results]}, the one-process folder,
    the 2-process folder)."""
    from fastimp import imp
    base = tmp_path_factory.mktemp("dist")
    run = imp.run(_tiny_run(), base / "runs", progress=False)
    alone, split = base / "alone" / run.dir.name, base / "split" / run.dir.name
    shutil.copytree(run.dir, alone)
    shutil.copytree(run.dir, split)
    res = launch([WORKER, str(base), "basic", f"cli={split}"])
    assert res.ok, res.explain()
    out = {name: [torch.load(base / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
           for name in ("basic", "cli")}
    return base, out, alone, split


def test_masks_are_rank_0s_everywhere_and_a_mismatch_stops_every_rank(two_ranks):
    _, out, _, _ = two_ranks
    r0, r1 = out["basic"]
    for name, m in r0["rank0_masks"].items():
        assert torch.equal(r0["masks"][name], m) and torch.equal(r1["masks"][name], m)
    for r, res in enumerate((r0, r1)):
        assert res["caught"] is not None, f"rank {r} trained on through different masks"
        assert "level 2 masks" in res["caught"] and "b.weight" in res["caught"]
        assert "a.weight" not in res["caught"]


def test_landscape_points_and_hessian_split_over_ranks_equal_one_process(two_ranks):
    sys.path.insert(0, os.path.dirname(__file__))
    from distributed_worker import compute
    _, out, _, _ = two_ranks
    alone = compute(distributed=False)
    counts = [res["counts"] for res in out["basic"]]
    assert [c["points"] for c in counts] == [3, 4]          # 7 points: shares of 3 and 4
    assert all(c["probe_rows"] and c["batches"] for c in counts)
    # Lanczos products: half the 4 batches each; trace and SLQ: 5 probes, 3 runs shared
    assert sum(c["batches"] for c in counts) < 2 * 4 * max(c["probe_rows"] for c in counts)
    for res in out["basic"]:               # every rank gets everything, in order
        assert torch.equal(res["error"], alone["error"])          # point by point: exact
        torch.testing.assert_close(res["loss"], alone["loss"], rtol=0, atol=0)
        np.testing.assert_allclose(res["eigenvalues"], alone["eigenvalues"], rtol=1e-5)
        np.testing.assert_allclose(res["trace"], alone["trace"], rtol=1e-5)
        assert res["nodes"].shape == alone["nodes"].shape == (3, 6)
        torch.testing.assert_close(res["nodes"], alone["nodes"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["weights"], alone["weights"], rtol=1e-4, atol=1e-5)


def _close(a, b, where="", rtol=1e-4, atol=1e-6):
    """JSON values equal, floats to tolerance."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}/{k}", rtol, atol)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= atol + rtol * abs(b), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_plane_barrier_hessian_under_torchrun_equal_one_process(two_ranks):
    from distributed_worker import cli_commands, counting
    from fastimp.cli import main
    _, out, alone, split = two_ranks
    assert [o["codes"] for o in out["cli"]] == [[0, 0, 0], [0, 0, 0]]
    with counting() as counts:
        assert [main(args) for args in cli_commands(str(alone))] == [0, 0, 0]
    shares = [o["counts"] for o in out["cli"]]
    assert sum(s["points"] for s in shares) == counts["points"]        # split, not repeated
    assert all(0 < s["points"] < counts["points"] for s in shares)
    assert all(0 < s["probe_rows"] < counts["probe_rows"] for s in shares)
    files = sorted(p.relative_to(alone) for p in (alone / "analysis").rglob("*")
                   if p.is_file())
    assert sorted(p.relative_to(split) for p in (split / "analysis").rglob("*")
                  if p.is_file()) == files            # the same files, written once (rank 0)
    assert not list(split.rglob(".*.tmp*"))
    for f in files:
        if f.suffix == ".json":
            a, b = json.loads((split / f).read_text()), json.loads((alone / f).read_text())
            exact = "plane" in f.name or "barrier" in f.name
            _close(a, b, str(f), rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5)
        elif f.suffix == ".npz":
            a, b = np.load(split / f), np.load(alone / f)
            np.testing.assert_allclose(a["nodes"], b["nodes"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4, atol=1e-6)
