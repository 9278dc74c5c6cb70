"""
Tuning PIT kernels, and choosing the micro-tile at run time
==========================================================

In this tutorial you will tune PIT's kernels once and let every later call choose from what
was measured.

You will learn about:

* the tuner behind ``pit-tune``: each template's knobs as a search space, every candidate
  checked against dense torch once, then timed by TVM on the target;
* the tile database: what its keys hold, how to read it, and how to ship it with a model;
* the cost model: a fitted line per kernel, a fine pattern re-covered by a coarser micro-tile,
  and the dense fallback;
* ``pit.sparse_matmul(..., micro_tile="auto")`` and ``pit.select_micro_tile``.
"""

# %%
# Motivation
# ----------
# PIT lists the non-empty micro-tiles of a sparse operand and multiplies only those. Which
# micro-tile finishes first depends on the pattern actually seen: scattered 32x1 column pieces
# are best listed as 32x1, but when the zeros come in 32x32 blocks, listing 32x32 tiles does the
# same work in 32 times fewer, denser pieces. And when little is zero, dense ``torch.matmul``
# wins. Nobody knows the pattern before run time, so PIT measures offline and decides online.

import tempfile
from pathlib import Path

import torch
from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

import pit_compiler as pit
from pit_compiler.tuning import TileDatabase, format_report, set_tile_database, tune_matmul
from pit_compiler.tuning.cost_model import kernel_model

# %%
# Tune from Python
# ----------------
# ``tune_matmul`` is what ``pit-tune matmul`` runs. For each micro-tile it builds every knob
# setting of the kernel that will run (``CpuParallel`` here; on a GPU ``SimtThreads``, or the
# tensor-core tile's own knobs where 16-bit products run on tensor cores: on Hopper the
# warpgroup tile's columns, stages and MMA overlap), checks it against
# dense torch once, and times it at each sparsity with TVM's
# ``time_evaluator`` (CUDA events on a GPU). Each point is saved the moment it is taken, so a
# run stopped with Ctrl-C resumes where it stopped. The command line equivalent is::
#
#     pit-tune matmul --shape 128x128x128 --micro-tile 32x1,32x32 --sparsity 0.5,0.9,0.99 --db tiles.json

scratch = tempfile.TemporaryDirectory(prefix="pit-tutorial-")  # removed when Python exits
workdir = Path(scratch.name)
db = TileDatabase(workdir / "tiles.json")  # pit-tune's default is $PIT_CACHE_DIR/tiles.json
QUICK = EvaluatorConfig(number=1, repeat=3, min_repeat_ms=5, enable_cpu_cache_flush=False)
SHAPE = (128, 128, 128)  # M, N, K

report = tune_matmul(SHAPE, "float32", [(32, 1), (32, 32)], [0.5, 0.9, 0.99], database=db, evaluator=QUICK)
print(format_report(report))

# %%
# Inside the database
# -------------------
# An entry's key is the hash of everything its measurements depend on: the operator's PIT
# signature, the shape bucket (powers of two per axis), dtype, micro-tile, target, the TVM,
# codegen and template versions. Entries of another version never match; they stay in the file
# until it is rebuilt. ``pit-tune list`` and ``pit-tune show KEY`` print the same.

for key, entry in sorted(db.entries().items(), key=lambda item: item[1]["workload"]["op"]):
    workload = entry["workload"]
    model = kernel_model(entry) if workload["op"] == "pit_matmul" else None
    line = f"ms = {model.line.a:.4f} + {model.line.b:.3g} * listed, knobs {model.knobs}" if model else ""
    print(key[:12], workload["op"], workload.get("micro_tile", ""), workload["bucket"], line)

# %%
# Choosing at run time
# --------------------
# ``select_micro_tile`` detects the operand at every tuned granularity (on its device), counts
# the listed micro-tiles, and predicts each candidate's time: detection plus its fitted line,
# next to the measured dense time. We try three patterns of A: scattered 32x1 pieces, 32x32
# blocks, and no zeros at all. ``sparse_matmul(..., micro_tile="auto")`` makes the same choice
# without waiting for the device: from a shape's second call on it predicts from the counts
# of earlier calls, detecting only the micro-tile it runs and, in turn, one rival (one call in
# eight where every rival is predicted far slower), so it follows a changed pattern a few calls
# late (its product is exact all along).


