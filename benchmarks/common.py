"""Timing and table helpers shared by the benchmark modules."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device="cpu", warmup: int = 3, repeat: int = 10,
           min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all < min_time and len(times) < 1000):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Row:
    case: str
    impl: str
    seconds: float
    baseline: Optional[str] = None  # impl name of the row this one is compared with
    extra: str = ""


@dataclass
class Table:
    title: str
    rows: List[Row] = field(default_factory=list)

    def add(self, case: str, impl: str, seconds: float, baseline: Optional[str] = None,
            extra: str = "") -> Row:
        row = Row(case, impl, seconds, baseline, extra)
        self.rows.append(row)
        return row

    def speedup(self, row: Row) -> Optional[float]:
        if row.baseline is None:
            return None
        base = [r for r in self.rows if r.case == row.case and r.impl == row.baseline]
        return base[0].seconds / row.seconds if base else None

    # what the value column holds and how a ratio reads (CountTable: op counts, "x fewer")
    value_name = "time"
    ratio_name = "speedup vs"
    ratio_word = "vs"

    def fmt(self, value: float) -> str:
        return fmt_seconds(value)

    def render(self) -> str:
        out = [f"## {self.title}", "",
               f"| case | impl | {self.value_name} | {self.ratio_name} | notes |",
               "|---|---|---:|---|---|"]
        for r in self.rows:
            s = self.speedup(r)
            vs = f"{s:.2f}x {self.ratio_word} {r.baseline}" if s is not None else ""
            out.append(f"| {r.case} | {r.impl} | {self.fmt(r.seconds)} | {vs} | {r.extra} |")
        return "\n".join(out)


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def machine() -> str:
    import os
    import platform
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
