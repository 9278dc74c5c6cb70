"""One-off GPU check: large shapes the unit tests do not reach (int32 launch ranges, timing)."""
import torch

import pit_compiler as pit
from pit_compiler.testing import do_bench

torch.manual_seed(0)
for M, tile, sparsity in [(4096, (1, 32), 0.9), (8192, (1, None), 0.9), (8192, (32, 1), 0.9)]:
    K = N = M
    rows, cols = tile[0], tile[1] or K
    keep = torch.rand(M // rows, K // cols, device="cuda") >= sparsity
    A = torch.randn(M, K, device="cuda", dtype=torch.float16) * keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    B = torch.randn(K, N, device="cuda", dtype=torch.float16)
    C = pit.sparse_matmul(A, B, micro_tile=tile)
    ref = A.float() @ B.float()
    err = ((C.float() - ref).norm() / ref.norm()).item()
    pit_t = do_bench(lambda: pit.sparse_matmul(A, B, micro_tile=tile), "cuda", repeat=10)
    dense_t = do_bench(lambda: A @ B, "cuda", repeat=10)
    print(f"{M}^3 fp16 {tile} {sparsity:.0%}: rel err {err:.1e}; PIT {pit_t}; cuBLAS {dense_t}", flush=True)
