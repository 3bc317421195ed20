"""fastimp.hessian vs PyHessian (the package users know) on the same model and data, in one run.

- top-5 eigenvalues to 1e-3 relative of the converged values (a 300-step Lanczos with tol 1e-10):
  each tool's loosest ``tol`` that reaches it is timed (PyHessian: power iteration with deflation,
  tol in 1e-3 ... 1e-6; fastimp: Lanczos, tol in 1e-2 ... 1e-6);
- the trace with the same number of Hutchinson samples (PyHessian: ``tol=-1`` so it runs them all);
- the density's wall time (512 Lanczos steps; PyHessian's ``density()`` needs ``torch.eig``, which
  was removed in torch 1.9, so only fastimp's is timed).

Model and data: the mnist1d MLP (40-100-100-10, 15,210 weights) on the MNIST-1D train set (4,000
examples, batches of 500), trained for a few hundred steps first so the spectrum has outliers.
"""
from __future__ import annotations

import time
from typing import List

import numpy as np
import torch
from torch import nn

from benchmarks.common import Table, sync


def _setup(device, quick):
    torch.manual_seed(0)
    try:
        from fastimp import data as fdata
        from fastimp import models
        model = models.get("mnist1d_mlp", seed=0)
        ds = fdata.get("mnist1d")
        x, y = ds.train.x.float(), ds.train.y.long()
        name = "mnist1d_mlp on MNIST-1D"
    except Exception:  # noqa: BLE001 - the registry may be absent: a same-sized stand-in
        model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                              nn.Linear(100, 10))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4000, 40, generator=g)
        y = (x[:, :10] + 0.5 * torch.randn(4000, 10, generator=g)).argmax(1)
        name = "MLP 40-100-100-10 on synthetic data"
    n = 1000 if quick else 4000
    x, y = x[:n].to(device), y[:n].to(device)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(100 if quick else 300):
        i = (step * 250) % n
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 250]), y[i:i + 250]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, n, 500)]
    D = sum(p.numel() for p in model.parameters())
    return model, batches, f"{name}, {n} examples / {len(batches)} batches, D = {D}"


def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _rel_err(vals, ref):
    vals = np.sort(np.asarray(vals, dtype=np.float64))[::-1]
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def tables(device="cpu", quick=False) -> List[Table]:
    from fastimp.hessian import Hessian
    try:
        import pyhessian
    except ImportError:
        pyhessian = None
    model, batches, case = _setup(device, quick)
    crit = nn.CrossEntropyLoss()
    top_n, target = 5, 1e-3
    hess = Hessian(model, crit, batches, seed=0)
    ref, _ = hess.eigenvalues(top_n=top_n, max_iter=300, tol=1e-10, seed=123)
    ref = np.asarray(ref)

    t = Table(f"Hessian: fastimp.hessian vs PyHessian ({device}) — {case}")
    eig_case = f"top-{top_n} eigenvalues to {target:g} rel."

    if pyhessian is not None:
        for tol in (1e-3, 1e-4, 1e-5, 1e-6):
            torch.manual_seed(0)
            ph = pyhessian.hessian(model, crit, dataloader=batches, cuda=device == "cuda")
            sec, (vals, _) = _timed(lambda: ph.eigenvalues(maxIter=1000, tol=tol, top_n=top_n),
                                    device)
            err = _rel_err(vals, ref)
            if err <= target:
                t.add(eig_case, "PyHessian (power iteration + deflation)", sec,
                      extra=f"tol={tol:g}, rel. err {err:.1e}")
                break
        else:
            t.add(eig_case, "PyHessian (power iteration + deflation)", sec,
                  extra=f"did not reach {target:g} (tol=1e-6: rel. err {err:.1e})")
    base = "PyHessian (power iteration + deflation)" if pyhessian is not None else None
    for tol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        h = Hessian(model, crit, batches, seed=0)
        sec, (vals, _) = _timed(lambda: h.eigenvalues(top_n=top_n, max_iter=300, tol=tol),
                                device)
        err = _rel_err(vals, ref)
        if err <= target:
            break
    t.add(eig_case, "fastimp Lanczos", sec, baseline=base,
          extra=f"tol={tol:g}, {h.last_steps} steps, rel. err {err:.1e}")

    n = 32 if quick else 100
    tr_case = f"trace, {n} Hutchinson samples"
    if pyhessian is not None:
        torch.manual_seed(0)
        ph = pyhessian.hessian(model, crit, dataloader=batches, cuda=device == "cuda")
        sec, samples = _timed(lambda: ph.trace(maxIter=n, tol=-1.0), device)
        t.add(tr_case, "PyHessian", sec, extra=f"tr = {np.mean(samples):.4g} "
                                                f"± {np.std(samples) / np.sqrt(n):.2g}")
    for ppp in (16, 32):
        h = Hessian(model, crit, batches, seed=0, probes_per_pass=ppp)
        sec, samples = _timed(lambda: h.trace(n_samples=n), device)
        t.add(tr_case, f"fastimp ({ppp} probes/pass)", sec,
              baseline="PyHessian" if pyhessian is not None else None,
              extra=f"tr = {np.mean(samples):.4g} ± {np.std(samples) / np.sqrt(n):.2g}")

    steps = 64 if quick else 512
    d_case = f"density, {steps} Lanczos steps, 1 run"
    h = Hessian(model, crit, batches, seed=0)
    sec, dens = _timed(lambda: h.density(iterations=steps, n_runs=1), device)
    if pyhessian is not None:
        ph = pyhessian.hessian(model, crit, dataloader=batches, cuda=device == "cuda")
        try:
            ph.density(iter=2, n_v=1)
            note = "PyHessian density() ran"
        except (AttributeError, RuntimeError) as exc:
            note = f"PyHessian density() fails here: {type(exc).__name__}: {str(exc)[:60]}"
    else:
        note = "PyHessian not installed"
    t.add(d_case, "fastimp SLQ (full reorth.)", sec,
          extra=f"λ_max {dens.nodes.max():.4g}; {note}")
    return [t]


if __name__ == "__main__":
    import sys
    for table in tables("cpu", quick="--quick" in sys.argv):
        print(table.render())
