"""Backward passes of the PIT matmul, themselves PIT kernels.

The forward computes ``C = (A ⊙ M) @ B`` where ``M`` is the sparse operand's micro-tile mask
(detected or given), held constant as a ReLU's mask is: the gradient of the sparse operand is
sparse with the same micro-tiles, and every gradient is one more PIT matmul:

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


def _swap(pair):
    return pair[1], pair[0]


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def matmul_with_grid(A, B, sparse: str, tile, grid: torch.Tensor) -> torch.Tensor:
    """``A @ B`` with ``sparse``'s micro-tiles listed by a ``(batch, rows, cols)`` grid."""
    out = torch.empty((*A.shape[:-2], A.shape[-2], B.shape[-1]), dtype=A.dtype, device=A.device)
    pit_matmul(A, B, out, sparse, tile, tuple(grid.shape[-2:]), grid, form=None)
    return out


class SparseMatmul(torch.autograd.Function):
    """``pit.sparse_matmul`` with gradients (see the module docstring for the rules)."""

    @staticmethod
    def forward(ctx, A, B, sparse, tile, grid_shape, mask, form):
        out = torch.empty((*A.shape[:-2], A.shape[-2], B.shape[-1]), dtype=A.dtype, device=A.device)
        used = pit_matmul(A, B, out, sparse, tile, grid_shape, mask, form)
        grid = operand_grid(*used) if used is not None else None
        ctx.save_for_backward(A, B, grid)
        ctx.sparse, ctx.tile = sparse, tile
        return out

    @staticmethod
    def backward(ctx, dC):
        A, B, grid = ctx.saved_tensors
        sparse, tile = ctx.sparse, ctx.tile
        dC = dC.contiguous()
        if grid is None:  # an empty product: zero-size or K == 0
            return torch.zeros_like(A), torch.zeros_like(B), None, None, None, None, None
        dA = dB = None
        if sparse == "A":
            if ctx.needs_input_grad[0]:
                dA = matmul_with_grid(dC, _t(B), "C", tile, grid)
            if ctx.needs_input_grad[1]:
                dB = matmul_with_grid(_t(A), dC, "A", _swap(tile), _t(grid))
        elif sparse == "B":
            if ctx.needs_input_grad[0]:
                dA = matmul_with_grid(dC, _t(B), "B", _swap(tile), _t(grid))
            if ctx.needs_input_grad[1]:
                dB = matmul_with_grid(_t(A), dC, "C", tile, grid)
        else:
            if ctx.needs_input_grad[0]:
                dA = matmul_with_grid(dC, _t(B), "A", tile, grid)
            if ctx.needs_input_grad[1]:
                dB = matmul_with_grid(_t(A), dC, "B", tile, grid)
        return dA, dB, None, None, None, None, None


def grid_shape_of(shape: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    return tuple(math.ceil(size / t) for size, t in zip(shape, tile))
