"""Functional forms of the PIT modules, for graphs rewritten by :func:`pit_compiler.compile`."""

from __future__ import annotations

import torch

from pit_compiler.api import sparse_matmul


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    input_micro_tile=(32, 1),
    weight_grid: torch.Tensor | None = None,
    weight_micro_tile=None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` whose input (activation sparsity) or weight (pruning) is sparse.

    - ``input_micro_tile``: the input's micro-tiles over ``(tokens, in_features)`` are
      detected on the fly; ``(32, 1)`` skips features that are zero for 32 tokens at once
      (ReLU outputs), ``(1, None)`` skips whole zero rows, ``"auto"`` picks per call from
      the tile database (``pit-tune``), dense ``torch.matmul`` included.
    - ``weight_micro_tile``: the weight is pruned in pieces of ``(out, in)`` this size. With
      ``weight_grid``, its listed micro-tiles, built once (see :class:`SparseLinear`); without,
      detected on every call inside PIT's operator (what a traced ``SparseLinear`` runs). The
      weight is read in place, and its gradient keeps the same micro-tiles.
    - ``row_mask`` (``tokens`` booleans): only these rows are computed (padding is skipped);
      the others come out as ``bias`` alone (zero without bias). With a pruned weight the
      rows are all computed, then those outside the mask zeroed.
    """
    x2 = x.reshape(-1, x.shape[-1])
    weight_t = weight.t()  # a free view: kernels read the (out, in) layout in place
    mask = rows_of(row_mask, x2.shape[0])
    if weight_micro_tile is not None:  # every row computed: those outside the mask zeroed after
        rows, cols = weight_micro_tile
        grid = weight_grid.t() if weight_grid is not None else None
        y = sparse_matmul(x2, weight_t, sparse="B", micro_tile=(cols, rows), mask=grid)
        return finish_linear(y, x.shape[:-1], bias, mask)
    if mask is not None:  # the rows outside the mask are skipped, so come out zero
        y = sparse_matmul(x2, weight_t, sparse="A", micro_tile=(1, None), mask=mask)
    else:
        y = sparse_matmul(x2, weight_t, sparse="A", micro_tile=input_micro_tile)
    return finish_linear(y, x.shape[:-1], bias, None)


def rows_of(row_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``row_mask`` as a ``(tokens, 1)`` column, checked against the input's ``tokens`` rows."""
    if row_mask is None:
        return None
    mask = row_mask.reshape(-1, 1)
    if mask.shape[0] != tokens:
        raise ValueError(f"row_mask must have one entry per row of x ({tokens}), got {tuple(row_mask.shape)}")
    return mask


def finish_linear(y: torch.Tensor, leading, bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """``y`` (tokens, out) with the rows outside ``mask`` (where given) zeroed, plus ``bias``, shaped
    ``(*leading, out)``."""
    if mask is not None:
        y = y.masked_fill(~mask.bool(), 0)
    if bias is not None:
        y = y + bias
    return y.reshape(*leading, y.shape[-1])
