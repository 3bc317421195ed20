"""One rank of the 2-process gloo job of tests/test_distributed.py (started by
tests/distributed_harness.py as torchrun would start it). ``python distributed_worker.py OUT
SCENARIO ...`` (one job runs several: process startup is the expensive part); each rank saves
what it computed to ``OUT/<scenario>_rank<r>.pt``.

Scenarios:
- ``basic``: masks broadcast and verified, a mismatch detected on every rank, landscape points
  and Hessian probes / SLQ runs / Lanczos products split over the ranks;
- ``cli=DIR``: ``fastimp plane``, ``barrier`` and ``hessian`` on the run folder DIR (as under
  torchrun: the points and probes split, rank 0 writing);
- ``imp=OUT``: ``fastimp.imp.run`` of :func:`imp_config` data-parallel into OUT/data, with
  ``--parallel runs`` into OUT/runs, and data-parallel with rank 1 handed other masks than rank
  0's into OUT/mismatch (the error is recorded).
"""
import contextlib
import sys

import torch

torch.set_num_threads(1)


def inputs():
    """The same tiny model, data and points on every rank (and in the test)."""
    from torch import nn
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    data = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    from fastimp.landscape.space import StateLayout
    D = StateLayout(model).D
    U = torch.randn(2, D, generator=g)
    C = torch.randn(7, 2, generator=g)
    masks = {"0.weight": torch.rand(8, 6, generator=g) < 0.7,
             "2.weight": torch.rand(3, 8, generator=g) < 0.7}
    return model, data, U, C, masks


def compute(distributed: bool):
    """Everything the ``basic`` scenario splits, computed alone or split over the ranks."""
    from fastimp.hessian import Hessian
    from fastimp.landscape.evaluate import evaluate
    from fastimp.landscape.space import StateLayout
    model, data, U, C, masks = inputs()
    origin = StateLayout(model).flatten(model)
    ev = evaluate(model, origin, U, C, data, batching="loop", distributed=distributed)
    hess = Hessian(model, None, data, masks, seed=3, probes_per_pass=2, distributed=distributed)
    eig, _ = hess.eigenvalues(top_n=2, tol=1e-6, max_iter=40, seed=5)
    trace = hess.trace(n_samples=5, seed=6)
    dens = hess.density(iterations=6, n_runs=3, seed=7)
    return {"error": ev.error, "loss": ev.loss, "eigenvalues": eig, "trace": trace,
            "nodes": torch.as_tensor(dens.nodes), "weights": torch.as_tensor(dens.weights)}


def trainings(distributed: bool):
    """Two small trainings, data-parallel over the ranks or alone (``fastimp.training.train``):
    a pruned MLP with gradient accumulation (shares of 25 in micro-batches of at most 7) and a
    ResNet-20 with BatchNorm whose epochs end in a short batch (100 examples, batches of 30)."""
    from fastimp import data, models, training
    from fastimp.distributed import data_parallel as dp
    from fastimp.pruning import prune_magnitude
    out = {}
    ds = data.get("mnist1d")
    cfg = training.TrainConfig(steps=10, batch_size=50, lr=0.1, momentum=0.9, weight_decay=5e-4,
                               milestones=(6,), data_seed=2)
    mlp = models.get("mnist1d_mlp", seed=3, hidden=[32])
    masks = prune_magnitude(mlp, 0.5)
    syn = data.get("synthetic", shape=(3, 8, 8), num_classes=4, train_size=100, test_size=8)
    cfg_bn = training.TrainConfig(steps=6, batch_size=30, lr=0.05, momentum=0.9,
                                  milestones=(), data_seed=1)
    net = models.get("cifar_resnet_20", num_classes=4, seed=2)
    if distributed:
        a = dp.train(mlp, cfg, training.make_loader(ds, cfg), masks, per_device_batch=7)
        b = dp.train(net, cfg_bn, training.make_loader(syn, cfg_bn))
    else:
        a = training.train(mlp, cfg, ds, masks=masks, progress=False)
        b = training.train(net, cfg_bn, syn, progress=False)
    for name, model, res in (("mlp", mlp, a), ("bn", net, b)):
        out[name] = {"losses": res.losses, "state": {k: v.detach().clone()
                                                     for k, v in model.state_dict().items()},
                     "how": getattr(res, "how", None)}
    return out


@contextlib.contextmanager
def counting():
    """Counts the landscape points evaluated, the Hessian probe rows and the batches read."""
    import importlib
    from fastimp.hessian import hvp
    ev = importlib.import_module("fastimp.landscape.evaluate")
    from fastimp.imp import retraining
    counts = {"points": 0, "probe_rows": 0, "batches": 0, "retrained": 0}
    run_chunks, matvec = ev._run_chunks, hvp.HVPOperator._matvec
    retrain_jobs = retraining._retrain_jobs

    def counting_retrain(run, jobs, *a, **k):
        counts["retrained"] += len(jobs)
        return retrain_jobs(run, jobs, *a, **k)

    def counting_chunks(plan, C, *a, **k):
        counts["points"] += C.shape[0]
        return run_chunks(plan, C, *a, **k)

    def counting_matvec(self, V, batches=None, decay=True):
        counts["probe_rows"] += V.shape[0]
        counts["batches"] += len(self.batches if batches is None else batches)
        return matvec(self, V, batches, decay)
    ev._run_chunks, hvp.HVPOperator._matvec = counting_chunks, counting_matvec
    retraining._retrain_jobs = counting_retrain
    try:
        yield counts
    finally:
        ev._run_chunks, hvp.HVPOperator._matvec = run_chunks, matvec
        retraining._retrain_jobs = retrain_jobs


