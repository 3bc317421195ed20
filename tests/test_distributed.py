"""torch.distributed (issue 11), on the CPU with gloo and 2 processes started by the tests as
torchrun starts them (tests/distributed_harness.py; one job runs every scenario of
distributed_worker.py, since process startup is the cost): data-parallel IMP and --parallel runs
equal to one process, masks broadcast and verified (a mismatch stops every rank), landscape
points and Hessian probes split over the ranks equal to one process, the analysis commands under
torchrun equal to one process, a run killed under torchrun resuming under torchrun and in one
process; and the pieces that need no second process (shares, checksums, rank-0-only writes,
accumulation, global BatchNorm, loaders' shares, the Slurm script, --dry-run)."""
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


def test_rank_shares_of_a_batch_are_the_batch(tmp_path):
    """Loader.share / steps(part=): the ranks' shares of step s, concatenated, are the
    one-process batch of step s (augmentation draws included; the short last batch too)."""
    from fastimp import data
    from fastimp.data.loader import batch_examples, batch_share
    ds = data.get("synthetic", shape=(3, 6, 6), num_classes=3, train_size=23, test_size=5)
    loader = ds.loader("train", 5, seed=4)                  # cifar augmentation, ipe 5 (last: 3)
    for world in (1, 2, 3):
        parts = [list(loader.steps(3, 11, part=(r, world))) for r in range(world)]
        for i, step in enumerate(range(3, 11)):
            x, y = loader.batch(step)
            assert batch_examples(loader, step) == len(y) == (3 if step % 5 == 4 else 5)
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
            lo, hi = batch_share(loader, step, world - 1, world)
            assert torch.equal(loader.share(step, lo, hi)[0], x[lo:hi])


def test_image_folder_shares_with_persistent_workers(tmp_path):
    """The ImageNet loader: one DataLoader with persistent workers over every epoch; a rank
    decodes only its share, and the shares make up the batch."""
    from PIL import Image
    from torchvision import datasets as tvd
    from fastimp.data.loader import FolderLoader
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / c / f"{i}.png")
    from torchvision import transforms as T
    folder = tvd.ImageFolder(str(tmp_path), transform=T.Compose([
        T.RandomResizedCrop(6, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()]))
    one = FolderLoader(folder, 4, seed=1, num_workers=0)
    two = [FolderLoader(folder, 4, seed=1, num_workers=1) for _ in range(2)]
    whole = list(one.steps(1, 7))
    parts = [list(ld.steps(1, 7, part=(r, 2))) for r, ld in enumerate(two)]
    for i in range(6):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), whole[i][0])
        assert torch.equal(torch.cat([p[i][1] for p in parts]), whole[i][1])
    dl = two[0]._loader
    assert dl.persistent_workers and dl.num_workers == 1
    list(two[0].steps(7, 9, part=(0, 2)))
    assert two[0]._loader is dl                           # the same workers, next epoch
    assert torch.equal(two[1].share(5, 1, 2)[0], whole[4][0][1:2])   # step 5: 2 examples


def test_micro_batches_and_the_record_of_how_a_run_trained():
    from fastimp.distributed.data_parallel import micro_batches, record
    from fastimp.training import TrainConfig
    assert micro_batches(2048, 1, 256) == 8 and micro_batches(2048, 8, 256) == 1
    assert micro_batches(2048, 8, None) == 1 and micro_batches(50, 2, 7) == 4
    assert micro_batches(5, 8, 2) == 1                    # shares of 0 or 1 example
    assert record(TrainConfig(batch_size=2048), 1, 256, "bf16", True) == {
        "world_size": 1, "per_rank_batch": 2048, "micro_batch": 256, "accumulation_steps": 8,
        "precision": "bf16", "channels_last": True}


def _small_train(steps=12):
    from fastimp import data
    from fastimp.training import TrainConfig
    ds = data.get("mnist1d")
    return ds, TrainConfig(steps=steps, batch_size=50, lr=0.1, momentum=0.9, weight_decay=5e-4,
                           milestones=(8,), data_seed=2)


