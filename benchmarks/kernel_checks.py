"""Every kernel backend against its PyTorch reference on a device, as ``gpu_check`` runs it.

Edge sizes around each backend's block (0, 1, block - 1, block, block + 1, a few blocks + 3),
views that start one element into their storage (not 16-byte aligned), float32 / bfloat16 /
float16 / float64, outputs poisoned (NaN or 7) before the kernel writes them, an lr tensor
against the same float, a CUDA-graph replay against eager steps, and on a GPU with the memory
for it more than 2^31 elements (checked on samples). The oracle is each op's reference run on
float64 copies. ``run(device, dry)`` returns ``{"checks": [...], "failed": n}``.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from fastimp import _backend
from fastimp.ops import magnitude_threshold as th
from fastimp.ops import masked_sgd as ms
from fastimp.ops import weight_points as wp

TOL = {torch.float32: 2e-6, torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11,
       torch.float64: 1e-13}
SGD_OPTIONS = [
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False,
         decoupled=False),
    dict(momentum=0.875, dampening=0.25, weight_decay=1e-2, nesterov=False, maximize=True,
         decoupled=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-2, nesterov=True, maximize=False,
         decoupled=True),
    dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=False,
         decoupled=False),
]


def _backends(op: str, device: str) -> List[str]:
    dev = torch.device(device).type
    names = ["cuda", "triton"] if dev == "cuda" else ["cpu", "triton"]
    return [b for b in names if _backend.status(op, b, dev)]


def _sgd_block(backend: str, device: str) -> int:
    if backend == "cuda":
        return 32768
    if backend == "cpu":
        return 16384
    from fastimp.kernels.masked_sgd import config
    return config(torch.device(device))[0]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype) -> float:
    """Largest error relative to the scale of ref (inf when out is not finite)."""
    if out.numel() == 0:
        return 0.0
    out = out.double().cpu()
    ref = ref.double().cpu()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    scale = ref.abs().max().item() + 1e-30
    return ((out - ref).abs() / (ref.abs() + scale)).max().item()


def _record(checks, op, backend, case, err, tol):
    checks.append(dict(op=op, backend=backend, case=case, err=err, ok=bool(err <= tol)))


def check_masked_sgd(device: str, dry: bool, checks: List[Dict]) -> None:
    gen = torch.Generator().manual_seed(0)
    for backend in _backends("masked_sgd", device):
        B = _sgd_block(backend, device)
        sizes = [0, 1, B - 1, B, B + 1] + ([] if dry else [3 * B + 3])
        for dtype in TOL:
            for oi, opt in enumerate(SGD_OPTIONS[::2] if dry else SGD_OPTIONS):
                for misaligned in (False, True):
                    ps, gs, bs, mks, init = [], [], [], [], []
                    for k, n in enumerate(sizes):
                        off = 1 if misaligned else 0
                        base = [torch.randn(n + off, generator=gen).to(device, dtype)
                                for _ in range(3)]
                        p, g, b = (t[off:] for t in base)
                        first = opt["momentum"] != 0 and k % 2 == 0
                        if first:
                            b.fill_(float("nan"))  # a new buffer: must be overwritten
                        ps.append(p)
                        gs.append(g)
                        bs.append(b if opt["momentum"] != 0 else None)
                        mks.append((torch.rand(n, generator=gen) > 0.3).to(device)
                                   if k % 3 != 1 else None)
                        init.append(first)
                    ref = [[None if t is None else t.double().cpu().clone() for t in xs]
                           for xs in (ps, gs, bs, mks)]
                    ref[3] = [None if m is None else m.cpu() for m in mks]
                    ms.reference(*ref, init, lr=0.05, **opt)
                    ms._run(ps, gs, bs, mks, init, backend, lr=0.05, **opt)
                    err = max([_close(p, r, dtype) for p, r in zip(ps, ref[0])] +
                              [_close(b, r, dtype) for b, r in zip(bs, ref[2]) if b is not None])
                    zero = all(bool((p[~m] == 0).all()) for p, m in zip(ps, mks) if m is not None)
                    _record(checks, "masked_sgd", backend,
                            f"{str(dtype)[6:]} option {oi}{' misaligned' if misaligned else ''}",
                            err if zero else math.inf, TOL[dtype])
        _check_lr_tensor(backend, device, checks)
        if torch.device(device).type == "cuda":
            _check_graph(backend, device, checks)
            if not dry:
                _check_huge_sgd(backend, device, checks)


def _check_lr_tensor(backend, device, checks) -> None:
    gen = torch.Generator().manual_seed(1)
    for lr_dtype in (torch.float32, torch.float64):
        ps = [torch.randn(n, generator=gen).to(device) for n in (3, 1000)]
        gs = [torch.randn_like(p) for p in ps]
        twins = [p.clone() for p in ps]
        b1 = ms.masked_sgd_(ps, gs, None, None, lr=0.0625, momentum=0.9, backend=backend)
        b2 = ms.masked_sgd_(twins, gs, None, None, lr=torch.tensor(0.0625, dtype=lr_dtype,
                                                                   device=device),
                            momentum=0.9, backend=backend)
        same = all(torch.equal(a, b) for a, b in zip(ps + b1, twins + b2))
        _record(checks, "masked_sgd", backend, f"lr {str(lr_dtype)[6:]} tensor = float",
                0.0 if same else math.inf, 0.0)


def _check_graph(backend, device, checks) -> None:
    gen = torch.Generator().manual_seed(2)
    ps = [torch.randn(n, generator=gen).to(device) for n in (5, 70000)]
    gs = [torch.randn_like(p) for p in ps]
    mks = [torch.rand(p.shape, generator=gen).to(device) > 0.3 for p in ps]
    ref = [p.double().clone() for p in ps]
    lr = torch.tensor(0.1, device=device)
    kw = dict(momentum=0.9, weight_decay=1e-3)
    try:
        bufs = ms.masked_sgd_(ps, gs, None, mks, lr=lr, backend=backend, **kw)
        rbufs = ms.masked_sgd_(ref, [g.double() for g in gs], None, mks, lr=0.1, backend="torch",
                               **kw)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ms.masked_sgd_(ps, gs, bufs, mks, lr=lr, backend=backend, **kw)
        torch.cuda.current_stream().wait_stream(side)
        ms.masked_sgd_(ref, [g.double() for g in gs], rbufs, mks, lr=0.1, backend="torch", **kw)
        with torch.cuda.graph(graph):
            ms.masked_sgd_(ps, gs, bufs, mks, lr=lr, backend=backend, **kw)
        for value in (0.05, 0.02):
            lr.fill_(value)
            graph.replay()
            ms.masked_sgd_(ref, [g.double() for g in gs], rbufs, mks, lr=value,
                           backend="torch", **kw)
        torch.cuda.synchronize()
        err = max(_close(a, r, torch.float32) for a, r in zip(ps + bufs, ref + rbufs))
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check
        checks.append(dict(op="masked_sgd", backend=backend, case="CUDA graph replay",
                           err=math.inf, ok=False, error=f"{type(exc).__name__}: {exc}"[:300]))
        return
    _record(checks, "masked_sgd", backend, "CUDA graph replay, lr tensor changed", err, 1e-5)


def _check_huge_sgd(backend, device, checks) -> None:
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2 * n + n + 4 * 2 ** 30:
        checks.append(dict(op="masked_sgd", backend=backend, case="2^31 + 5 elements",
                           err=0.0, ok=True, skipped="not enough free memory"))
        return
    gen = torch.Generator(device=device).manual_seed(0)
    p, g, b = (torch.randn(n, device=device, dtype=torch.float16, generator=gen)
               for _ in range(3))
    m = torch.rand(n, device=device, generator=gen) > 0.5
    idx = torch.cat([torch.arange(0, 4096), torch.arange(2 ** 31 - 4096, n),
                     torch.randint(0, n, (20000,))]).to(device)
    ref = [p[idx].double().cpu(), g[idx].double().cpu(), b[idx].double().cpu()]
    ms.reference([ref[0]], [ref[1]], [ref[2]], [m[idx].cpu()], [False], lr=0.05,
                 **SGD_OPTIONS[0])
    ms._run([p], [g], [b], [m], [False], backend, lr=0.05, **SGD_OPTIONS[0])
    err = max(_close(p[idx], ref[0], torch.float16), _close(b[idx], ref[2], torch.float16))
    _record(checks, "masked_sgd", backend, "2^31 + 5 fp16 elements (sampled)", err,
            TOL[torch.float16])
    del p, g, b, m
    torch.cuda.empty_cache()


def check_threshold(device: str, dry: bool, checks: List[Dict]) -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = {"cuda": 8192, "cpu": 65536,
              "triton": 1024 if torch.device(device).type == "cuda" else 128}
    for backend in _backends("magnitude_threshold", device):
        B = blocks[backend]
        sizes = [0, 1, B - 1, B, B + 1] + ([] if dry else [3 * B + 3])
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for ties, misaligned in ((False, False), (True, False), (True, True)):
                if ties:
                    ws = [torch.randint(-6, 7, (n,), generator=gen).to(dtype) for n in sizes]
                else:
                    ws = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
                mks = [torch.rand(n, generator=gen) < 0.7 for n in sizes]
                for fraction in ((0.3,) if misaligned else (0.0, 0.3, 0.999)):
                    want = th.magnitude_threshold(ws, mks, fraction=fraction, backend="torch")
                    # misaligned: weights, masks and outputs one element into their storage
                    place = _offset if misaligned else (lambda t, device: t.to(device))
                    stores = [torch.empty(n + 1, dtype=torch.bool, device=device)
                              for n in sizes]
                    for st in stores:
                        st.view(torch.uint8).fill_(7)
                    out = [st[1:] if misaligned else st[:-1] for st in stores]
                    got = th.magnitude_threshold([place(w, device) for w in ws],
                                                 [place(m, device) for m in mks],
                                                 fraction=fraction, out=out, backend=backend)
                    same = ((got.n, got.k, got.threshold) == (want.n, want.k, want.threshold)
                            and all(torch.equal(a.cpu(), b) for a, b in zip(out, want.masks))
                            and all(int(st.view(torch.uint8)[0 if misaligned else -1]) == 7
                                    for st in stores))
                    _record(checks, "magnitude_threshold", backend,
                            f"{str(dtype)[6:]}{' ties' if ties else ''} fraction {fraction}"
                            f"{' misaligned' if misaligned else ''}",
                            0.0 if same else math.inf, 0.0)


def _offset(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` as a contiguous view one element into its storage."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
    return flat[1:].view(t.shape).copy_(t)


def check_weight_points(device: str, dry: bool, checks: List[Dict]) -> None:
    gen = torch.Generator().manual_seed(4)
    for backend in _backends("weight_points", device):
        B = 1024
        for dtype in (torch.float32, torch.float64):
            for D in ([1, B - 1, B, B + 1] if dry else [1, B - 1, B, B + 1, 3 * B + 3]):
                for K, J, misaligned in ((1, 0, False), (3, 2, False), (5, 1, False),
                                         (3, 2, True)):
                    o = torch.randn(D, generator=gen, dtype=torch.float64)
                    U = torch.randn(J, D, generator=gen, dtype=torch.float64)
                    C = torch.randn(K, J, generator=gen, dtype=torch.float64)
                    clip = torch.rand(D, generator=gen) < 0.3
                    lo, hi = -torch.rand(J, dtype=torch.float64), torch.rand(J, dtype=torch.float64)
                    ref = torch.empty(K, D, dtype=torch.float64)
                    wp.reference(o, U, C, clip, lo, hi, ref)
                    # misaligned: every tensor one element into its storage (Triton's
                    # unaligned specialization); the element before the output stays NaN
                    store = torch.full((K * D + 1,), float("nan"), dtype=dtype, device=device)
                    out = (store[1:] if misaligned else store[:-1]).view(K, D)
                    place = _offset if misaligned else (lambda t, device: t.to(device))
                    args = [place(t.to(dtype), device) for t in (o, U, C)]
                    wp.weight_points(*args, clip=place(clip, device),
                                     lo=place(lo.to(dtype), device),
                                     hi=place(hi.to(dtype), device), out=out, backend=backend)
                    tol = 1e-5 if dtype == torch.float32 else 1e-12
                    kept = bool(torch.isnan(store[0 if misaligned else -1]))
                    _record(checks, "weight_points", backend,
                            f"{str(dtype)[6:]} D={D} K={K} J={J}"
                            f"{' misaligned' if misaligned else ''}",
                            _close(out, ref, dtype) if kept else math.inf, tol)
        if torch.device(device).type == "cuda" and not dry:
            _check_huge_points(backend, device, checks)


def _check_huge_points(backend, device, checks) -> None:
    D, J, K = 2 ** 27 + 3, 2, 17  # D above the old 67.1 M grid limit, K * D > 2^31
    free, _ = torch.cuda.mem_get_info()
    if free < (K + J + 2) * D * 4 + 2 * 2 ** 30:
        checks.append(dict(op="weight_points", backend=backend, case="D = 2^27 + 3, K = 17",
                           err=0.0, ok=True, skipped="not enough free memory"))
        return
    g = torch.Generator(device=device).manual_seed(0)
    o = torch.randn(D, device=device, generator=g)
    U = torch.randn(J, D, device=device, generator=g)
    C = torch.randn(K, J, device=device, generator=g)
    clip = torch.rand(D, device=device, generator=g) < 0.3
    lo, hi = torch.tensor([-0.5, 0.0], device=device), torch.tensor([0.5, 1.0], device=device)
    out = torch.full((K, D), float("nan"), device=device)
    wp.weight_points(o, U, C, clip=clip, lo=lo, hi=hi, out=out, backend=backend)
    idx = torch.cat([torch.arange(0, 1024), torch.arange(D - 1024, D),
                     torch.randint(0, D, (8192,))]).to(device)
    ref = torch.empty(K, idx.numel(), dtype=torch.float64)
    wp.reference(o[idx].double().cpu(), U[:, idx].double().cpu(), C.double().cpu(),
                 clip[idx].cpu(), lo.double().cpu(), hi.double().cpu(), ref)
    _record(checks, "weight_points", backend, "D = 2^27 + 3, K = 17 (sampled)",
            _close(out[:, idx], ref, torch.float32), 1e-5)
    del o, U, out
    torch.cuda.empty_cache()


def run(device: str, dry: bool) -> Dict:
    checks: List[Dict] = []
    for fn in (check_masked_sgd, check_threshold, check_weight_points):
        try:
            fn(device, dry, checks)
        except Exception as exc:  # noqa: BLE001 - one op's crash must not hide the others
            checks.append(dict(op=fn.__name__, backend="?", case="crashed", err=math.inf,
                               ok=False, error=f"{type(exc).__name__}: {exc}"[:500]))
    return {"checks": checks, "failed": sum(not c["ok"] for c in checks)}


def markdown(result: Dict) -> str:
    """One row per (op, backend): checks run, failed, largest relative error, failures named."""
    rows: Dict[tuple, List[Dict]] = {}
    for c in result["checks"]:
        rows.setdefault((c["op"], c["backend"]), []).append(c)
    out = ["| op | backend | checks | failed | max rel. error | failures |",
           "|---|---|---:|---:|---:|---|"]
    for (op, backend), cs in rows.items():
        bad = [c for c in cs if not c["ok"]]
        errs = [c["err"] for c in cs if c["ok"]]
        names = "; ".join(f"{c['case']}{': ' + c['error'] if 'error' in c else ''}"
                          for c in bad[:4])
        out.append(f"| {op} | {backend} | {len(cs)} | {len(bad)} | "
                   f"{max(errs) if errs else float('nan'):.2g} | {names} |")
    return "\n".join(out)
