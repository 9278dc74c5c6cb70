"""Public operators: sparse matmul and micro-tile detection on torch tensors."""

from __future__ import annotations

import functools
import math

import torch

from pit_compiler.codegen import detect_kernel, kernel_order, matmul_kernel
from pit_compiler.ir import Contraction, PITPlan, SparsityAttr, as_contraction, plan_pit
from pit_compiler.runtime import KernelCache, MicroTileIndex, default_cache_dir
from pit_compiler.targets import target_for
from pit_compiler.validation import (
    check_mask,
    check_matmul_operands,
    check_out,
    check_sparse,
    normalize_micro_tile,
    require_tensor,
)

_MATMUL = {2: "C[m, n] += A[m, k] * B[k, n]", 3: "C[b, m, n] += A[b, m, k] * B[b, k, n]"}
_TVM_DTYPE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float64: "float64",
}

_cache: KernelCache | None = None


def kernel_cache() -> KernelCache:
    """The process-wide kernel cache (on disk under :func:`default_cache_dir`)."""
    global _cache
    if _cache is None:
        _cache = KernelCache(default_cache_dir())
    return _cache


def set_kernel_cache(cache: KernelCache | None) -> None:
    """Replace the process-wide cache (``None``: a fresh one at the default place on next use)."""
    global _cache
    _cache = cache


@functools.lru_cache(maxsize=None)
def _contraction(ndim: int) -> Contraction:
    return as_contraction(_MATMUL[ndim])


def _tvm_dtype(dtype: torch.dtype, argument: str) -> str:
    if dtype not in _TVM_DTYPE:
        raise TypeError(f"{argument} has dtype {dtype}; PIT kernels read {list(_TVM_DTYPE)}")
    return _TVM_DTYPE[dtype]


