"""The index of non-empty micro-tiles that detection builds and PIT kernels gather by."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroTileIndex:
    """Per block of the blocked axis, the list of non-empty chunks of the permuted axis.

    ``counts[b, q]`` is how many chunks block ``q`` of batch ``b`` lists, and
    ``indices[b, q, :counts[b, q]]`` are their chunk numbers (ascending on the CPU, in any order
    from the one-pass CUDA detection; PIT needs no order).
    Both live on the device of the tensor they describe.
    """

    counts: torch.Tensor
    indices: torch.Tensor

    @property
    def nnz(self) -> int:
        """Listed micro-tiles in all (a host read; for reporting, not for hot paths)."""
        return int(self.counts.sum())

    def to_mask(self) -> torch.Tensor:
        """The ``(batch, blocks, chunks)`` boolean grid of listed micro-tiles."""
        batch, blocks, chunks = self.indices.shape
        slots = torch.arange(chunks, device=self.indices.device)
        listed = slots.view(1, 1, -1) < self.counts.unsqueeze(-1)
        mask = torch.zeros(batch, blocks, chunks + 1, dtype=torch.bool, device=self.indices.device)
        targets = torch.where(listed, self.indices.long(), chunks)  # unlisted slots -> spare column
        mask.scatter_(2, targets, True)
        return mask[..., :chunks]
