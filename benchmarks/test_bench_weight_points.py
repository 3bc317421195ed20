"""pytest-benchmark suite of weight_points (``pytest benchmarks/test_bench_weight_points.py``):
the cases of ``python -m benchmarks --only weight_points``. Not run by ``make test``."""
import pytest
import torch

from benchmarks.bench_weight_points import CASES, _inputs
from fastimp import _backend
from fastimp.ops.weight_points import weight_points

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["addmm", "torch", "cpu", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_weight_points(benchmark, case, impl):
    name, D, J, K = CASES[case]
    if impl not in ("addmm",) and not _backend.status("weight_points", impl, DEVICE):
        pytest.skip(f"{impl} unavailable on {DEVICE}")
    if impl == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is not timed")
    origin, U, C, clip, lo, hi, out = _inputs(D, J, K, DEVICE)
    if impl == "addmm":
        fn = lambda: torch.addmm(origin, C, U, out=out)  # noqa: E731
    else:
        fn = lambda: weight_points(origin, U, C, clip=clip, lo=lo, hi=hi, out=out,  # noqa: E731
                                   backend=impl)

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.group = f"weight_points {name} K={K} {DEVICE}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
