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


def elapsed_ms(fn, device: torch.device, calls: int = 1) -> float:
    """ms that ``calls`` calls of ``fn`` take, issued back to back: CUDA events around them on a
    GPU (waited for), ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) * 1e3


def do_bench(fn, device=None, *, warmup: int = 3, repeat: int = 20, batch: int = 1) -> Timing:
    """Time ``fn()`` on ``device`` (a torch device or its name; CPU when None).

    ``batch``: calls per sample, its time their mean. 1 times each call alone on an idle GPU,
    so the host's time to issue it counts in full; more queue that many calls before one wait,
    host and GPU overlapping as they do along a model's forward.
    """
    device = torch.device(device or "cpu")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch!r}")
    for _ in range(warmup):
        fn()
    times = [elapsed_ms(fn, device, batch) / batch for _ in range(repeat)]
    if len(times) == 1:
        return Timing(times[0], times[0], times[0])
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), deciles[1], deciles[7])
