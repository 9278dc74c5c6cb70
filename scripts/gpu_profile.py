"""Where a PIT call's time goes on the GPU: host time to issue it, wall time, and each kernel.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_profile.py``): for a few
spmm cases it prints the median wall time of a synchronized call, the host time to issue one
call (no sync), and torch.profiler's per-kernel GPU times, so fixed host overhead and slow
kernels can be told apart, then cProfile's top functions of the host time (``--no-python-profile``
skips them). CPU tensors work too (no kernel table). ``--timeline`` adds the kernels of one call
(``pit`` and ``pit_kernel``, outputs checked first) in launch order with their start and
duration: the gaps between them are the GPU waiting on the host; and, for whole rows, cuBLAS on
the listed rows alone (what cuBLAS takes for PIT's work).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_compiler as pit  # noqa: E402
from host_breakdown import issue_us  # noqa: E402
from spmm import MICRO_TILES, detection, sparse_operand  # noqa: E402


def median_us(fn, device, sync: bool, repeat: int = 50) -> float:
    return statistics.median(issue_us(fn, device, repeat, sync))


def kernels_of_one_call(fn) -> list[tuple[str, float, float]]:
    """(name, start us from the call's first kernel, duration us) of one call, on an idle GPU."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    start = gpu[0]["ts"] if gpu else 0
    return [(e["name"], e["ts"] - start, e["dur"]) for e in gpu]


def print_timeline(label: str, fn, A, B) -> None:
    """``fn``'s output checked against the float product, then the kernels of one call."""
    reference = torch.mm(A.float(), B.float())
    error = ((fn().float() - reference).norm() / reference.norm()).item()
    assert error < 1e-2, f"{label}: relative error {error}"
    timeline = kernels_of_one_call(fn)
    end = max((start + duration for _, start, duration in timeline), default=0.0)
    print(f"  timeline of one {label} call: {end:.1f} us from its first kernel's start")
    for kernel, start, duration in timeline:
        print(f"    {start:8.1f} {duration:8.1f}  {kernel[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--cases", default="row:0.9,32x1:0.9,32x1:0.99,32x32:0.9,64x64:0.9")
    parser.add_argument("--no-python-profile", dest="python_profile", action="store_false")
    parser.add_argument("--timeline", action="store_true", help="the kernels of one call with their start times")
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
        if args.timeline and name == "row":
            rows = A.index_select(0, A.ne(0).any(1).nonzero().squeeze(1))
            calls["cublas_listed_rows"] = lambda: torch.mm(rows, B)
        for label, fn in calls.items():
            for _ in range(3):
                fn()
            wall, issue = median_us(fn, device, True), median_us(fn, device, False)
            print(f"{name:6s} {sparsity:5s} {label:10s} wall {wall:9.1f} us   host issue {issue:9.1f} us", flush=True)
        if device.type == "cuda" and args.timeline:
            for label in ("pit", "pit_kernel"):
                print_timeline(label, calls[label], A, B)
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