def test_accumulation_in_one_process_equals_the_whole_batch():
    from fastimp import models, training
    from fastimp.distributed import data_parallel as dp
    from fastimp.pruning import prune_magnitude
    ds, cfg = _small_train()
    ref = models.get("mnist1d_mlp", seed=3, hidden=[32])
    masks = prune_magnitude(ref, 0.5)
    acc = models.get("mnist1d_mlp", seed=3, hidden=[32])
    a = training.train(ref, cfg, ds, masks=masks, progress=False)
    b = dp.train(acc, cfg, training.make_loader(ds, cfg), masks, per_device_batch=7)
    assert b.how["accumulation_steps"] == 8 and b.how["world_size"] == 1
    torch.testing.assert_close(b.losses, a.losses, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        if n in masks:
            assert bool((q[~masks[n]] == 0).all())         # pruned weights stay exactly 0


def test_bf16_autocast_and_channels_last_train_close_to_fp32():
    from fastimp import data, models, training
    from fastimp.distributed import data_parallel as dp
    ds = data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=64, test_size=8)
    cfg = training.TrainConfig(steps=4, batch_size=16, lr=0.05, momentum=0.9, milestones=())
    nets = [models.get("cifar_resnet_20", num_classes=4, seed=1) for _ in range(2)]
    loader = training.make_loader(ds, cfg)
    a = dp.train(nets[0], cfg, loader)
    b = dp.train(nets[1], cfg, loader, precision="bf16", channels_last=True, per_device_batch=8)
    assert (b.how["precision"], b.how["channels_last"], b.how["accumulation_steps"]) == \
        ("bf16", True, 2)
    assert torch.isfinite(b.losses).all()
    torch.testing.assert_close(b.losses, a.losses, rtol=0.05, atol=0.05)
    w = next(nets[1].parameters())
    assert w.dtype == torch.float32 and w.is_contiguous()   # fp32 master weights, given back
    with pytest.raises(ValueError, match="precision"):
        dp.train(nets[1], cfg, loader, precision="fp16")


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (the collectives are identities)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_is_batchnorm_on_the_global_batch(one_rank_group):
    """GlobalBatchNorm (the CPU SyncBatchNorm) with its all-reduced sums: forward, input and
    parameter gradients and running statistics of torch's BatchNorm on the same batch."""
    from torch import nn
    from fastimp.distributed.batchnorm import GlobalBatchNorm, synchronized
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 4, 3, generator=g) * 3 + 1).requires_grad_(True)
    ref = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(5, generator=g) + 0.5)
        ref.bias.copy_(torch.randn(5, generator=g))
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(5, momentum=0.3))
    model[1].load_state_dict(ref.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    w = torch.randn(6, 5, 4, 3, generator=g)
    ref_out = ref(xr)
    (ref_out * w).sum().backward()
    with synchronized(model, "cpu"):
        assert isinstance(model[1], GlobalBatchNorm)
        out = model(x)
        (out * w).sum().backward()
    assert type(model[1]) is nn.BatchNorm2d               # given back, same parameters
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, ref.running_mean)
    torch.testing.assert_close(model[1].running_var, ref.running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_how_a_run_trains_does_not_rename_its_folder():
    from fastimp import presets
    cfg = presets.get("mnist1d")
    assert cfg.folder_name() == "imp_b57e35ae1742"        # named as before these fields
    how = cfg.replace(precision="bf16", per_device_batch=10, channels_last=True, num_workers=2)
    assert how.folder_name() == cfg.folder_name()
    im = presets.get("imagenet-resnet50")
    assert (im.precision, im.per_device_batch, im.channels_last) == ("bf16", 256, True)
    assert im.folder_name() == "imp_e8c5b1b7f50b"
    for bad in ("precision=fp16", "per_device_batch=0", "num_workers=-1", "channels_last=3"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            cfg.with_overrides([bad])


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
    res = launch([WORKER, str(base), "basic", f"cli={split}", f"imp={base / 'imp'}"])
    assert res.ok, res.explain()
    out = {name: [torch.load(base / ("imp" if name == "imp" else "") / f"{name}_rank{r}.pt",
                             weights_only=False) for r in (0, 1)]
           for name in ("basic", "cli", "imp")}
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


def test_data_parallel_training_with_accumulation_and_batchnorm_equals_one_process(two_ranks):
    """Each rank its share of every step's batch (the epochs' short last batch too), gradient
    accumulation, BatchNorm over the global batch: the one-process training to float rounding,
    on both ranks."""
    from distributed_worker import trainings
    _, out, _, _ = two_ranks
    alone = trainings(distributed=False)
    for res in out["basic"]:
        got = res["trainings"]
        assert got["mlp"]["how"]["accumulation_steps"] == 4
        assert got["mlp"]["how"]["per_rank_batch"] == 25
        for name in ("mlp", "bn"):
            torch.testing.assert_close(got[name]["losses"], alone[name]["losses"], rtol=1e-5,
                                       atol=2e-6)
            for k, v in alone[name]["state"].items():
                torch.testing.assert_close(got[name]["state"][k], v, rtol=1e-4, atol=1e-5,
                                           msg=f"{name} {k}")


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
    assert [o["codes"] for o in out["cli"]] == [[0, 0, 0, 0], [0, 0, 0, 0]]
    with counting() as counts:
        assert [main(args) for args in cli_commands(str(alone))] == [0, 0, 0, 0]
    shares = [o["counts"] for o in out["cli"]]
    assert sum(s["points"] for s in shares) == counts["points"]        # split, not repeated
    assert all(0 < s["points"] < counts["points"] for s in shares)
    assert all(0 < s["probe_rows"] < counts["probe_rows"] for s in shares)
    # the pruning-ratio scan's 2 replicates x 2 ratios: 2 retrainings on each rank
    assert counts["retrained"] == 4 and [s["retrained"] for s in shares] == [2, 2]
    files = sorted(p.relative_to(alone) for p in (alone / "analysis").rglob("*")
                   if p.is_file())
    assert sorted(p.relative_to(split) for p in (split / "analysis").rglob("*")
                  if p.is_file()) == files            # the same files, written once (rank 0)
    assert not list(split.rglob(".*.tmp*"))
    for f in files:
        if f.suffix == ".json":
            a, b = json.loads((split / f).read_text()), json.loads((alone / f).read_text())
            exact = "plane" in f.name or "barrier" in f.name  # the scan: trainings packed 2 vs 4
            _close(a, b, str(f), rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5)
        elif f.suffix == ".npz":
            a, b = np.load(split / f), np.load(alone / f)
            np.testing.assert_allclose(a["nodes"], b["nodes"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4, atol=1e-6)


def _imp_alone(base):
    from distributed_worker import imp_config
    from fastimp import imp
    return imp.run(imp_config(), base / "imp_alone", progress=False)


def _same_runs(a, b, err_tol=2e-3, weight_tol=1e-5):
    """Every level of every rewind step and replicate: the same masks, test errors and weights
    to float tolerance."""
    assert a.rewind_steps == b.rewind_steps and a.replicates == b.replicates
    for tau in a.rewind_steps:
        for r in a.replicates:
            assert a.levels(tau, r) == b.levels(tau, r) == [0, 1, 2]
            for L in a.levels(tau, r):
                assert a.mask(L, tau, r) == b.mask(L, tau, r), (tau, r, L)
                ea, eb = a.stats(L, tau, r)["test_error"], b.stats(L, tau, r)["test_error"]
                assert abs(ea - eb) <= err_tol, (tau, r, L, ea, eb)
                sa, sb = a.solution(L, tau, r), b.solution(L, tau, r)
                assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= weight_tol


def test_data_parallel_imp_equals_one_process(two_ranks):
    from fastimp.imp import load_run
    base, out, _, _ = two_ranks
    alone = _imp_alone(base)
    for rank in (0, 1):
        rec = out["imp"][rank]["data"]
        # every training (2 pre-trainings, 2 replicates x 2 rewind steps x 3 levels) on both
        assert rec["calls"] == [("data-parallel", 1)] * 14, rec["calls"]
    split = load_run(out["imp"][0]["data"]["dir"])
    assert split.dir.name == alone.dir.name
    _same_runs(split, alone)
    assert min(s["test_error"] for s in split.results()) < 0.8   # it learned (chance: 0.9)
    st = split.stats(1, 8, 1)
    assert (st["world_size"], st["per_rank_batch"], st["micro_batch"], st["accumulation_steps"],
            st["precision"], st["parallel"]) == (2, 25, 25, 1, "fp32", "data")
    assert alone.stats(1, 8, 1)["world_size"] == 1
    assert not list(split.dir.rglob("checkpoint.pt")) and not list(split.dir.rglob(".*.tmp*"))


def test_parallel_runs_equals_one_process_each_rank_its_share(two_ranks):
    from fastimp.imp import load_run
    base, out, _, _ = two_ranks
    alone = load_run(next((base / "imp_alone").iterdir())) if (base / "imp_alone").exists() \
        else _imp_alone(base)
    calls = [out["imp"][r]["runs"]["calls"] for r in (0, 1)]
    # rank r: its replicate's pre-training, then its 2 runs (tau 0 and 8) per level, batched
    assert calls[0] == calls[1] == [("batched", 1)] + [("batched", 2)] * 3, calls
    runs = load_run(out["imp"][0]["runs"]["dir"])
    _same_runs(runs, alone)
    assert {s["parallel"] for s in runs.results()} == {"runs"}
    rows = json.loads((runs.dir / "results.json").read_text())
    assert len(rows) == 2 * 2 * 3                       # rank 0 wrote every rank's levels
    assert json.loads((runs.dir / "summary.json").read_text()) == runs.summary()


def test_a_busy_run_folder_stops_every_rank(two_ranks):
    """Rank 0 alone takes the lock; when another process holds it the other ranks are told
    (no deadlock), in both modes."""
    _, out, _, _ = two_ranks
    for mode in ("data", "runs"):
        r0, r1 = (out["imp"][r][f"locked_{mode}"] for r in (0, 1))
        assert r0 is not None and r0.startswith("RunLockedError"), r0
        assert r1 is not None and "RunLockedError" in r1 and "rank 0" in r1, r1


def test_cli_errors_under_torchrun_are_one_line_and_exit_2_on_every_rank(tmp_path):
    """A rank-0 error (a rejected command with --parallel data; a busy folder with --parallel
    runs): rank 0 says it in one line, the other ranks stop silently (RankStoppedError), every
    rank exits 2 (no traceback, no abort in the process group's teardown). A diverging run: every
    rank says the same located line."""
    from fastimp import presets
    from fastimp.imp.lock import RunLock
    base = ["-m", "fastimp", "imp", "--preset", "mnist1d", "--levels", "0", "--no-progress",
            "replicates=1", "train.steps=20"]
    cases = [(["--out", str(tmp_path / "a"), "--parallel", "data", "--rewind-step", "700"],
              "past the end of training", False),
             (["--out", str(tmp_path / "b"), "--parallel", "runs"], "is in use by", False),
             (["--out", str(tmp_path / "c"), "--parallel", "data", "train.lr=1000"],
              "level 0, rewind step 0, replicate 0 (seed 0): training diverged", True)]
    busy = presets.get("mnist1d").with_overrides(["levels=0", "replicates=1", "train.steps=20"])
    with RunLock(tmp_path / "b" / busy.folder_name()):
        for args, says, every_rank in cases:
            res = launch(base + args, timeout=180)
            assert res.returncodes == [2, 2], res.explain()
            lines = [err.strip().splitlines() for err in res.stderr]
            assert len(lines[0]) == 1 and says in lines[0][0], res.explain()
            assert lines[1] == (lines[0] if every_rank else []), res.explain()


def test_a_mask_mismatch_between_ranks_stops_every_rank(two_ranks):
    _, out, _, _ = two_ranks
    for rank in (0, 1):
        err = out["imp"][rank]["mismatch"]
        assert err is not None and err.startswith("MaskMismatchError"), err
        assert "fc.weight" in err and "replicate 0 (seed 0)" in err


KILL_OVERRIDES = ["model=mnist1d_mlp", 'model_kwargs={"hidden":[32]}', "levels=2", "replicates=1",
                  "seeds=null", "rewind_steps=0", "train.steps=150", "train.milestones=100,130",
                  "train.batch_size=50", "threads=1"]


def _wait_for(path_glob, root: Path, proc, timeout=120.0):
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        hits = list(root.glob(path_glob))
        if hits:
            return hits[0]
        if proc.poll() is not None:
            raise AssertionError(f"torchrun ended (exit {proc.returncode}) before {path_glob}:\n"
                                 + proc.stdout.read()[-4000:])
        time.sleep(0.01)
    raise AssertionError(f"no {path_glob} after {timeout} s")


@pytest.mark.slow
def test_a_run_killed_under_torchrun_resumes_under_torchrun_and_in_one_process(tmp_path):
    """Killed (SIGKILL, every process) in level 1 under torchrun; resumed in one process, which is
    interrupted in level 2; resumed under torchrun to the end: equal to an uninterrupted run."""
    from distributed_harness import base_env, kill_tree, torchrun_cmd
    from fastimp import imp, presets
    cfg = presets.get("mnist1d").with_overrides(KILL_OVERRIDES)
    ref = imp.run(cfg, tmp_path / "ref", progress=False, checkpoint_every=5)
    out = tmp_path / "runs"
    cmd = torchrun_cmd(2) + ["-m", "fastimp", "imp", "--preset", "mnist1d", "--out", str(out),
                             "--no-progress", "--checkpoint-every", "5", *KILL_OVERRIDES]
    proc = subprocess.Popen(cmd, env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ckpt = _wait_for("imp_*/seed_0/rewind_0/level_1/checkpoint.pt", out, proc)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    folder = ckpt.parents[3]
    assert (folder / "seed_0/rewind_0/level_0/stats.json").exists()
    assert not (folder / "seed_0/rewind_0/level_1/stats.json").exists(), "killed too late"
    assert ckpt.exists()

    class Stop(Exception):
        pass
    seen = []

    def stop(step, model, optimizer):   # one process: resume level 1, stop inside level 2
        seen.append(step)
        if (folder / "seed_0/rewind_0/level_2/checkpoint.pt").exists():
            raise Stop
    with pytest.raises(Stop):
        imp.run(cfg, out, progress=False, checkpoint_every=5, on_step=stop)
    assert seen[0] > 5, "level 1 resumed from its checkpoint, not from step 0"
    assert (folder / "seed_0/rewind_0/level_1/stats.json").exists()
    assert not (folder / "seed_0/rewind_0/level_2/stats.json").exists()

    res = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = imp.load_run(folder)
    assert run.levels(0) == [0, 1, 2]
    for L in (0, 1, 2):
        assert run.mask(L) == ref.mask(L)
        assert abs(run.stats(L)["test_error"] - ref.stats(L)["test_error"]) <= 2e-3
        a, b = run.solution(L), ref.solution(L)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert [run.stats(L)["world_size"] for L in (0, 1, 2)] == [2, 1, 2]
    assert not list(folder.rglob("checkpoint.pt")) and not list(folder.rglob(".*.tmp*"))