def pattern(tile, sparsity, shape=SHAPE[::2], seed=0):
    """A (M, K) matrix whose ``tile`` pieces are empty with probability ``sparsity``."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = tile
    keep = torch.rand(shape[0] // rows, shape[1] // cols, generator=generator) >= sparsity
    mask = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return torch.randn(shape, generator=generator) * mask


B = torch.randn(SHAPE[2], SHAPE[1])
patterns = {"scattered 32x1": pattern((32, 1), 0.95), "blocky 32x32": pattern((32, 32), 0.9), "dense": pattern((1, 1), 0.0)}

set_tile_database(db)  # what micro_tile="auto" reads; the default is pit-tune's file
try:
    for name, A in patterns.items():
        choice = pit.select_micro_tile(A, B)
        times = ", ".join(f"{label} {ms:.4f} ms" for label, ms in sorted(choice.predicted_ms.items()))
        print(f"{name:>15}: runs {choice.label:>6}   predicted {times}   listed {choice.listed}")
        torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile="auto"), A @ B, rtol=1e-5, atol=1e-4)
    # Without the dense fallback, the choice among PIT kernels alone:
    for name, A in patterns.items():
        print(f"{name:>15}: PIT only -> {pit.select_micro_tile(A, B, dense=False).label}")
finally:
    set_tile_database(None)

# %%
# Shipping the database
# ---------------------
# Tuned once on the deployment GPU, the database travels with the model:
# ``pit-tune export tiles-h100.json`` there, ``pit-tune import tiles-h100.json`` here (a
# merge: of two measurements of one point, the later wins). Keys carry the target, so H100
# entries are used only on an H100's architecture.

print("exported", db.export(workdir / "shipped.json"), "entries")


def test_tuning_tutorial(tmp_path):
    small = TileDatabase(tmp_path / "tiles.json")
    fast = EvaluatorConfig(number=1, repeat=1, min_repeat_ms=1, enable_cpu_cache_flush=False)
    options = dict(database=small, evaluator=fast, progress=False)
    first = tune_matmul((64, 64, 64), "float32", [(32, 1), (32, 32)], [0.5, 0.9], **options)
    assert [k.measured for k in first.kernels] == [4, 4]
    again = tune_matmul((64, 64, 64), "float32", [(32, 1), (32, 32)], [0.5, 0.9], **options)
    assert [k.measured for k in again.kernels] == [0, 0]  # everything came from the database

    B = torch.randn(64, 64)
    scattered, blocky, dense = pattern((32, 1), 0.9, (64, 64), 1), pattern((32, 32), 0.5, (64, 64), 2), torch.randn(64, 64)
    set_tile_database(small)
    try:
        choices = [pit.select_micro_tile(A, B) for A in (scattered, blocky, dense)]
        for A, choice in zip((scattered, blocky, dense), choices):
            assert choice.source == "database"
            assert choice.label == min(choice.predicted_ms, key=choice.predicted_ms.get)
            torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile="auto"), A @ B, rtol=1e-5, atol=1e-4)
    finally:
        set_tile_database(None)
    # Blocks are listed whole at either granularity; no zeros lists every tile.
    assert choices[1].listed["32x1"] == 32 * choices[1].listed["32x32"]
    assert choices[2].listed == {"32x1": 128, "32x32": 4}

    small.export(tmp_path / "shipped.json")
    assert TileDatabase(tmp_path / "other.json").import_file(tmp_path / "shipped.json") == (3, 11)


# %%
# Benchmark
# ---------
# Median time of ``micro_tile="auto"`` against each fixed micro-tile and dense, over patterns
# of several granularities (``benchmarks/tuning.py`` runs the full version on a GPU).

if __name__ == "__main__":
    import statistics
    import time

    def median_ms(fn, repeat=10):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    set_tile_database(db)
    try:
        print(f"{'pattern':>15} {'auto':>8} {'32x1':>8} {'32x32':>8} {'dense':>8}")
        for name, A in patterns.items():
            row = [median_ms(lambda: pit.sparse_matmul(A, B, micro_tile="auto"))]
            row += [median_ms(lambda t=t: pit.sparse_matmul(A, B, micro_tile=t)) for t in ((32, 1), (32, 32))]
            row.append(median_ms(lambda: A @ B))
            print(f"{name:>15} " + " ".join(f"{ms:8.3f}" for ms in row))
    finally:
        set_tile_database(None)
