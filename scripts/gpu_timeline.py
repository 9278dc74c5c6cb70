"""The GPU timeline of one PIT call: each kernel it launches, when it starts and how long it runs.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_timeline.py``): for each
spmm case it profiles one call (torch.profiler's trace) after warm-up and prints its kernels in
launch order with their start (from the call's first kernel) and duration, so that detection,
zeroing, packing and the tile can be weighed against each other and against the gaps between
them. Beside it, CUDA-event medians of the whole call, of ``torch.mm`` on the dense operands and,
for whole rows, of ``torch.mm`` on the listed rows alone (what cuBLAS takes for PIT's work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pit_compiler as pit  # noqa: E402
from common import time_ms  # noqa: E402
from spmm import MICRO_TILES, sparse_operand  # noqa: E402


def kernels_of_one_call(fn) -> list[tuple[str, float, float]]:
    """(name, start µs from the call's first kernel, duration µs) of one call, on an idle GPU."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--cases", default="row:0.9,row:0.99,64x64:0.9,32x32:0.9,32x1:0.9")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    device, dtype, size = torch.device("cuda"), getattr(torch, args.dtype), args.size
    B = torch.randn(size, size, device=device, dtype=dtype)
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        tile = MICRO_TILES[name]
        A, density = sparse_operand(size, size, tile, float(sparsity), dtype, device)
        calls = {"pit": lambda: pit.sparse_matmul(A, B, micro_tile=tile),
                 "pit_kernel": lambda: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False),
                 "cublas": lambda: torch.mm(A, B)}
        if name == "row":
            listed = A.ne(0).any(1).nonzero().squeeze(1)
            rows = A.index_select(0, listed)
            calls["cublas_listed_rows"] = lambda: torch.mm(rows, B)
        reference = torch.mm(A.float(), B.float())
        for label in ("pit", "pit_kernel"):
            error = ((calls[label]().float() - reference).norm() / reference.norm()).item()
            assert error < 1e-2, f"{label} {case}: relative error {error}"
        print(f"\n== {name} {sparsity} ({size}^3 {args.dtype}, density {density:.3f})", flush=True)
        for label, fn in calls.items():
            print(f"  {label:20s} {time_ms(fn, device, repeat=30)['median_ms'] * 1e3:8.1f} us", flush=True)
        for label in ("pit", "pit_kernel"):
            timeline = kernels_of_one_call(calls[label])
            end = max(start + duration for _, start, duration in timeline)
            print(f"  timeline of one {label} call: {end:.1f} us from its first kernel's start")
            for kernel, start, duration in timeline:
                print(f"    {start:8.1f} {duration:8.1f}  {kernel[:90]}")


if __name__ == "__main__":
    main()
