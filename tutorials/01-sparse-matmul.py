"""
Sparse matrix multiplication with PIT
=====================================

In this tutorial you will multiply a dynamically sparse matrix by a dense one with PIT.

You will learn about:

* how PIT decides, per axis, whether an operator is permutation invariant;
* what a micro-tile is, and how the micro-tile picks the kernel form;
* the index that online detection builds on the tensor's own device;
* the generated TIR, and checking the result against dense PyTorch before timing it.
"""

# %%
# Motivation
# ----------
# A ReLU output, a routed batch or a pruned weight is full of zeros, but not in blocks a
# block-sparse kernel would like: it is zero in small pieces scattered anywhere. PIT's
# observation is that for ``C[m, n] += A[m, k] * B[k, n]`` the order of the k axis does not
# matter (addition commutes), and neither does the order of m, as long as every output row is
# written back to its own place. So the non-empty pieces can be *gathered* into dense tiles.

import torch

import pit_compiler as pit
from pit_compiler.testing import do_bench

print(pit.derive_pit_rules("C[m, n] += A[m, k] * B[k, n]"))
rules = pit.derive_pit_rules("O[p, f] += I[p + r, c] * W[r, c, f]")
print(rules)
print("p:", rules.explain("p"))

# %%
# A sparse operand
# ----------------
# We zero 90 % of the 32x1 column pieces of A: 32 rows by one column, the shape a ReLU leaves
# when a feature is silent for a block of 32 tokens.


def make_sparse(M, K, micro_tile, sparsity, device="cpu", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = micro_tile
    keep = torch.rand((M + rows - 1) // rows, (K + cols - 1) // cols, generator=generator) >= sparsity
    mask = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:M, :K]
    return (torch.randn(M, K, generator=generator) * mask).to(device=device, dtype=dtype)


A = make_sparse(300, 200, (32, 1), 0.9)
B = torch.randn(200, 120)

# %%
# Detection: the index PIT gathers by
# -----------------------------------
# A generated kernel lists, for each block of 32 rows, the columns that hold any non-zero.
# It runs where the tensor lives (here the CPU, on a GPU the GPU), with no copy to the host.

index = pit.detect_micro_tiles(A, (32, 1))
print("row blocks:", index.counts.shape[1], "listed columns per block:", index.counts[0].tolist())

# %%
# The PIT kernel, checked against dense PyTorch
# ---------------------------------------------
# A 32x1 micro-tile permutes k, the reduction axis: each block of 32 output rows sums over
# its own listed columns, so the output needs no scatter ("reduce" form). A 1x32 micro-tile
# would permute m instead: rows gathered, computed and added back ("scatter" form). Each chunk
# of 32 columns then lists its own rows, so partial rows of several chunks meet in the output:
# on a Hopper GPU PIT's strips kernel adds them with atomics, which pays off only where few
# pieces are listed (about 4 % or fewer at 8192^3); elsewhere PIT runs cuBLAS.

C = pit.sparse_matmul(A, B, micro_tile=(32, 1))
torch.testing.assert_close(C, A @ B, rtol=1e-5, atol=1e-4)
C_rows = pit.sparse_matmul(A, B, micro_tile=(1, 32))
torch.testing.assert_close(C_rows, A @ B, rtol=1e-5, atol=1e-4)
print("both forms match dense torch")

# %%
# What was generated
# ------------------
# The kernel is TIR built by the PIT transformation; the schedule template for the target
# decides which loops run in parallel.

from pit_compiler.codegen import build_pit_matmul  # noqa: E402
from pit_compiler.ir import SparsityAttr, as_contraction, plan_pit  # noqa: E402

plan = plan_pit(as_contraction("C[m, n] += A[m, k] * B[k, n]"), SparsityAttr("A", (32, 1)), {"m": 300, "n": 120, "k": 200})
print(plan.signature())
print(build_pit_matmul(plan, "float32", "float32", atomic=False).script())


def test_sparse_matmul_tutorial():
    for micro_tile in [(32, 1), (1, 32), (1, None)]:
        A = make_sparse(77, 65, micro_tile if micro_tile[1] else (1, 65), 0.5, seed=1)
        B = torch.randn(65, 19)
        torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile=micro_tile), A @ B, rtol=1e-5, atol=1e-4)


# %%
# Benchmark
# ---------
# Median time over a sweep of sparsities, detection included, against dense ``A @ B``, with
# the 20th and 80th percentiles. On a GPU this times with CUDA events.


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = 2048 if device == "cuda" else 512
    B = torch.randn(size, size, device=device, dtype=dtype)
    print(f"{'sparsity':>8} {'PIT ms (p50 [p20, p80])':>28} {'dense ms':>9}")
    for sparsity in [0.0, 0.5, 0.9, 0.99]:
        A = make_sparse(size, size, (32, 1), sparsity, device, dtype)
        timing = do_bench(lambda: pit.sparse_matmul(A, B, micro_tile=(32, 1)), device, repeat=10)
        dense = do_bench(lambda: A @ B, device, repeat=10)
        print(f"{sparsity:>8.2f} {str(timing):>28} {dense.median_ms:>9.3f}")
