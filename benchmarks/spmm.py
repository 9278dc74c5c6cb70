"""Sparse x dense matmul: PIT against cuBLAS, cuSPARSE CSR, Triton BSR and a plain row gather.

Run on a GPU machine: ``python benchmarks/spmm.py`` (``--quick`` for a small subset). For each
size, micro-tile, sparsity and dtype it builds A with that fraction of its micro-tiles empty,
checks every implementation's output against the dense product, then times it (CUDA events,
median after warm-up, detection and format conversion included where an implementation needs
them at run time). The ideal line is ``dense cuBLAS time x density``; each record carries the
fraction of it reached. PIT's online detection and index alone is timed too (``pit_detect``:
its fraction of the dense product's time, the budget being 0.1, and the bandwidth it reads A
at), and checked against the micro-tiles A really has. Writes
``benchmarks/results/spmm-<gpu>.json`` and, with matplotlib, a PNG of fraction-of-ideal per case.
Each call is timed alone on an idle GPU, so its host time counts in full; ``--batch N`` times
N calls queued back to back instead, as a model's layers run (``spmm-batch<N>-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_compiler as pit  # noqa: E402
from common import device_name, pyplot, time_ms, write_json  # noqa: E402

log = logging.getLogger("pit_compiler.benchmarks")

MICRO_TILES = {"row": (1, None), "32x1": (32, 1), "1x32": (1, 32), "1x64": (1, 64), "32x32": (32, 32), "64x64": (64, 64)}


def sparse_operand(M, K, tile, sparsity, dtype, device, seed=0):
    rows, cols = tile[0], tile[1] or K
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grid = (math.ceil(M / rows), math.ceil(K / cols))
    keep = torch.rand(grid, generator=generator) >= sparsity
    mask = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:M, :K]
    A = torch.randn(M, K, generator=generator) * mask
    return A.to(device=device, dtype=dtype), keep.float().mean().item()


def baselines(A, B, tile):
    """name -> callable computing A @ B, each paying its own format conversion."""
    impls = {"cublas": lambda: torch.mm(A, B)}
    rows, cols = tile[0], tile[1] or A.shape[1]
    if tile == (1, None):
        def row_gather():
            nonzero = A.abs().sum(1).nonzero().squeeze(1)
            out = torch.zeros(A.shape[0], B.shape[1], dtype=A.dtype, device=A.device)
            return out.index_copy_(0, nonzero, torch.mm(A.index_select(0, nonzero), B))

        impls["torch_rowgather"] = row_gather
    impls["cusparse_csr"] = lambda: torch.sparse.mm(A.to_sparse_csr(), B)
    if rows == cols and rows in (16, 32, 64, 128):
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
        except ImportError as error:
            log.info("Triton BSR unavailable: %s", error)
        else:
            if bsr_dense_mm is not None and A.is_cuda:  # None where Triton is missing
                impls["triton_bsr"] = lambda: bsr_dense_mm(A.to_sparse_bsr((rows, cols)), B)
    return impls


def detection(A, B, tile):
    """``(detect, check)``: PIT's detection and index of A as sparse_matmul runs it, and its check."""
    from pit_compiler.ir import SparsityAttr, plan_pit
    from pit_compiler.ops import index_for, matmul_contraction, operand_grid
    from pit_compiler.validation import normalize_micro_tile

    (M, K), N = A.shape, B.shape[1]
    tile = normalize_micro_tile(tile, (M, K))
    plan = plan_pit(matmul_contraction(2), SparsityAttr("A", tile), {"m": M, "n": N, "k": K})
    rows, cols = tile
    grid = (math.ceil(M / rows), math.ceil(K / cols))
    padded = torch.zeros(grid[0] * rows, grid[1] * cols, dtype=torch.bool, device=A.device)
    padded[:M, :K] = A.ne(0)
    expected = padded.view(grid[0], rows, grid[1], cols).any(3).any(1)

    def detect():
        return index_for(plan, A, None, tile, grid)

    return detect, lambda: torch.equal(operand_grid(plan, detect())[0], expected)


