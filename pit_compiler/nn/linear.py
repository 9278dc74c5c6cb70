"""``SparseLinear``: a drop-in ``nn.Linear`` on PIT kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pit_compiler import ops
from pit_compiler.api import detect_micro_tiles
from pit_compiler.validation import input_micro_tile_option, normalize_micro_tile

from .functional import finish_linear, rows_of, sparse_linear


class SparseLinear(nn.Linear):
    """``nn.Linear`` that skips the empty micro-tiles of its input or of its (pruned) weight.

    A subclass, so ``isinstance(m, nn.Linear)``, ``state_dict`` keys and optimizers see the
    module they expect. With ``weight_micro_tile`` the weight's index is built once and
    rebuilt only when the weight changes (an optimizer step, a new pruning mask); on a GPU,
    where no tensor-core tile takes the pruned weight or it is too dense to win
    (:func:`~pit_compiler.ops.pruned_weight_beats_dense`), the layer runs dense cuBLAS.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_micro_tile=(32, 1),
        weight_micro_tile=None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._configure(input_micro_tile, weight_micro_tile)

    @classmethod
    def from_module(cls, linear: nn.Linear, *, input_micro_tile=(32, 1), weight_micro_tile=None) -> "SparseLinear":
        """A SparseLinear sharing ``linear``'s parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module._configure(input_micro_tile, weight_micro_tile)
        return module

    def _configure(self, input_micro_tile, weight_micro_tile) -> None:
        self.input_micro_tile = input_micro_tile_option(input_micro_tile, self.in_features)
        self.weight_micro_tile = (
            normalize_micro_tile(weight_micro_tile, (self.out_features, self.in_features))
            if weight_micro_tile is not None
            else None
        )
        self._weight_index_key = None
        self._weight_grid = None
        self._weight_listed = 1.0

    def weight_grid(self) -> torch.Tensor | None:
        """The weight's non-empty micro-tiles, rebuilt when the weight's storage or version moves."""
        if self.weight_micro_tile is None:
            return None
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if key != self._weight_index_key:
            with torch.no_grad():
                self._weight_grid = detect_micro_tiles(self.weight.detach(), self.weight_micro_tile).to_mask()[0]
                self._weight_listed = self._weight_grid.float().mean().item() if self._weight_grid.numel() else 0.0
            self._weight_index_key = key
        return self._weight_grid

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight_micro_tile is not None and torch.compiler.is_compiling():
            # Traced: the weight's pieces are detected inside PIT's operator on every call, which
            # also weighs dense cuBLAS by their count; the grid kept between eager calls (keyed
            # by the weight's address) and the planner's choice below would break the graph.
            return sparse_linear(x, self.weight, self.bias, weight_micro_tile=self.weight_micro_tile, row_mask=row_mask)
        grid = self.weight_grid()
        # A choice from shapes and the weight's own grid: kept under CUDA graph capture too.
        if grid is not None and ops.weighs_dense_kernels(x.device) and x.numel():
            x2 = x.reshape(-1, self.in_features)
            if not ops.pruned_weight_beats_dense(x2, self.weight, self.weight_micro_tile, self._weight_listed):
                y = F.linear(x2, self.weight)  # exact: the grid lists every non-zero piece
                return finish_linear(y, x.shape[:-1], self.bias, rows_of(row_mask, x2.shape[0]))
        return sparse_linear(
            x,
            self.weight,
            self.bias,
            input_micro_tile=self.input_micro_tile,
            weight_grid=grid,
            weight_micro_tile=self.weight_micro_tile,
            row_mask=row_mask,
        )

    def extra_repr(self) -> str:
        sparse = f"weight_micro_tile={self.weight_micro_tile}" if self.weight_micro_tile else (
            f"input_micro_tile={self.input_micro_tile}"
        )
        return f"{super().extra_repr()}, {sparse}"
