"""Where ``micro_tile="auto"`` spends its time, against the fixed micro-tiles it chooses from.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_auto_profile.py --db
tiles.json``, a database ``benchmarks/tuning.py`` tuned): per pattern it times, as the tuning
benchmark does (CUDA events around each call, the GPU idle before it), every fixed micro-tile,
dense and auto; then auto's parts: the selection alone on the host, each candidate's detection,
and the choices of consecutive calls; and calls issued back to back (20 per timed sample).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tuning import pattern  # noqa: E402

import pit_compiler as pit  # noqa: E402
from pit_compiler.testing import do_bench  # noqa: E402
from pit_compiler.tuning import TileDatabase, cost_model, set_tile_database  # noqa: E402


def host_ms(fn, calls: int = 50) -> float:
    """Median host time of ``fn`` (no sync inside)."""
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--cases", default="64x64:0.95,32x1:0.95,32x1:0.5")
    args = parser.parse_args()
    device, size = torch.device("cuda"), args.size
    set_tile_database(TileDatabase(args.db))
    B = torch.randn(size, size, device=device, dtype=torch.float16)
    tiles = {"32x1": (32, 1), "64x64": (64, 64)}
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        A = pattern(size, size, tiles[name], float(sparsity), torch.float16, device, 100)
        fns = {label: (lambda t=t: pit.sparse_matmul(A, B, micro_tile=t, dense_fallback=False)) for label, t in tiles.items()}
        fns["dense"] = lambda: torch.mm(A, B)
        fns["auto"] = lambda: pit.sparse_matmul(A, B, micro_tile="auto")
        for fn in fns.values():
            fn(), fn()
        line = [f"{label} {do_bench(fn, device, repeat=20).median_ms:.3f}/{do_bench(fn, device, repeat=5, batch=20).median_ms:.3f}"
                for label, fn in fns.items()]
        print(f"{name} {sparsity}: ms one call / back to back: " + ", ".join(line), flush=True)
        choices = [cost_model.select_without_waiting(A, B).label for _ in range(16)]
        torch.cuda.synchronize()
        select = host_ms(lambda: cost_model.select_without_waiting(A, B))
        auto_host = host_ms(fns["auto"])
        fixed_host = {label: host_ms(fns[label]) for label in tiles}
        detect = {label: do_bench(lambda t=t: cost_model.count_candidate(A, t), device, repeat=20).median_ms for label, t in tiles.items()}
        print(f"  selection host {select:.3f} ms; auto call host {auto_host:.3f}; fixed calls host "
              + ", ".join(f"{k} {v:.3f}" for k, v in fixed_host.items())
              + "; detection " + ", ".join(f"{k} {v:.3f}" for k, v in detect.items())
              + f"; 16 choices {' '.join(choices)}", flush=True)


if __name__ == "__main__":
    main()