def run_case(M, N, K, name, sparsity, dtype, device, repeat, once_over_ms=float("inf"), batch=1):
    tile = MICRO_TILES[name]
    A, density = sparse_operand(M, K, tile, sparsity, dtype, device)
    B = torch.randn(K, N, device=device, dtype=dtype)
    reference = torch.mm(A.float(), B.float())
    impls = {
        "pit": lambda: pit.sparse_matmul(A, B, micro_tile=tile),  # as users call it: dense where that wins
        "pit_kernel": lambda: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False),  # PIT's kernels only
    }
    impls.update(baselines(A, B, tile))
    records, dense_ms = [], None
    for impl, fn in impls.items():
        try:
            out = fn()
            error = ((out.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()
            checked = error < (1e-2 if dtype != torch.float32 else 1e-4)
            # A second call before timing: PIT picks some tiles by earlier calls' counts, and
            # builds the kernel it picks the first time it does.
            fn()
            once = time_ms(fn, device, warmup=0, repeat=1)
            timing = once if once["median_ms"] > once_over_ms else time_ms(fn, device, repeat=repeat, batch=batch)
        except (RuntimeError, NotImplementedError, ValueError) as failure:
            log.info("%s failed at %s %s %.2f: %s", impl, name, dtype, sparsity, str(failure).splitlines()[0])
            continue
        if impl == "cublas":
            dense_ms = timing["median_ms"]
        runs = 1 if timing is once else repeat
        records.append({"impl": impl, "checked": checked, "relative_error": error, "repeat": runs,
                        "batch": 1 if timing is once else batch, **timing})
    detect, check = detection(A, B, tile)
    timing = time_ms(detect, device, repeat=repeat, batch=batch)
    detect_ms = timing["median_ms"]
    records.append({"impl": "pit_detect", "checked": check(), "batch": batch, **timing,
                    "detect_fraction_of_dense": detect_ms / dense_ms if dense_ms else None,
                    "read_gb_per_s": A.numel() * A.element_size() / detect_ms / 1e6})
    ideal = dense_ms * density if dense_ms else None
    for record in records:
        record.update({"M": M, "N": N, "K": K, "micro_tile": name, "sparsity": sparsity, "density": density,
                       "dtype": str(dtype).removeprefix("torch."), "ideal_ms": ideal,
                       "fraction_of_ideal": ideal / record["median_ms"] if ideal and record["impl"] != "pit_detect" else None})
    return records


def plot(records, path: Path):
    plt = pyplot()
    if plt is None:
        return
    groups = sorted({(r["M"], r["dtype"]) for r in records})
    impls = sorted({r["impl"] for r in records if r["impl"] not in ("cublas", "pit_detect")})
    cases = sorted({(r["micro_tile"], r["sparsity"]) for r in records})
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8, len(cases) * 0.45), 3.2 * len(groups)), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for ax, (size, dtype) in zip(axes[:, 0], groups):
        for i, impl in enumerate(impls):
            values = [
                next((r["fraction_of_ideal"] or 0 for r in records if r["impl"] == impl and r["M"] == size
                      and r["dtype"] == dtype and (r["micro_tile"], r["sparsity"]) == case), 0)
                for case in cases
            ]
            ax.bar([c + i * width for c in range(len(cases))], values, width, label=impl)
        ax.set_xticks([c + 0.4 for c in range(len(cases))], [f"{t}\n{s:.0%}" for t, s in cases], fontsize=7)
        ax.set_ylabel("fraction of ideal")
        ax.set_yscale("log")
        ax.set_title(f"{size}³ {dtype} on {records[0]['gpu']} (ideal = cuBLAS time x density)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


LABELS = {"row": "whole rows", "32x1": "32×1", "1x32": "1×32", "1x64": "1×64", "32x32": "32×32", "64x64": "64×64"}
TABLE_IMPLS = ("cublas", "cusparse_csr", "triton_bsr", "torch_rowgather")


def table(records, dtype: str = "float16", sparsities=(0.0, 0.5, 0.9, 0.99)) -> str:
    """A markdown table of one dtype's records (benchmarks/RESULTS.md's): PIT with its fraction of ideal,
    PIT's kernels alone (``dense_fallback=False``), the baselines, and detection's share."""

    def ms(value):
        return "–" if value is None else (f"{value:.3g} ms" if value < 10 else f"{value:.0f} ms")

    cases = {}
    for r in records:
        if r["dtype"] == dtype and r["sparsity"] in sparsities:
            cases.setdefault((r["M"], list(LABELS).index(r["micro_tile"]), r["sparsity"]), {})[r["impl"]] = r
    head = ["size", "micro-tile", "sparsity", "PIT", "of ideal", "PIT kernels alone", "cuBLAS", "cuSPARSE CSR",
            "Triton BSR", "torch row gather", "PIT detection (of dense)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (size, tile, sparsity), impls in sorted(cases.items()):
        get = lambda impl: impls[impl]["median_ms"] if impl in impls else None  # noqa: E731
        pit, detect = impls.get("pit"), impls.get("pit_detect")
        fraction = f"{pit['fraction_of_ideal']:.3f}" if pit and pit["fraction_of_ideal"] else "–"
        share = f"{ms(get('pit_detect'))} ({detect['detect_fraction_of_dense']:.2f})" if detect else "–"
        row = [f"{size}³", LABELS[list(LABELS)[tile]], f"{sparsity:.0%}", ms(get("pit")), fraction, ms(get("pit_kernel")),
               *(ms(get(impl)) for impl in TABLE_IMPLS), share]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,8192", help="comma list of M=N=K")
    parser.add_argument("--micro-tiles", default=",".join(MICRO_TILES), help="comma list of " + ",".join(MICRO_TILES))
    parser.add_argument("--sparsities", default="0,0.5,0.9,0.95,0.99")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="4096, fp16, 32x1 and row, 0/90/99 %%")
    parser.add_argument("--merge", action="store_true", help="keep the results file's other cases (replace only these)")
    parser.add_argument("--once-over-ms", type=float, default=200.0,
                        help="an implementation whose call takes longer is timed once (repeat 1), not --repeat times")
    parser.add_argument("--batch", type=int, default=1,
                        help="calls queued per timed sample (back to back, as a model's layers run; host and GPU "
                             "overlap); over 1 the results go to spmm-batch<N>-<gpu>.json")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the markdown table of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        for dtype in args.dtypes.split(","):
            print(f"\n{dtype}:\n" + table(json.loads(args.table.read_text()), dtype))
        return 0
    if args.quick:
        args.sizes, args.micro_tiles, args.sparsities, args.dtypes = "4096", "row,32x1", "0,0.9,0.99", "float16"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device_name(device)
    records = []
    for size in map(int, args.sizes.split(",")):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for name in args.micro_tiles.split(","):
                for sparsity in map(float, args.sparsities.split(",")):
                    case = (size, size, size, name, sparsity, dtype, device, args.repeat, args.once_over_ms, args.batch)
                    for record in run_case(*case):
                        record["gpu"] = gpu
                        records.append(record)
                        frac = record["fraction_of_ideal"] or record.get("detect_fraction_of_dense")
                        label = "of-dense" if record["impl"] == "pit_detect" else "ideal-frac"
                        log.info("%5d %-9s %-5s %4.0f%% %-16s %9.3f ms  %s %s  checked=%s", size,
                                 record["dtype"], name, 100 * sparsity, record["impl"], record["median_ms"],
                                 label, f"{frac:.3f}" if frac else "-", record["checked"])
    merge_on = ("M", "dtype", "micro_tile", "sparsity", "impl") if args.merge else None
    path = write_json(records, "spmm" if args.batch == 1 else f"spmm-batch{args.batch}", device, merge_on=merge_on)
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
