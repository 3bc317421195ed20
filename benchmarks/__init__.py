"""fastimp benchmarks: ``python -m benchmarks`` prints ratio tables against today's baselines;
``pytest benchmarks`` runs the pytest-benchmark suite. Never run by ``make test``."""