def _batched(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Kernels read compact memory; bool is read as bytes (a free view)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _detect(
    s: torch.Tensor,
    order: tuple[str, ...],
    blocked: str,
    permuted: str,
    tiles: dict,
    whole_blocked: bool,
    argument: str,
) -> MicroTileIndex:
    """Run the detection kernel over ``s`` (3-D, stored in ``order``)."""
    extent = dict(zip(order, s.shape))
    blocks = 1 if whole_blocked else math.ceil(extent[blocked] / tiles[blocked])
    chunks = math.ceil(extent[permuted] / tiles[permuted])
    counts = torch.empty((extent["batch"], blocks), dtype=torch.int32, device=s.device)
    indices = torch.empty((extent["batch"], blocks, chunks), dtype=torch.int32, device=s.device)
    if s.numel() == 0:
        counts.zero_()
        return MicroTileIndex(counts, indices)
    kernel = detect_kernel(
        order,
        blocked,
        permuted,
        None if whole_blocked else tiles[blocked],
        tiles[permuted],
        _tvm_dtype(s.dtype, argument),
        target_for(s.device),
        kernel_cache(),
    )
    kernel(s, counts, indices)
    return MicroTileIndex(counts, indices)


def detect_micro_tiles(x: torch.Tensor, micro_tile=(32, 1), *, blocked: str = "rows") -> MicroTileIndex:
    """List the non-empty ``micro_tile`` pieces of ``x`` (2-D, or 3-D with a leading batch).

    ``blocked="rows"`` lists, per block of ``micro_tile[0]`` rows, the non-empty chunks of
    ``micro_tile[1]`` columns; ``blocked="cols"`` the transpose. Runs on ``x``'s device.
    """
    require_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D or batched 3-D, got shape {tuple(x.shape)}")
    if blocked not in ("rows", "cols"):
        raise ValueError(f"blocked must be 'rows' or 'cols', got {blocked!r}")
    tile = normalize_micro_tile(micro_tile, x.shape[-2:])
    order = ("batch", "rows", "cols")
    permuted = "cols" if blocked == "rows" else "rows"
    tiles = dict(zip(("rows", "cols"), tile))
    return _detect(_as_kernel_input(_batched(x)), order, blocked, permuted, tiles, False, "x")


def sparse_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    sparse: str = "A",
    micro_tile=(32, 1),
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    form: str | None = None,
) -> torch.Tensor:
    """``A @ B`` computed by PIT, skipping the empty micro-tiles of one operand.

    Args:
        A, B: ``(M, K)`` and ``(K, N)``, or batched ``(b, M, K)`` and ``(b, K, N)``; float32,
            float16 or bfloat16, on one CPU or CUDA device.
        sparse: the sparse operand: ``"A"``, ``"B"`` (e.g. pruned weights) or ``"C"`` (a sparse
            output: only tiles listed by ``mask`` are computed, the rest are zero).
        micro_tile: ``(rows, cols)`` of the sparse operand's smallest sparse unit, e.g.
            ``(32, 1)`` column pieces or ``(1, 64)`` row pieces; ``None`` spans a whole axis
            (``(1, None)``: whole rows).
        mask: which micro-tiles are non-empty, shaped like the sparse operand or like its
            micro-tile grid; non-zero marks kept. Without it the non-empty micro-tiles of the
            operand are detected on its device. Micro-tiles outside the mask are taken as zero.
        out: optional contiguous output to write into.
        form: force the kernel form (``"reduce"``, ``"scatter"``, ``"output"``); chosen from the
            micro-tile otherwise.
    """
    check_matmul_operands(A, B)
    sparse = check_sparse(sparse)
    M, K, N = A.shape[-2], A.shape[-1], B.shape[-1]
    out_shape = (*A.shape[:-2], M, N)
    operand_shape = {"A": (M, K), "B": (K, N), "C": (M, N)}[sparse]
    tile = normalize_micro_tile(micro_tile, operand_shape)
    grid = tuple(math.ceil(size / t) for size, t in zip(operand_shape, tile))
    batch = tuple(A.shape[:-2])
    if mask is not None:
        mask = check_mask(mask, None, batch + operand_shape, batch + grid, A.device)
    elif sparse == "C":
        raise ValueError("sparse='C' needs mask=: the output's non-empty micro-tiles are not known before it exists")
    out = check_out(out, out_shape, A.dtype, A.device) if out is not None else torch.empty(
        out_shape, dtype=A.dtype, device=A.device
    )
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()

    plan = plan_pit(_contraction(A.dim()), SparsityAttr(sparse, tile), {"m": M, "n": N, "k": K}, form)
    index = _index_for(plan, {"A": A, "B": B}.get(sparse), mask, tile, grid)
    _run_matmul(plan, _as_kernel_input(_batched(A)), _as_kernel_input(_batched(B)), _batched(out), index)
    return out


def _index_for(plan: PITPlan, operand, mask, tile, grid) -> MicroTileIndex:
    """Detect the listed micro-tiles from the mask (if given) or from the operand itself."""
    order = kernel_order(plan, plan.sparse)
    roles = tuple(r for r in order if r != "batch")
    source = operand if mask is None else mask
    by_grid = mask is not None and tuple(mask.shape[-2:]) == grid
    tiles = dict(zip(roles, (1, 1) if by_grid else tile))
    whole_blocked = plan.form == "scatter" and not plan.accumulate
    argument = "mask" if mask is not None else plan.sparse.upper()
    return _detect(_as_kernel_input(_batched(source)), order, plan.blocked, plan.permuted, tiles, whole_blocked, argument)


def _run_matmul(plan: PITPlan, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, index: MicroTileIndex) -> None:
    target = target_for(A.device)
    dtype = _tvm_dtype(A.dtype, "A")
    # Partial sums of several k blocks meet in one output element: add them in float32.
    widen = plan.accumulate and out.dtype != torch.float32
    result = torch.empty(out.shape, dtype=torch.float32, device=out.device) if widen else out
    kernel = matmul_kernel(plan, dtype, _tvm_dtype(result.dtype, "out"), target, kernel_cache())
    kernel(A, B, result, index.counts, index.indices)
    if widen:
        out.copy_(result)
