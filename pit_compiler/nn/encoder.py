"""``SparseTransformerEncoderLayer``: a padded batch's padding skipped by attention and FFN alike."""

from __future__ import annotations

import torch
from torch import nn

from .attention import SparseAttention
from .functional import sparse_linear


class SparseTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` on PIT kernels, for variable-length batches.

    The key padding mask that attention already takes is also the row mask of both
    feed-forward linears: padded tokens' rows are neither gathered nor computed (whole-row
    micro-tiles, listed by the mask). Outputs at padded positions are therefore not those of
    eager PyTorch (which computes them and then ignores them); every real token's output is.
    """

    @classmethod
    def from_module(cls, layer: nn.TransformerEncoderLayer, *, block=(32, 32)) -> "SparseTransformerEncoderLayer":
        """A layer sharing ``layer``'s parameters (no copy), its attention a SparseAttention."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"layer must be a torch.nn.TransformerEncoderLayer, got {type(layer).__name__}")
        module = cls.__new__(cls)
        module.__dict__.update(layer.__dict__)
        module._modules = dict(layer._modules)
        module._parameters = dict(layer._parameters)
        module._buffers = dict(layer._buffers)
        if type(layer.self_attn) is nn.MultiheadAttention:
            module.self_attn = SparseAttention.from_module(layer.self_attn, block=block)
        return module

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        rows = self._real_rows(src_key_padding_mask)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._sparse_ff_block(self.norm2(x), rows)
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._sparse_ff_block(x, rows))
        return x

    def _real_rows(self, key_padding_mask):
        """The ``(tokens,)`` rows of the flattened input that are real tokens, or None."""
        if key_padding_mask is None:
            return None
        padding = key_padding_mask if key_padding_mask.dtype == torch.bool else torch.isneginf(key_padding_mask)
        real = ~padding  # (batch, seq)
        return real if self.self_attn.batch_first else real.t()

    def _sparse_ff_block(self, x, rows):
        hidden = sparse_linear(x, self.linear1.weight, self.linear1.bias, row_mask=rows)
        hidden = self.dropout(self.activation(hidden))
        return self.dropout2(sparse_linear(hidden, self.linear2.weight, self.linear2.bias, row_mask=rows))
