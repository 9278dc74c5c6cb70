"""How the tensor-core tiles' knobs (pipeline stages, columns, k step, MMA overlap) change their time.

Development tool for the lent GPU machine (``python3 -P scripts/gpu_tile_sweep.py``): for a few
micro-tiles and sparsities at one size it detects A once, then checks and times the tile that
serves them (Hopper's warpgroup tile where it applies, else the mma.sync reduce tile) at every
setting the tuner would measure, next to ``torch.mm``. Times are
the tuner's (CUDA events, median), detection excluded. Prints one line per setting and writes
the records as JSON (``--json``) to pick defaults from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from spmm import sparse_operand  # noqa: E402

from pit_compiler import ops  # noqa: E402
from pit_compiler.codegen.reduce_matmul import reduce_tile_space  # noqa: E402
from pit_compiler.codegen.warpgroup import warpgroup_knobs, warpgroup_space  # noqa: E402
from pit_compiler.ir import SparsityAttr, plan_pit  # noqa: E402
from pit_compiler.tuning.tuner import DEFAULT_EVALUATOR, _measure_dedicated, time_callable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--cases", default="32x1:0.9,32x32:0.9,64x64:0.9,64x64:0.0", help="micro-tile:sparsity, 'row' for whole rows")
    parser.add_argument("--limit", type=int, default=0, help="at most this many settings per case (0: all)")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="keep only the settings with this knob value (repeatable), e.g. block_m=64")
    parser.add_argument("--vary", metavar="NAME=V1,V2,...", default=None,
                        help="time only the default with this knob set to each value, e.g. row_tiles_first=false,true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device, dtype, size = torch.device("cuda"), torch.float16, args.size
    B = torch.randn(size, size, device=device, dtype=dtype)
    records = []
    dense = time_callable(lambda: torch.mm(B, B), device)
    print(f"torch.mm {size}^3: {dense:.3f} ms", flush=True)
    for case in args.cases.split(","):
        name, sparsity = case.split(":")
        tile = (1, size) if name == "row" else tuple(int(t) for t in name.split("x"))
        A, density = sparse_operand(size, size, tile, float(sparsity), dtype, device)
        plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", tile), {"m": size, "n": size, "k": size})
        index = ops.index_for(plan, A, None, tile, None)
        out = torch.empty(size, size, dtype=dtype, device=device)
        facts = ops._call_facts(A, B, out)
        default = warpgroup_knobs(plan, *facts)
        if default is not None:
            space = warpgroup_space(default, plan)
        else:
            default = ops._reduce_tile_default(plan, *facts)
            space = reduce_tile_space(default, size)
        wanted = dict(knob.split("=", 1) for knob in args.knob)
        space = [knobs for knobs in space if all(str(getattr(knobs, k)) == v for k, v in wanted.items())]
        space = space[: args.limit or None]
        if args.vary:
            knob, values = args.vary.split("=", 1)
            kind = type(getattr(default, knob))
            parse = (lambda text: text.lower() in ("1", "true")) if kind is bool else kind
            space = [replace(default, **{knob: parse(value)}) for value in values.split(",")]
        for knobs in space:
            begin = time.perf_counter()
            try:
                ms = _measure_dedicated(plan, knobs, A, B, index, device, DEFAULT_EVALUATOR, check=True)
                error = None
            except Exception as exc:  # one failing setting must not end the sweep
                ms, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
            spent = time.perf_counter() - begin
            ideal = dense * density
            line = f"{name:6s} {sparsity:4s} {' '.join(f'{k}={v}' for k, v in knobs.__dict__.items())}"
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
