"""Random micro-tile-sparse test data and the dense reference every kernel is checked against."""

from __future__ import annotations

import math

import torch

# Tolerances relative to the largest reference entry: float32 accumulates exactly enough
# for 1e-5; half types round the output itself (8 or 11 bits of mantissa).
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def block_mask(grid: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean grid with exactly round(density * size) true cells (0 % and 100 % are exact)."""
    cells = math.prod(grid)
    keep = round(density * cells)
    order = torch.randperm(cells, generator=generator)
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(grid)


def expand_mask(mask: torch.Tensor, tile: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Element mask of ``shape`` from a micro-tile grid mask (last two dims)."""
    rows, cols = tile
    full = mask.repeat_interleave(rows, -2).repeat_interleave(cols, -1)
    return full[..., : shape[0], : shape[1]]


def micro_tile_sparse(
    shape: tuple[int, ...], tile, density: float, dtype, device="cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tensor whose micro-tiles are zero outside a random grid mask; returns both.

    Values are drawn from a normal distribution shifted away from zero, so a kept element is
    never accidentally zero and a kept micro-tile is never accidentally empty.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, cols = (size if t is None else t for t, size in zip(tile, shape[-2:]))
    grid = (*shape[:-2], math.ceil(shape[-2] / rows), math.ceil(shape[-1] / cols))
    mask = block_mask(grid, density, generator)
    values = torch.randn(shape, generator=generator)
    values = values + torch.sign(values) * 0.25
    dense = values * expand_mask(mask, (rows, cols), shape[-2:])
    return dense.to(dtype=dtype, device=device), mask.to(device)


def dense_operand(shape, dtype, device="cpu", seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN: an element a kernel forgets to write shows in the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_matches_reference(result: torch.Tensor, reference: torch.Tensor, adds: int = 0) -> None:
    """``result`` equals the float64 ``reference`` up to the dtype's rounding; no NaN left.
    ``adds``: partial sums added to each element in its own dtype (each rounded: up to a unit
    in the last place of the largest value more each)."""
    assert not torch.isnan(result).any(), "output has NaN: some element was never written"
    scale = max(reference.abs().max().item(), 1.0)
    tolerance = (RELATIVE_TOLERANCE[result.dtype] + adds * torch.finfo(result.dtype).eps) * scale
    torch.testing.assert_close(result.double().cpu(), reference.double().cpu(), rtol=0, atol=tolerance)


def check_sparse_a(tile, density, shape, dtype, device, seed) -> None:
    """``pit.sparse_matmul`` of a random micro-tile-sparse A (M x K) and a dense B (K x N) into a
    NaN-poisoned output, checked against the float64 product."""
    import pit_compiler as pit

    M, K, N = shape
    A, _ = micro_tile_sparse((M, K), tile, density, dtype, device, seed=seed)
    B = dense_operand((K, N), dtype, device, seed=K)
    out = poisoned((M, N), dtype, device)
    pit.sparse_matmul(A, B, micro_tile=tile, out=out)
    assert_matches_reference(out, A.double() @ B.double())


def check_float32_out_from_mask(tile, shape, density, device, halve: bool) -> None:
    """``ops.pit_matmul`` into a NaN-poisoned float32 output with the index built from A's
    micro-tile mask, the first half of its k chunks cleared where ``halve`` (the mask, not A,
    decides what is listed: unlisted micro-tiles read as zero)."""
    from pit_compiler import ops

    M, K, N = shape
    A, grid = micro_tile_sparse((M, K), tile, density, torch.float16, device, seed=7)
    B = dense_operand((K, N), torch.float16, device, seed=8)
    grid_shape = tuple(math.ceil(size / t) for size, t in zip((M, K), tile))
    if halve:
        grid = grid.clone()
        grid[:, : grid.shape[1] // 2] = False
    out = poisoned((M, N), torch.float32, device)
    ops.pit_matmul(A, B, out, "A", tile, grid_shape, grid, None)
    kept = A * expand_mask(grid, tile, (M, K))
    assert_matches_reference(out, kept.double() @ B.double())
