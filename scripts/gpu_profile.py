"""Where a PIT call's time goes on the GPU: host time to issue it, wall time, and each kernel.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_profile.py``): for a few
spmm cases it prints the median wall time of a synchronized call, the host time to issue one
call (no sync), and torch.profiler's per-kernel GPU times, so fixed host overhead and slow
kernels can be told apart, then cProfile's top functions of the host time (``--no-python-profile``
skips them). CPU tensors work too (no kernel table).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_compiler as pit  # noqa: E402
from host_breakdown import issue_us  # noqa: E402
from spmm import MICRO_TILES, detection, sparse_operand  # noqa: E402


def median_us(fn, device, sync: bool, repeat: int = 50) -> float:
    return statistics.median(issue_us(fn, device, repeat, sync))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--cases", default="row:0.9,32x1:0.9,32x1:0.99,32x32:0.9,64x64:0.9")
    parser.add_argument("--no-python-profile", dest="python_profile", action="store_false")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        tile = MICRO_TILES[name]
        A, _ = sparse_operand(size, size, tile, float(sparsity), dtype, device)
        B = torch.randn(size, size, device=device, dtype=dtype)
        detect, _ = detection(A, B, tile)
        calls = {"pit": lambda: pit.sparse_matmul(A, B, micro_tile=tile),
                 "pit_kernel": lambda: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False),
                 "detect": detect, "cublas": lambda: torch.mm(A, B)}
        for label, fn in calls.items():
            for _ in range(3):
                fn()
            wall, issue = median_us(fn, device, True), median_us(fn, device, False)
            print(f"{name:6s} {sparsity:5s} {label:10s} wall {wall:9.1f} us   host issue {issue:9.1f} us", flush=True)
        if device.type == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    calls["pit"]()
                torch.cuda.synchronize(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        if args.python_profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [calls["pit"]() for _ in range(100)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
