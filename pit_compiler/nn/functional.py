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
    - ``weight_grid`` with ``weight_micro_tile``: the weight's listed micro-tiles over
      ``(out_features, in_features)``, built once (see :class:`SparseLinear`); the weight is
      read in place, and its gradient keeps the same micro-tiles.
    - ``row_mask`` (``tokens`` booleans): only these rows are computed (padding is skipped);
      the others come out as ``bias`` alone (zero without bias).
    """
    leading = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    weight_t = weight.t()  # a free view: kernels read the (out, in) layout in place
    if weight_grid is not None:
        rows, cols = weight_micro_tile
        y = sparse_matmul(x2, weight_t, sparse="B", micro_tile=(cols, rows), mask=weight_grid.t())
    elif row_mask is not None:
        mask = row_mask.reshape(-1, 1)
        if mask.shape[0] != x2.shape[0]:
            raise ValueError(f"row_mask must have one entry per row of x ({x2.shape[0]}), got {tuple(row_mask.shape)}")
        y = sparse_matmul(x2, weight_t, sparse="A", micro_tile=(1, None), mask=mask)
    else:
        y = sparse_matmul(x2, weight_t, sparse="A", micro_tile=input_micro_tile)
    if bias is not None:
        y = y + bias
    return y.reshape(*leading, weight.shape[0])
