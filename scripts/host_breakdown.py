"""Where the host time of one PIT call goes, step by step (inclusive microseconds per call).

Development tool (``python3 -P scripts/host_breakdown.py``, on the GPU machine or the CPU):
wraps the steps of ``pit_matmul`` (the checks, the plan, the cover, detection, the fallback's
decision, the kernel choice, the kernel lookups and each TVM kernel call) with timers, then
issues calls one at a time on an idle device and prints each step's share of the host time.
cProfile's own overhead hides steps of a few microseconds; these timers cost under one each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pit_compiler as pit  # noqa: E402
from pit_compiler import api, ops  # noqa: E402
from pit_compiler.runtime import recent_counts  # noqa: E402
from pit_compiler.tuning import cost_model, database  # noqa: E402
from spmm import MICRO_TILES, sparse_operand  # noqa: E402

# (module, attribute or Class.method, whether what it returns is a kernel whose calls are timed too);
# steps another version of PIT lacks are skipped (to time a baseline with the same script).
STEPS = [
    (api, "sparse_matmul", False),
    (api, "check_matmul_operands", False),
    (api, "normalize_micro_tile", False),
    (api, "_sparse_matmul", False),
    (ops, "pit_matmul", False),
    (ops, "below_call_floor", False),
    (ops, "kept", False),
    (ops, "_derive_route", False),
    (ops, "storage", False),
    (ops, "compact_b_reaches_tensor_cores", False),
    (ops, "plan_pit", False),
    (ops, "tensor_core_cover", False),
    (ops, "index_for", False),
    (ops, "detect", False),
    (ops, "detect_as", False),
    (ops, "as_kernel_input", False),
    (ops, "as_words", False),
    (ops, "target_for", False),
    (ops, "detect_kernel", True),
    (ops, "dense_crossover", False),
    (ops, "call_signature", False),
    (ops, "dense_wins", False),
    (ops, "falls_back_on", False),
    (recent_counts, "RecentCounts.count", False),
    (recent_counts, "RecentCounts.latest", False),
    (recent_counts, "RecentCount.latest", False),
    (recent_counts, "RecentCount.post", False),
    (ops, "run_on_tensor_cores", False),
    (ops, "run_on_warpgroups", False),
    (ops, "warpgroup_knobs", False),
    (ops, "_database_knobs", False),
    (ops, "_tile_by_count", False),
    (ops, "capturing_graph", False),
    (ops, "row_gather_knobs", False),
    (ops, "_aligned", False),
    (cost_model, "tuned_knobs", False),
    (cost_model, "tile_database", False),
    (database, "TileDatabase.token", False),
    (ops, "fitting_warpgroup_knobs", False),
    (ops, "pack_kernel", True),
    (ops, "warpgroup_kernel", True),
    (ops, "run_reduce_on_tensor_cores", False),
    (ops, "reduce_tile_kernel", True),
    (ops, "run_matmul", False),
    (ops, "matmul_kernel", True),
    (cost_model, "select_without_waiting", False),
]


class Timers:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def timed(self, label, fn, kernel: bool):
        def run(*args, **kwargs):
            begin = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - begin
                self.calls[label] += 1
            return self.timed(f"  {label} -> kernel call", result, False) if kernel else result

        return run

    @contextmanager
    def installed(self, steps):
        with ExitStack() as undo:
            for module, path, kernel in steps:
                *classes, name = path.split(".")
                owner = module
                for part in classes:
                    owner = getattr(owner, part, None)
                original = getattr(owner, name, None)
                if original is None:
                    continue
                label = path if classes else f"{module.__name__.split('.')[-1]}.{name}"
                setattr(owner, name, self.timed(label, original, kernel))
                undo.callback(setattr, owner, name, original)
            yield

    def table(self, calls: int) -> str:
        rows = sorted(self.seconds.items(), key=lambda item: -item[1])
        return "\n".join(
            f"  {label:58s} {seconds / calls * 1e6:8.1f} us/call  ({self.calls[label] / calls:.1f}x)"
            for label, seconds in rows
        )


def issue_us(fn, device, repeat: int, sync: bool = False) -> list[float]:
    """Host time of each of ``repeat`` calls, each issued on an idle device (with ``sync``: until
    the device has finished it too)."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        if sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - begin) * 1e6)
    return times


def back_to_back_us(fn, device, repeat: int) -> float:
    """Time per call of ``repeat`` calls issued back to back (host and GPU overlap, as in a model)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) / repeat * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--cases", default="row:0.9,32x1:0.9,32x1:0.99,64x64:0.9")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--linear", action="store_true", help="also an nn.Linear weight (x @ W.t()), as pit.compile runs it")
    parser.add_argument("--no-steps", dest="steps", action="store_false", help="time whole calls only (no step table)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size
    calls = {}
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        tile = MICRO_TILES[name]
        A, _ = sparse_operand(size, size, tile, float(sparsity), dtype, device)
        B = torch.randn(size, size, device=device, dtype=dtype)
        calls[case] = lambda A=A, B=B, tile=tile: pit.sparse_matmul(A, B, micro_tile=tile)
        calls[case + " kernels"] = lambda A=A, B=B, tile=tile: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False)
        if args.linear:
            W = torch.randn(size, size, device=device, dtype=dtype)
            calls[case + " linear"] = lambda A=A, W=W, tile=tile: pit.sparse_matmul(A, W.t(), micro_tile=tile)
    A = torch.randn(size, size, device=device, dtype=dtype)
    calls["torch.mm"] = lambda: torch.mm(A, A)
    for label, fn in calls.items():
        for _ in range(5):
            fn()
        issued = sorted(issue_us(fn, device, args.repeat))
        streamed = statistics.median(back_to_back_us(fn, device, args.repeat) for _ in range(5))
        print(f"{label}: host issue median {statistics.median(issued):.1f} us, quietest tenth "
              f"{issued[len(issued) // 10]:.1f} us; back to back {streamed:.1f} us/call", flush=True)
        if args.steps:
            timers = Timers()
            with timers.installed(STEPS):
                timed = statistics.median(issue_us(fn, device, args.repeat))
            print(f"  with timers: host issue median {timed:.1f} us", flush=True)
            print(timers.table(args.repeat), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
