"""Argument checks for the public operators: every message names the argument at fault."""

from __future__ import annotations

import math
from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPARSE_OPERANDS = ("A", "B", "C")
MAX_ELEMENTS = 2**31 - 1  # TVM's kernels here index buffers with int32 (their shapes are int32)


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_sparse or value.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {value.layout}; "
            "PIT finds the sparsity itself: pass the dense tensor (call .to_dense() first)"
        )
    return value


def check_matmul_operands(A: torch.Tensor, B: torch.Tensor) -> None:
    """A and B of one dtype and device, 2-D or batched 3-D, with matching inner dimensions."""
    require_tensor("A", A)
    require_tensor("B", B)
    for name, t in (("A", A), ("B", B)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; PIT supports {list(SUPPORTED_DTYPES)}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D (M, K) or batched 3-D, got shape {tuple(t.shape)}")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share a dtype, got A {A.dtype} and B {B.dtype}; cast one of them")
    if A.device != B.device:
        raise ValueError(f"A and B must be on one device, got A on {A.device} and B on {B.device}")
    if A.dim() != B.dim():
        raise ValueError(
            f"A and B must both be 2-D or both be 3-D, got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    if A.shape[-1] != B.shape[-2]:
        raise ValueError(
            f"inner dimensions differ: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
            f"A.shape[-1] ({A.shape[-1]}) must equal B.shape[-2] ({B.shape[-2]})"
        )
    if A.dim() == 3 and A.shape[0] != B.shape[0]:
        raise ValueError(f"batch sizes differ: A has {A.shape[0]} and B has {B.shape[0]}")
    product = (*A.shape[:-1], B.shape[-1])
    for name, elements in (("A", A.numel()), ("B", B.numel()), ("the product A @ B", math.prod(product))):
        if elements > MAX_ELEMENTS:
            raise ValueError(
                f"{name} has {elements} elements; PIT's kernels index with 32-bit integers, so A, B and "
                f"the product must each have at most {MAX_ELEMENTS} (2**31 - 1): split the product, "
                "e.g. by rows of A"
            )


def check_sparse(sparse) -> str:
    if sparse not in SPARSE_OPERANDS:
        raise ValueError(f"sparse must be one of {SPARSE_OPERANDS}, got {sparse!r}")
    return sparse


def input_micro_tile_option(micro_tile, in_features: int):
    """A layer's input micro-tile: ``"auto"`` (picked per call, see ``sparse_matmul``) or a pair."""
    if check_auto(micro_tile):
        return "auto"
    normalize_micro_tile(micro_tile, (1, in_features))
    return tuple(micro_tile)


def needs_grad(A, B) -> bool:
    """Whether autograd would record a product of ``A`` and ``B``."""
    return torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)


def check_out_without_grad(out, A, B) -> None:
    """``out=`` writes in place, which autograd cannot record."""
    if out is not None and needs_grad(A, B):
        raise ValueError("out= does not support automatic differentiation; pass out=None when A or B requires grad")


def check_auto(micro_tile) -> bool:
    """Whether ``micro_tile`` asks for run-time selection (``"auto"``); other text is an error."""
    if isinstance(micro_tile, str):
        if micro_tile != "auto":
            raise ValueError(f"micro_tile must be a pair (rows, cols) or 'auto', got {micro_tile!r}")
        return True
    return False


def normalize_micro_tile(micro_tile, operand_shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)`` of positive ints; ``None`` for one entry means the whole axis."""
    if (
        not isinstance(micro_tile, (tuple, list))
        or len(micro_tile) != 2
        or not all(
            t is None or (isinstance(t, int) and not isinstance(t, bool) and t >= 1) for t in micro_tile
        )
    ):
        raise ValueError(
            f"micro_tile must be a pair (rows, cols) of positive ints, or None for a whole axis, "
            f"e.g. (32, 1), (1, 64) or (1, None) (sparse_matmul also takes 'auto'); got {micro_tile!r}"
        )
    return tuple(max(1, size) if t is None else t for t, size in zip(micro_tile, operand_shape))


def check_mask(mask, operand_shape: tuple, grid_shape: tuple, device) -> torch.Tensor:
    """A mask the size of the sparse operand, or of its micro-tile grid; non-zero marks kept."""
    require_tensor("mask", mask)
    if mask.device != device:
        raise ValueError(f"mask must be on the operands' device {device}, got {mask.device}")
    if tuple(mask.shape) not in (operand_shape, grid_shape):
        raise ValueError(
            f"mask must have the sparse operand's shape {operand_shape} or its micro-tile grid's "
            f"shape {grid_shape}, got {tuple(mask.shape)}"
        )
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real, got {mask.dtype}")
    return mask


def check_out(out, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    require_tensor("out", out)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous; pass out=None to have PIT allocate it")
    return out
