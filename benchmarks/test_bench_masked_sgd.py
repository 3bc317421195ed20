"""pytest-benchmark suite of the masked SGD step (``pytest benchmarks/test_bench_masked_sgd.py``):
the same candidates and baselines as ``python -m benchmarks --only masked_sgd``, one per test, so
``--benchmark-compare`` can track them across commits. Never part of ``make test``."""
import pytest
import torch

from benchmarks.bench_masked_sgd import baselines, candidates, resnet_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_SHAPES = {}
_FNS = {}


def _fns(model):
    if model not in _FNS:
        _SHAPES[model] = resnet_shapes(model)
        _FNS[model] = {**baselines(_SHAPES[model], DEVICE), **candidates(_SHAPES[model], DEVICE)}
    return _FNS[model]


IMPLS = [f"torch SGD {v} + {m} mask" for v in ("for-loop", "foreach", "fused")
         for m in ("bool", "float")] + [
         "fastimp MaskedSGD (cpu)", "fastimp MaskedSGD (cuda)", "fastimp MaskedSGD (triton)",
         "fastimp MaskedSGD (torch)"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_masked_sgd_step(benchmark, model, impl):
    fns = _fns(model)
    if impl not in fns:
        pytest.skip(f"{impl} is not available on {DEVICE}")
    try:
        fn = fns[impl]()
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"{impl}: {exc}")
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.group = f"masked_sgd {model} {DEVICE}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
