"""Tuning: tuned PIT kernels against untuned defaults, cuBLAS and Triton BSR; auto selection against the best fixed choice.

Run on a GPU machine: ``python benchmarks/tuning.py`` (sizes 4096³ and 8192³, float16). For
each size it tunes the micro-tiles into a fresh tile database (recording the tuning time per
kernel), then times, at each sparsity, ``pit.sparse_matmul`` with the tuned knobs and with the
template defaults, ``torch.mm`` (cuBLAS) and Triton BSR (``torch.sparse._triton_ops``, square
tiles, where it imports). Last, over random patterns of several granularities, it compares
``micro_tile="auto"`` with the best fixed micro-tile (or dense) for that pattern and reports
how often auto picked the fastest and was within 5 % of it, timing each call alone on an idle
GPU (its host time in full) and calls queued back to back (host and GPU overlapping, as along a
model's forward). Every output is checked against the dense product before it is timed.
Writes ``benchmarks/results/tuning-<gpu>.json`` and, with matplotlib, a PNG.
``--quick --sizes 128`` smoke-tests it on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_compiler as pit  # noqa: E402
from common import device_name, pyplot, time_ms, write_json  # noqa: E402
from pit_compiler.tuning import TileDatabase, format_report, set_tile_database, tune_matmul  # noqa: E402
from pit_compiler.tuning.tuner import DEFAULT_EVALUATOR  # noqa: E402

log = logging.getLogger("pit_compiler.benchmarks")


def parse_tile(text: str) -> tuple:
    rows, cols = text.split("x")
    return (int(rows), None if cols == "all" else int(cols))


def label(tile) -> str:
    return "x".join("all" if t is None else str(t) for t in tile)


def pattern(M, K, tile, sparsity, dtype, device, seed):
    """A (M, K) matrix whose ``tile`` pieces are empty with probability ``sparsity``."""
    rows, cols = tile[0], tile[1] or K
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(math.ceil(M / rows), math.ceil(K / cols), generator=generator) >= sparsity
    mask = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:M, :K]
    return (torch.randn(M, K, generator=generator) * mask).to(device=device, dtype=dtype)


def checked(fn, reference, dtype) -> bool:
    out = fn().float()
    error = ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()
    return error < (1e-4 if dtype == torch.float32 else 1e-2)


def triton_bsr(A, B, tile):
    if not A.is_cuda or tile[0] != tile[1] or tile[0] not in (16, 32, 64, 128):
        return None
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError as error:
        log.info("Triton BSR unavailable: %s", error)
        return None
    return None if bsr_dense_mm is None else (lambda: bsr_dense_mm(A.to_sparse_bsr(tile), B))


BACK_TO_BACK = 20  # calls per sample where calls are queued back to back


def time_with(database, fn, device, repeat, batch=1):
    """Time ``fn`` with ``database`` as the process-wide tile database (its knobs, its choices);
    ``batch`` calls per sample (:func:`pit_compiler.testing.do_bench`)."""
    set_tile_database(database)
    try:
        fn()  # build or load kernels outside the timing
        return time_ms(fn, device, repeat=repeat, batch=batch)["median_ms"]
    finally:
        set_tile_database(None)


def kernels_case(size, tiles, sparsities, dtype, device, db, repeat, seed):
    """Tuned knobs against defaults, cuBLAS and Triton BSR, per micro-tile and sparsity."""
    records, untuned = [], TileDatabase(None)
    B = torch.randn(size, size, device=device, dtype=dtype)
    for tile in tiles:
        for sparsity in sparsities:
            A = pattern(size, size, tile, sparsity, dtype, device, seed)
            reference = torch.mm(A.float(), B.float())
            # The PIT kernels themselves: no dense fallback, which would time cuBLAS instead.
            impls = {
                "pit_tuned": (db, lambda: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False)),
                "pit_default": (untuned, lambda: pit.sparse_matmul(A, B, micro_tile=tile, dense_fallback=False)),
                "cublas": (untuned, lambda: torch.mm(A, B)),
            }
            bsr = triton_bsr(A, B, tile)
            if bsr is not None:
                impls["triton_bsr"] = (untuned, bsr)
            for impl, (database, fn) in impls.items():
                try:
                    set_tile_database(database)
                    ok = checked(fn, reference, dtype)
                    set_tile_database(None)
                    ms = time_with(database, fn, device, repeat)
                except (RuntimeError, NotImplementedError, ValueError) as failure:
                    log.info("%s failed at %s %.2f: %s", impl, label(tile), sparsity, str(failure).splitlines()[0])
                    continue
                finally:
                    set_tile_database(None)
                records.append({"section": "kernels", "size": size, "micro_tile": label(tile), "sparsity": sparsity,
                                "impl": impl, "checked": ok, "median_ms": ms})
                log.info("%5d %-6s %4.0f%% %-12s %9.3f ms checked=%s", size, label(tile), 100 * sparsity, impl, ms, ok)
    return records


def auto_case(size, tiles, granularities, sparsities, seeds, dtype, device, db, repeat):
    """``micro_tile="auto"`` against every fixed tuned micro-tile and dense, per random pattern."""
    records = []
    B = torch.randn(size, size, device=device, dtype=dtype)
    for granularity in granularities:
        for sparsity in sparsities:
            for seed in range(seeds):
                A = pattern(size, size, granularity, sparsity, dtype, device, 100 + seed)
                reference = torch.mm(A.float(), B.float())
                # Each fixed micro-tile as its kernel (the cost model predicts kernels; dense is its own candidate).
                fixed = {
                    label(t): (lambda t=t: pit.sparse_matmul(A, B, micro_tile=t, dense_fallback=False)) for t in tiles
                }
                fixed["dense"] = lambda: torch.mm(A, B)
                times = {name: time_with(db, fn, device, repeat) for name, fn in fixed.items()}
                queued = {name: time_with(db, fn, device, repeat, BACK_TO_BACK) for name, fn in fixed.items()}
                auto = lambda: pit.sparse_matmul(A, B, micro_tile="auto")  # noqa: E731
                set_tile_database(db)
                try:
                    ok = checked(auto, reference, dtype)
                    choice = pit.select_micro_tile(A, B)
                finally:
                    set_tile_database(None)
                auto_ms = time_with(db, auto, device, repeat)
                auto_queued_ms = time_with(db, auto, device, repeat, BACK_TO_BACK)
                best, best_queued = min(times, key=times.get), min(queued, key=queued.get)
                within = auto_ms <= 1.05 * times[best]
                within_queued = auto_queued_ms <= 1.05 * queued[best_queued]
                records.append({"section": "auto", "size": size, "pattern": label(granularity), "sparsity": sparsity,
                                "seed": seed, "auto_choice": choice.label, "auto_ms": auto_ms, "checked": ok,
                                "predicted_ms": choice.predicted_ms, "fixed_ms": times, "best": best,
                                "best_ms": times[best], "within_5pct": within, "picked_best": choice.label == best,
                                "auto_back_to_back_ms": auto_queued_ms, "fixed_back_to_back_ms": queued,
                                "within_5pct_back_to_back": within_queued})
                log.info("%5d pattern %-6s %4.0f%% auto->%-6s %9.3f ms, best %-6s %9.3f ms %s; back to back %.3f against %.3f %s",
                         size, label(granularity), 100 * sparsity, choice.label, auto_ms, best, times[best],
                         "ok" if within else "SLOWER", auto_queued_ms, queued[best_queued], "ok" if within_queued else "SLOWER")
    return records


def prediction_errors(autos) -> dict:
    """Per candidate (and over all): relative error of the cost model's prediction against the
    time measured for that candidate on the same pattern."""
    by_candidate: dict[str, list[float]] = {}
    for r in autos:
        for name, predicted in r["predicted_ms"].items():
            measured = r["fixed_ms"].get(name)
            if measured:
                error = abs(predicted - measured) / measured
                by_candidate.setdefault(name, []).append(error)
                by_candidate.setdefault("all", []).append(error)
    return {
        name: {"median": statistics.median(errors), "max": max(errors), "patterns": len(errors)}
        for name, errors in by_candidate.items()
    }


def plot(records, path: Path):
    plt = pyplot()
    if plt is None:
        return
    kernels = [r for r in records if r["section"] == "kernels"]
    autos = [r for r in records if r["section"] == "auto"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    cases = sorted({(r["size"], r["micro_tile"], r["sparsity"]) for r in kernels})
    impls = sorted({r["impl"] for r in kernels})
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = [next((r["median_ms"] for r in kernels if r["impl"] == impl
                        and (r["size"], r["micro_tile"], r["sparsity"]) == c), 0) for c in cases]
        left.bar([c + i * width for c in range(len(cases))], values, width, label=impl)
    left.set_xticks([c + 0.4 for c in range(len(cases))], [f"{s}\n{t}\n{p:.0%}" for s, t, p in cases], fontsize=6)
    left.set_yscale("log")
    left.set_ylabel("ms")
    left.legend(fontsize=7)
    left.set_title(f"tuned vs default knobs vs cuBLAS / Triton BSR on {records[0]['gpu']}", fontsize=9)
    right.scatter([r["best_ms"] for r in autos], [r["auto_ms"] for r in autos], s=10)
    top = max([r["auto_ms"] for r in autos] + [r["best_ms"] for r in autos] + [1e-3])
    right.plot([0, top], [0, top], "k--", linewidth=0.5)
    right.plot([0, top], [0, 1.05 * top], "k:", linewidth=0.5)
    right.set_xlabel("best fixed choice, ms")
    right.set_ylabel("micro_tile='auto', ms")
    share = sum(r["within_5pct"] for r in autos) / max(len(autos), 1)
    right.set_title(f"auto within 5 % of the best in {share:.0%} of {len(autos)} patterns", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,8192", help="comma list of M=N=K (default 4096,8192)")
    parser.add_argument("--dtype", default=None, help="default float16 on a GPU, float32 on a CPU")
    parser.add_argument("--micro-tiles", default="32x1,1x32,32x32,64x64", help="tuned micro-tiles")
    parser.add_argument("--sparsities", default="0.5,0.9,0.95,0.99", help="tuned and timed sparsities")
    parser.add_argument("--patterns", default="1x1,4x1,32x1,1x32,16x16,32x32,64x64", help="granularities for auto")
    parser.add_argument("--seeds", type=int, default=2, help="random patterns per granularity and sparsity")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--db", help="tile database to tune into (default: a fresh temporary file)")
    parser.add_argument("--quick", action="store_true", help="a few micro-tiles, sparsities and patterns")
    args = parser.parse_args(argv)
    if args.quick:
        args.micro_tiles, args.sparsities, args.patterns, args.seeds = "32x1,32x32", "0.5,0.95", "32x1,32x32", 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    tiles = [parse_tile(t) for t in args.micro_tiles.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    granularities = [parse_tile(t) for t in args.patterns.split(",")]
    evaluator = DEFAULT_EVALUATOR._replace(repeat=3, min_repeat_ms=10) if args.quick else DEFAULT_EVALUATOR
    db = TileDatabase(args.db or Path(tempfile.mkdtemp(prefix="pit-tuning-")) / "tiles.json")
    gpu, records = device_name(device), []
    for size in map(int, args.sizes.split(",")):
        report = tune_matmul((size, size, size), str(dtype).removeprefix("torch."), tiles, sparsities,
                             database=db, trials=args.trials, evaluator=evaluator, progress=False)
        log.info("%s", format_report(report))
        for kernel in report.kernels:
            records.append({"section": "tuning", "size": size, "micro_tile": label(kernel.micro_tile), "form": kernel.form,
                            "tuning_s": kernel.tuning_s, "measured": kernel.measured, "best_knobs": kernel.best_knobs,
                            "a_ms": kernel.a_ms, "b_ms_per_listed": kernel.b_ms, "detect_ms": kernel.detect_ms})
        records += kernels_case(size, tiles, sparsities, dtype, device, db, args.repeat, seed=0)
        records += auto_case(size, tiles, granularities, sparsities, args.seeds, dtype, device, db, args.repeat)
    autos = [r for r in records if r["section"] == "auto"]
    shares = {field: sum(r[field] for r in autos) / max(len(autos), 1)
              for field in ("within_5pct", "within_5pct_back_to_back", "picked_best")}
    errors = prediction_errors(autos)
    records.append({"section": "summary", "auto_within_5pct": shares["within_5pct"],
                    "auto_within_5pct_back_to_back": shares["within_5pct_back_to_back"],
                    "auto_picked_best": shares["picked_best"], "patterns": len(autos), "database": str(db.path),
                    "dtype": str(dtype).removeprefix("torch."), "prediction_error": errors})
    for record in records:
        record["gpu"] = gpu
    log.info("auto within 5 %% of the best fixed choice in %.0f %% of %d patterns (%.0f %% with calls back to back); "
             "it picked the fastest in %.0f %%", 100 * shares["within_5pct"], len(autos),
             100 * shares["within_5pct_back_to_back"], 100 * shares["picked_best"])
    for name, error in errors.items():
        log.info("cost model %-6s median |predicted - measured| / measured %5.1f %% (max %5.1f %%, %d patterns)",
                 name, 100 * error["median"], 100 * error["max"], error["patterns"])
    path = write_json(records, "tuning", device)
    plot(records, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
