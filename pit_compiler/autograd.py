"""``pit::sparse_matmul``: the PIT matmul as a PyTorch operator, with its backward.

Registered with ``torch.library`` so that ``torch.compile`` (any backend, inductor included)
sees one opaque operator with a known output shape instead of breaking its graph on TVM
calls, and autograd sees its backward.

The forward computes ``C = (A ⊙ M) @ B`` where ``M`` is the sparse operand's micro-tile mask
(detected or given); the operator returns ``M`` as a grid beside ``C``. ``M`` is held constant,
as a ReLU's mask is: the gradient of the sparse operand is sparse with the same micro-tiles,
and every gradient is one more PIT matmul:

======== ================================= =================================
sparse   dA                                dB
======== ================================= =================================
A        (dC @ Bᵀ) ⊙ M: output-sparse      (A ⊙ M)ᵀ @ dC: sparse A, transposed
B        dC @ (B ⊙ M)ᵀ: sparse B, transp.  (Aᵀ @ dC) ⊙ M: output-sparse
C        (dC ⊙ M) @ Bᵀ: sparse A           Aᵀ @ (dC ⊙ M): sparse B
======== ================================= =================================
"""

from __future__ import annotations

import math

import torch

from pit_compiler.ops import operand_grid, pit_matmul


def grid_shape_of(shape: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    return tuple(math.ceil(size / t) for size, t in zip(shape, tile))


def _shapes(A: torch.Tensor, B: torch.Tensor, grid_shape):
    batch = tuple(A.shape[:-2])
    return (*batch, A.shape[-2], B.shape[-1]), (*(batch or (1,)), *grid_shape)


# The arguments of both operators: the operands, the sparse one, its micro-tile and grid, the
# optional mask and form.
_ARGUMENTS = "(Tensor A, Tensor B, str sparse, int[] tile, int[] grid_shape, Tensor? mask, str? form)"


@torch.library.custom_op("pit::sparse_matmul", mutates_args=(), schema=_ARGUMENTS + " -> (Tensor, Tensor)")
def sparse_matmul_op(A, B, sparse, tile, grid_shape, mask, form):
    """``(A @ B with sparse's unlisted micro-tiles as zero, the listed micro-tiles' grid)``."""
    out_shape, grid_full = _shapes(A, B, grid_shape)
    out = torch.empty(out_shape, dtype=A.dtype, device=A.device)
    used = pit_matmul(A, B, out, sparse, tuple(tile), tuple(grid_shape), mask, form, dense_fallback=True, keep_index=True)
    grid = operand_grid(*used) if used is not None else torch.zeros(grid_full, dtype=torch.bool, device=A.device)
    return out, grid


@sparse_matmul_op.register_fake
def _(A, B, sparse, tile, grid_shape, mask, form):
    out_shape, grid_full = _shapes(A, B, grid_shape)
    return A.new_empty(out_shape), A.new_empty(grid_full, dtype=torch.bool)


@torch.library.custom_op("pit::sparse_matmul_forward", mutates_args=(), schema=_ARGUMENTS + " -> Tensor")
def sparse_matmul_forward_op(A, B, sparse, tile, grid_shape, mask, form):
    """:func:`sparse_matmul_op`'s product alone, for traced calls that need no gradient: no grid
    is built for a backward, and the call runs as an eager one does (taller micro-tiles that
    reach tensor cores, dense where PIT cannot win)."""
    out = torch.empty(_shapes(A, B, grid_shape)[0], dtype=A.dtype, device=A.device)
    pit_matmul(A, B, out, sparse, tuple(tile), tuple(grid_shape), mask, form, cover=True, dense_fallback=True)
    return out


@sparse_matmul_forward_op.register_fake
def _(A, B, sparse, tile, grid_shape, mask, form):
    return A.new_empty(_shapes(A, B, grid_shape)[0])


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def matmul_with_grid(A, B, sparse: str, tile, grid: torch.Tensor) -> torch.Tensor:
    """``A @ B`` with ``sparse``'s micro-tiles listed by a ``(batch, rows, cols)`` grid."""
    out, _ = sparse_matmul_op(A, B, sparse, list(tile), list(grid.shape[-2:]), grid, None)
    return out


def _setup_context(ctx, inputs, output):
    A, B, sparse, tile, _, _, _ = inputs
    ctx.save_for_backward(A, B, output[1])
    ctx.sparse, ctx.tile = sparse, tuple(tile)


def _backward(ctx, dC, _grid_grad):
    A, B, grid = ctx.saved_tensors
    sparse, tile = ctx.sparse, ctx.tile
    swapped = tile[::-1]
    dC = dC.contiguous()
    dA = dB = None
    if sparse == "A":
        if ctx.needs_input_grad[0]:
            dA = matmul_with_grid(dC, _t(B), "C", tile, grid)
        if ctx.needs_input_grad[1]:
            dB = matmul_with_grid(_t(A), dC, "A", swapped, _t(grid))
    elif sparse == "B":
        if ctx.needs_input_grad[0]:
            dA = matmul_with_grid(dC, _t(B), "B", swapped, _t(grid))
        if ctx.needs_input_grad[1]:
            dB = matmul_with_grid(_t(A), dC, "C", tile, grid)
    else:
        if ctx.needs_input_grad[0]:
            dA = matmul_with_grid(dC, _t(B), "A", tile, grid)
        if ctx.needs_input_grad[1]:
            dB = matmul_with_grid(_t(A), dC, "B", tile, grid)
    return dA, dB, None, None, None, None, None


sparse_matmul_op.register_autograd(_backward, setup_context=_setup_context)