def basic(out):
    from fastimp import distributed as D
    r = D.rank()
    g = torch.Generator().manual_seed(100 + r)   # different masks on every rank ...
    mine = {"a.weight": torch.rand(4, 5, generator=g) < 0.5,
            "b.weight": torch.rand(7, generator=g) < 0.5}
    masks = D.broadcast_masks(mine if r == 0 else None)   # ... until rank 0's are broadcast
    D.verify_masks(masks, "broadcast masks")
    bad = {k: v.clone() for k, v in masks.items()}
    if r == 1:
        bad["b.weight"][3] = ~bad["b.weight"][3]
    try:
        D.verify_masks(bad, "level 2 masks")
        caught = None
    except D.MaskMismatchError as exc:
        caught = str(exc)
    with counting() as counts:   # what this rank computed: its share, not everything
        result = compute(distributed=True)
    result["counts"] = counts
    result["trainings"] = trainings(distributed=True)
    result.update(masks={k: v for k, v in masks.items()}, caught=caught,
                  rank0_masks={k: v for k, v in mine.items()} if r == 0 else None)
    torch.save(result, f"{out}/basic_rank{r}.pt")


def cli(out, run_dir):
    from fastimp import distributed as D
    from fastimp.cli import main
    with counting() as counts:
        codes = [main(args) for args in cli_commands(run_dir)]
    torch.save({"codes": codes, "counts": counts}, f"{out}/cli_rank{D.rank()}.pt")


def imp_config(**kw):
    """A small IMP run that learns something in a few steps (MNIST-1D MLP, batch 50 over 2
    ranks: shares of 25; 3 levels, 2 rewind steps, 2 replicates)."""
    from fastimp.imp import IMPConfig
    from fastimp.training import TrainConfig
    train = TrainConfig(steps=40, batch_size=50, lr=0.1, momentum=0.9, weight_decay=5e-4,
                        schedule="step", milestones=(30,), gamma=0.1)
    base = dict(model="mnist1d_mlp", dataset="mnist1d", train=train, levels=2,
                rewind_steps=[0, 8], replicates=2, model_kwargs={"hidden": [32]})
    base.update(kw)
    return IMPConfig(**base)


def imp_runs(out):
    from fastimp import distributed as D
    from fastimp import imp
    from fastimp.distributed import masks as dm
    r = D.rank()
    record = {}
    from fastimp import training
    from fastimp.distributed import data_parallel as dp
    calls = []   # (how, runs, examples of the first step on this rank)
    dp_train, batched = dp.train, training.train_batched

    def dp_spy(model, cfg, loader, *a, **k):
        calls.append(("data-parallel", 1))
        return dp_train(model, cfg, loader, *a, **k)

    def batched_spy(models, *a, **k):
        calls.append(("batched", len(models)))
        return batched(models, *a, **k)
    dp.train, training.train_batched = dp_spy, batched_spy
    try:
        for mode in ("data", "runs"):
            calls.clear()
            res = imp.run(imp_config(), f"{out}/{mode}", progress=False, parallel=mode)
            record[mode] = {"dir": str(res.dir), "calls": list(calls)}
    finally:
        dp.train, training.train_batched = dp_train, batched
    broadcast = dm.broadcast_masks

    def other_masks(masks, src=0, device=None):  # rank 1 trains under a mask one bit off
        got = broadcast(masks, src, device)
        if D.rank() == 1:
            name = list(got)[-1]
            t = got[name].clone()
            t.view(-1)[0] = ~t.view(-1)[0]
            got = type(got)({**dict(got), name: t})
        return got
    from fastimp.imp.lock import RunLock
    for mode in ("data", "runs"):  # another process holds the folder: every rank stops
        lock = RunLock(f"{out}/locked/{imp_config().folder_name()}") if r == 0 else None
        if lock is not None:
            lock.acquire()
        try:
            imp.run(imp_config(), f"{out}/locked", progress=False, parallel=mode)
            record[f"locked_{mode}"] = None
        except Exception as exc:
            record[f"locked_{mode}"] = f"{type(exc).__name__}: {exc}"
        finally:
            if lock is not None:
                lock.release()
    dm.broadcast_masks = other_masks
    try:
        imp.run(imp_config(levels=1), f"{out}/mismatch", progress=False, parallel="data")
        record["mismatch"] = None
    except Exception as exc:  # every rank must stop
        record["mismatch"] = f"{type(exc).__name__}: {exc}"
    finally:
        dm.broadcast_masks = broadcast
    torch.save(record, f"{out}/imp_rank{r}.pt")


def cli_commands(run_dir):
    return [["plane", run_dir, "--grid", "4", "--level", "0"],
            ["barrier", run_dir, "--betas", "0.25", "0.5", "0.75"],
            ["hessian", run_dir, "--level", "1", "--iterations", "6", "--runs", "3",
             "--trace-samples", "5", "--probes-per-pass", "2", "--top-n", "2", "--eps", "0.01",
             "--subset", "300", "--tol", "1e-6"],
            ["prune-scan", run_dir, "--level", "1", "--ratios", "0.3,0.6", "--methods",
             "magnitude", "--eps-matching", "0.05"]]


if __name__ == "__main__":
    from fastimp import distributed
    distributed.init()
    out = sys.argv[1]
    for scenario in sys.argv[2:]:
        name, _, arg = scenario.partition("=")
        {"basic": lambda: basic(out), "cli": lambda: cli(out, arg),
         "imp": lambda: imp_runs(arg)}[name]()
    distributed.shutdown()
