"""How the tensor-core reduce tile's knobs (pipeline stages, columns, k step) change its time.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_tile_sweep.py``): for a few
micro-tiles and sparsities at one size it detects A once, then checks and times the tile at
every setting the tuner would measure (``reduce_tile_space``), next to ``torch.mm``. Times are
the tuner's (CUDA events, median), detection excluded. Prints one line per setting and writes
the records as JSON (``--json``) to pick defaults from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from spmm import sparse_operand  # noqa: E402

from pit_compiler import ops  # noqa: E402
from pit_compiler.codegen.reduce_matmul import reduce_tile_space  # noqa: E402
from pit_compiler.ir import SparsityAttr, plan_pit  # noqa: E402
from pit_compiler.tuning.tuner import DEFAULT_EVALUATOR, _measure_dedicated, time_callable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--cases", default="32x1:0.9,32x32:0.9,64x64:0.9,64x64:0.0")
    parser.add_argument("--limit", type=int, default=0, help="at most this many settings per case (0: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device, dtype, size = torch.device("cuda"), torch.float16, args.size
    B = torch.randn(size, size, device=device, dtype=dtype)
    records = []
    dense = time_callable(lambda: torch.mm(B, B), device)
    print(f"torch.mm {size}^3: {dense:.3f} ms", flush=True)
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        tile = tuple(int(t) for t in name.split("x"))
        A, density = sparse_operand(size, size, tile, float(sparsity), dtype, device)
        plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", tile), {"m": size, "n": size, "k": size})
        index = ops.index_for(plan, A, None, tile, None)
        out = torch.empty(size, size, dtype=dtype, device=device)
        default = ops._reduce_tile_default(plan, *ops._call_facts(A, B, out))
        space = reduce_tile_space(default, size)[: args.limit or None]
        for knobs in space:
            begin = time.perf_counter()
            try:
                ms = _measure_dedicated(plan, knobs, A, B, index, device, DEFAULT_EVALUATOR, check=True)
                error = None
            except Exception as exc:  # one failing setting must not end the sweep
                ms, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
            spent = time.perf_counter() - begin
            ideal = dense * density
            line = f"{name:6s} {sparsity:4s} stages={knobs.stages} n={knobs.block_n:3d} fn={knobs.fragments_n} k={knobs.block_k}"
            if ms is not None:
                print(f"{line}: {ms:.3f} ms, {ideal / ms:.2f} of ideal ({spent:.0f} s)", flush=True)
            else:
                print(f"{line}: FAILED {error}", flush=True)
            records.append(dict(micro_tile=name, sparsity=float(sparsity), density=density, size=size,
                                knobs=knobs.__dict__, ms=ms, error=error, dense_ms=dense, default=knobs == default))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
