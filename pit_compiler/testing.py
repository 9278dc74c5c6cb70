"""Timing for tutorials, benchmarks and the demo: one method everywhere.

CUDA work is timed with events around each call after warm-up calls (so builds, module loads
and allocator growth stay out), CPU work with ``time.perf_counter``; the result is the median
and the 20th/80th percentiles, as Triton's ``do_bench(quantiles=[0.5, 0.2, 0.8])`` reports.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms [{self.p20_ms:.3f}, {self.p80_ms:.3f}]"


def do_bench(fn, device=None, *, warmup: int = 3, repeat: int = 20) -> Timing:
    """Time ``fn()`` on ``device`` (a torch device or its name; CPU when None)."""
    device = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0])
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7])
