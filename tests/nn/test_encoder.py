"""pit.nn.SparseTransformerEncoderLayer: real tokens equal eager, padding is never computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pit_compiler as pit

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("float_mask", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_real_tokens_match_eager(batch_first, float_mask, activation, device):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=batch_first)
    layer = layer.to(device).eval()
    sparse = pit.nn.SparseTransformerEncoderLayer.from_module(layer)
    assert sparse.linear1.weight is layer.linear1.weight and type(sparse.self_attn) is pit.nn.SparseAttention
    lengths = torch.tensor([9, 3, 14], device=device)
    padding = torch.arange(14, device=device).view(1, -1) >= lengths.view(-1, 1)
    mask = torch.zeros(padding.shape, device=device).masked_fill(padding, float("-inf")) if float_mask else padding
    x = torch.randn(3, 14, 32, device=device)
    x_in = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        result, expected = sparse(x_in, src_key_padding_mask=mask), layer(x_in, src_key_padding_mask=mask)
    if not batch_first:
        result, expected = result.transpose(0, 1), expected.transpose(0, 1)
    torch.testing.assert_close(result[~padding], expected[~padding], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(result).all()


def test_without_padding_equals_eager_everywhere():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True).eval()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(pit.nn.SparseTransformerEncoderLayer.from_module(layer)(x), layer(x), rtol=1e-4, atol=1e-4)


def test_bad_module():
    with pytest.raises(TypeError, match="layer"):
        pit.nn.SparseTransformerEncoderLayer.from_module(nn.Linear(2, 2))
