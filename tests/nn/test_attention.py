"""Sparse attention on PIT kernels against float64 softmax attention, and the pattern builders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pit_compiler as pit
from pit_compiler.ir import UnsupportedPattern
from pit_compiler.nn.attention import SparseAttention, sparse_attention
from pit_compiler.nn.attention_patterns import (
    bigbird,
    causal,
    expand_grid,
    from_dense_mask,
    longformer,
    sliding_window,
    vertical_slash,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = [(16, 16), (32, 32), (16, 32)]
# Relative to the largest output: scores and probabilities are rounded to the input dtype
# (as eager does), so half types err about twice as much as a single matmul.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


# Naive references: element masks by the pattern's definition, grids by looping over tiles.


def naive_elements(seq_q, seq_k, allowed) -> torch.Tensor:
    return torch.tensor([[bool(allowed(i, j)) for j in range(seq_k)] for i in range(seq_q)])


def naive_grid(elements: torch.Tensor, block) -> torch.Tensor:
    seq_q, seq_k = elements.shape[-2:]
    rows, cols = math.ceil(seq_q / block[0]), math.ceil(seq_k / block[1])
    grid = torch.zeros(*elements.shape[:-2], rows, cols, dtype=torch.bool)
    for a in range(rows):
        for b in range(cols):
            tile = elements[..., a * block[0] : (a + 1) * block[0], b * block[1] : (b + 1) * block[1]]
            grid[..., a, b] = tile.flatten(-2).any(-1)
    return grid


def assert_pattern(builder_grid, builder_elements, elements, block):
    assert builder_grid.dtype == torch.bool
    assert torch.equal(builder_elements.cpu(), elements)
    assert torch.equal(builder_grid.cpu(), naive_grid(elements, block))


@pytest.mark.parametrize("seq_q,seq_k", [(50, 50), (97, 61)])
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_sliding_window(seq_q, seq_k, window, block):
    elements = naive_elements(seq_q, seq_k, lambda i, j: abs(i - j) <= window)
    assert_pattern(
        sliding_window(seq_q, seq_k, window, block), sliding_window(seq_q, seq_k, window, 1), elements, block
    )


@pytest.mark.parametrize("seq", [50, 97])
@pytest.mark.parametrize("global_tokens", [0, 2, [0, 40, 49]], ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_longformer(seq, global_tokens, block):
    glob = set(range(global_tokens)) if isinstance(global_tokens, int) else set(global_tokens)
    elements = naive_elements(seq, seq, lambda i, j: abs(i - j) <= 4 or i in glob or j in glob)
    assert_pattern(longformer(seq, 4, global_tokens, block), longformer(seq, 4, global_tokens, 1), elements, block)


@pytest.mark.parametrize("seq", [50, 97])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_causal(seq, block):
    elements = naive_elements(seq, seq, lambda i, j: j <= i)
    assert_pattern(causal(seq, block), causal(seq, 1), elements, block)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_vertical_slash(is_causal, block):
    seq, verticals, slashes = 97, [0, 3, 60], [0, 7, 50] + ([] if is_causal else [-20])

    def allowed(i, j):
        return (j in verticals or (i - j) in slashes) and (j <= i or not is_causal)

    elements = naive_elements(seq, seq, allowed)
    assert_pattern(
        vertical_slash(seq, verticals, slashes, block, causal=is_causal),
        vertical_slash(seq, verticals, slashes, 1, causal=is_causal),
        elements,
        block,
    )


def test_vertical_slash_per_head():
    """Leading dims of the index lists become leading dims of the grid: one pattern per head."""
    verticals = torch.tensor([[1, 30], [5, 44]])
    slashes = torch.tensor([[0, 9], [0, 33]])
    grid = vertical_slash(50, verticals, slashes, (16, 16))
    assert grid.shape == (2, 4, 4)
    for h in range(2):
        assert torch.equal(grid[h], vertical_slash(50, verticals[h].tolist(), slashes[h].tolist(), (16, 16)))


@pytest.mark.parametrize("random_blocks", [0, 1, 3, 100])
def test_bigbird(random_blocks):
    """Longformer's tiles plus exactly ``random_blocks`` new key blocks per query block, seeded."""
    seq, block = 97, (16, 16)
    base = longformer(seq, 4, 2, block)
    grid = bigbird(seq, 4, 2, random_blocks, block, torch.Generator().manual_seed(7))
    added = grid & ~base
    assert torch.equal(grid | base, grid)
    free = (~base).sum(1)
    assert torch.equal(added.sum(1), free.clamp(max=random_blocks))
    again = bigbird(seq, 4, 2, random_blocks, block, torch.Generator().manual_seed(7))
    assert torch.equal(grid, again)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bool", "additive", "batched"])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_from_dense_mask(kind, block, device):
    generator = torch.Generator().manual_seed(3)
    shape = (2, 3, 61, 97) if kind == "batched" else (61, 97)
    elements = torch.rand(shape, generator=generator) < 0.02
    elements[..., :16, :16] = False  # an empty tile in every case
    mask = elements
    if kind == "additive":
        mask = torch.full(shape, float("-inf")).masked_fill(elements, 0.0)
        mask[elements] = torch.randn(int(elements.sum()), generator=generator)
    grid = from_dense_mask(mask.to(device), block)
    assert grid.device.type == device
    assert torch.equal(grid.cpu(), naive_grid(elements, block))


def test_expand_grid_round_trip():
    grid = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(from_dense_mask(expand_grid(grid, (16, 32), 50, 70), (16, 32)), grid)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sliding_window(50, 50, -1, 16), ValueError, "window"),
        (lambda: sliding_window(50, 50, 2, (16, 0)), ValueError, "block"),
        (lambda: longformer(50, 2, [3, 50], 16), ValueError, "global_tokens"),
        (lambda: bigbird(50, 2, 1, -1, 16), ValueError, "random_blocks"),
        (lambda: causal(0, 16), ValueError, "seq"),
        (lambda: vertical_slash(50, [1.5], [0], 16), TypeError, "vertical_indices"),
        (lambda: vertical_slash(50, [1], [50], 16), ValueError, "slash_offsets"),
        (lambda: vertical_slash(50, [[1]], [0], 16), ValueError, "leading dims"),
        (lambda: from_dense_mask(torch.ones(5, dtype=torch.bool), 16), ValueError, "seq_q"),
    ],
)
def test_pattern_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# sparse_attention against float64 softmax attention.


def qkv(batch, heads, seq_q, seq_k, dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, seq_q, dim), (batch, heads, seq_k, dim), (batch, heads, seq_k, dim))
    return tuple(torch.randn(s, generator=generator).to(dtype=dtype, device=device) for s in shapes)


def reference_attention(q, k, v, keep, bias=None, scale=None):
    """float64 softmax attention over ``keep``; rows with no allowed key are zero."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1] or 1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double().cpu()
    keep = keep.cpu().expand(scores.shape)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def assert_close_to(result, reference):
    assert not torch.isnan(result).any(), "output has NaN"
    tolerance = TOLERANCE[result.dtype] * max(reference.abs().max().item(), 1.0)
    torch.testing.assert_close(result.double().cpu(), reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_random_element_mask(dtype, block, device):
    """An element mask finer than the tiles: exact, not rounded to tiles; tails 97 and 50."""
    q, k, v = qkv(2, 3, 97, 50, 16, dtype, device)
    generator = torch.Generator().manual_seed(1)
    keep = (torch.rand(2, 3, 97, 50, generator=generator) < 0.3).to(device)
    assert_close_to(sparse_attention(q, k, v, attn_mask=keep, block=block), reference_attention(q, k, v, keep))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("heads", [1, 4])
def test_random_block_mask(density, heads, device):
    """block_mask alone: listed tiles are attended whole; density 0 gives all zeros."""
    block, seq = (16, 32), 97
    q, k, v = qkv(2, heads, seq, seq, 8, torch.float32, device)
    grid_shape = (2, heads, math.ceil(seq / 16), math.ceil(seq / 32))
    cells = math.prod(grid_shape)
    order = torch.randperm(cells, generator=torch.Generator().manual_seed(2))
    grid = torch.zeros(cells, dtype=torch.bool)
    grid[order[: round(density * cells)]] = True
    grid = grid.view(grid_shape).to(device)
    out = sparse_attention(q, k, v, block_mask=grid, block=block)
    assert_close_to(out, reference_attention(q, k, v, expand_grid(grid, block, seq, seq)))
    if density == 0.0:
        assert not out.any()


def pattern_case(name, seq, block):
    """(element mask, tile grid) of a named pattern."""
    if name == "longformer":
        return longformer(seq, 6, [0, seq // 2], 1), longformer(seq, 6, [0, seq // 2], block)
    if name == "bigbird":
        grid = bigbird(seq, 6, 1, 2, block, torch.Generator().manual_seed(5))
        return expand_grid(grid, block, seq, seq), grid
    if name == "causal":
        return causal(seq, 1), causal(seq, block)
    if name == "sliding_window":
        return sliding_window(seq, seq, 9, 1), sliding_window(seq, seq, 9, block)
    verticals, slashes = [0, 5, seq - 3], [0, 1, 17]
    return vertical_slash(seq, verticals, slashes, 1), vertical_slash(seq, verticals, slashes, block)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["longformer", "bigbird", "causal", "sliding_window", "vertical_slash"])
def test_patterns(pattern, dtype, device):
    seq, block = 97, (32, 32)
    elements, grid = pattern_case(pattern, seq, block)
    q, k, v = qkv(1, 2, seq, seq, 16, dtype, device)
    expected = reference_attention(q, k, v, elements)
    by_mask = sparse_attention(q, k, v, attn_mask=elements.to(device), block=block)
    both = sparse_attention(q, k, v, attn_mask=elements.to(device), block_mask=grid.to(device), block=block)
    assert_close_to(by_mask, expected)
    assert_close_to(both, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_sdpa(device):
    """Against PyTorch's own scaled_dot_product_attention: dense, causal and boolean-masked."""
    q, k, v = qkv(2, 2, 50, 50, 16, torch.float32, device)
    elements = longformer(50, 3, 1, 1).to(device)
    for kwargs, sdpa_kwargs in [
        ({}, {}),
        ({"attn_mask": causal(50, 1).to(device)}, {"is_causal": True}),
        ({"attn_mask": elements, "scale": 0.3}, {"attn_mask": elements, "scale": 0.3}),
    ]:
        out = sparse_attention(q, k, v, block=(16, 16), **kwargs)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_variable_lengths(dtype, device):
    """A batch of lengths 50, 31 and 7 padded to 50: padded keys are never attended."""
    lengths, seq = [50, 31, 7], 50
    q, k, v = qkv(3, 2, seq, seq, 16, dtype, device)
    padding = torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None]
    unread = torch.arange(seq)[None, :] >= 16 * ((torch.tensor(lengths)[:, None] + 15) // 16)
    k[unread[:, None, :, None].expand_as(k).to(device)] = float("nan")  # whole padded tiles: never read
    v[unread[:, None, :, None].expand_as(v).to(device)] = float("nan")
    out = sparse_attention(q, k, v, key_padding_mask=padding.to(device), block=(16, 16))
    keep = ~padding[:, None, None, :]
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert_close_to(out, reference_attention(q, k0, v0, keep))
    causal_out = sparse_attention(
        q, k, v, key_padding_mask=padding.to(device), attn_mask=causal(seq, 1).to(device), block=(16, 16)
    )
    assert_close_to(causal_out, reference_attention(q, k0, v0, keep & causal(seq, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero(device):
    q, k, v = qkv(1, 2, 50, 40, 8, torch.float32, device)
    keep = torch.rand(1, 2, 50, 40, generator=torch.Generator().manual_seed(4)) < 0.5
    keep[:, :, 10:30] = False  # whole query blocks, and rows inside partly masked blocks
    keep[:, 1, 3] = False
    out = sparse_attention(q, k, v, attn_mask=keep.to(device), block=(16, 16))
    assert not out[:, :, 10:30].any() and not out[:, 1, 3].any()
    assert_close_to(out, reference_attention(q, k, v, keep))
    assert not sparse_attention(q, k, v, attn_mask=torch.zeros(50, 40, dtype=torch.bool, device=device)).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_additive_float_mask(dtype, device):
    """An ALiBi-like bias with -inf outside a window: the bias is added, -inf tiles skipped."""
    seq, heads = 61, 4
    q, k, v = qkv(2, heads, seq, seq, 16, dtype, device)
    distance = (torch.arange(seq)[:, None] - torch.arange(seq)[None, :]).abs().float()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None]
    bias = (-slopes * distance).masked_fill(distance > 20, float("-inf"))
    out = sparse_attention(q, k, v, attn_mask=bias.to(device=device, dtype=dtype), block=(16, 16))
    assert_close_to(out, reference_attention(q, k, v, bias.isfinite(), bias=bias.to(dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_value_dim(device):
    """seq_q != seq_k and a value dim unlike the key dim."""
    q, k, _ = qkv(2, 1, 33, 70, 16, torch.float32, device)
    v = torch.randn(2, 1, 70, 24, generator=torch.Generator().manual_seed(9)).to(device)
    grid = sliding_window(33, 70, 10, (16, 16)).to(device)
    out = sparse_attention(q, k, v, block_mask=grid, block=16, scale=0.1)
    assert out.shape == (2, 1, 33, 24)
    assert_close_to(out, reference_attention(q, k, v, expand_grid(grid, (16, 16), 33, 70), scale=0.1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_q=st.integers(1, 70),
    seq_k=st.integers(1, 70),
    dim=st.sampled_from([0, 1, 8]),
    block=st.sampled_from(BLOCKS + [(8, 4)]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_property(seq_q, seq_k, dim, block, density, seed):
    """Any lengths (tails, blocks longer than the sequence, dim 0) under any element mask."""
    q, k, _ = qkv(1, 2, seq_q, seq_k, dim, torch.float32, "cpu", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 2, seq_k, 4, generator=generator)
    keep = torch.rand(1, 2, seq_q, seq_k, generator=generator) < density
    assert_close_to(sparse_attention(q, k, v, attn_mask=keep, block=block), reference_attention(q, k, v, keep))


def test_other_lengths_reuse_the_kernels():
    q, k, v = qkv(1, 2, 40, 40, 8, torch.float32, "cpu")
    sparse_attention(q, k, v, attn_mask=causal(40, 1), block=(16, 16))
    builds = pit.kernel_cache().builds
    q, k, v = qkv(2, 3, 77, 51, 16, torch.float32, "cpu")
    sparse_attention(q, k, v, attn_mask=torch.ones(77, 51, dtype=torch.bool), block=(16, 16))
    assert pit.kernel_cache().builds == builds


def test_gradients_match_eager():
    """Differentiable through sparse_matmul's autograd; a dead row gets zero gradient, not NaN."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 50, 50, 16, torch.float32, "cpu"))
    keep = longformer(50, 5, 1, 1)
    keep[7] = False
    grad_out = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(sparse_attention(q, k, v, attn_mask=keep, block=16), (q, k, v), grad_out)
    live = keep.any(-1)[None, None, :, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).nan_to_num(0.0) * live
    for grad, reference in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        assert not torch.isnan(grad).any()
        torch.testing.assert_close(grad, reference.nan_to_num(0.0), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k, v = qkv(1, 2, 20, 20, 8, torch.float32, "cpu")
    cases = [
        (dict(q=q[0]), ValueError, "q must be"),
        (dict(k=k.half()), TypeError, "share a dtype"),
        (dict(v=v[:, :, :10]), ValueError, "seq_k"),
        (dict(q=q.double()), TypeError, "q has dtype"),
        (dict(attn_mask=torch.ones(3, 20, 20, dtype=torch.bool)), ValueError, "attn_mask"),
        (dict(attn_mask=torch.ones(20, 20, dtype=torch.int64)), TypeError, "attn_mask"),
        (dict(key_padding_mask=torch.zeros(1, 19, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=torch.zeros(1, 20)), TypeError, "key_padding_mask"),
        (dict(block_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "block_mask"),
        (dict(block_mask=torch.ones(1, 1)), TypeError, "block_mask"),
        (dict(block=(16, -1)), ValueError, "block"),
    ]
    for change, error, match in cases:
        args = dict(q=q, k=k, v=v)
        args.update(change)
        q_, k_, v_ = args.pop("q"), args.pop("k"), args.pop("v")
        with pytest.raises(error, match=match):
            sparse_attention(q_, k_, v_, **args)


# SparseAttention as a drop-in for nn.MultiheadAttention.


def mha_inputs(batch_first, device, seq=37, batch=3, embed=32, kdim=None, vdim=None):
    generator = torch.Generator().manual_seed(11)

    def make(dim):
        shape = (batch, seq, dim) if batch_first else (seq, batch, dim)
        return torch.randn(shape, generator=generator).to(device)

    return make(embed), make(kdim or embed), make(vdim or embed)


def live_rows(keep_any: torch.Tensor, batch_first: bool):
    """Index of output rows with at least one allowed key, in the module's layout."""
    return keep_any if batch_first else keep_any.transpose(0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "mixed"])
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_from_module_matches_mha(batch_first, mask_kind, device):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, device=device).eval()
    sparse = SparseAttention.from_module(mha, block=(16, 16))
    assert sparse.in_proj_weight is mha.in_proj_weight and sparse.out_proj.weight is mha.out_proj.weight
    query, key, value = mha_inputs(batch_first, device)
    seq, batch = 37, 3
    padding = (torch.arange(seq)[None, :] >= torch.tensor([37, 20, 5])[:, None]).to(device)
    banned = ~longformer(seq, 4, 1, 1).to(device)  # MHA: True = not allowed
    banned[30] = True  # a fully masked query row
    attn_mask, padding_mask = banned, padding
    if mask_kind == "float":
        attn_mask = torch.zeros(seq, seq, device=device).masked_fill(banned, float("-inf"))
    if mask_kind in ("float", "mixed"):
        padding_mask = torch.zeros(batch, seq, device=device).masked_fill(padding, float("-inf"))
    with torch.no_grad():
        expected, _ = mha(query, key, value, key_padding_mask=padding_mask, attn_mask=attn_mask, need_weights=False)
        out, weights = sparse(query, key, value, key_padding_mask=padding_mask, attn_mask=attn_mask)
    assert weights is None and out.shape == expected.shape
    keep_any = (~banned[None] & ~padding[:, None, :]).any(-1)  # (batch, seq_q)
    live = live_rows(keep_any, batch_first)
    torch.testing.assert_close(out[live], expected[live], rtol=1e-5, atol=1e-5)
    dead = out[~live]
    assert dead.numel() and torch.allclose(dead, mha.out_proj.bias.expand_as(dead))


@pytest.mark.parametrize("device", DEVICES)
def test_from_module_per_head_mask_kdim_and_unbatched(device):
    """A (batch * heads, L, S) mask, separate key/value dims, and unbatched (L, E) input."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(24, 2, kdim=16, vdim=8, batch_first=True, device=device).eval()
    sparse = SparseAttention.from_module(mha, block=(16, 16))
    assert sparse.k_proj_weight is mha.k_proj_weight and sparse.in_proj_weight is None
    query, key, value = mha_inputs(True, device, seq=29, batch=2, embed=24, kdim=16, vdim=8)
    generator = torch.Generator().manual_seed(2)
    banned = (torch.rand(4, 29, 29, generator=generator) < 0.6).to(device)
    banned[..., 0] = False  # no dead rows
    with torch.no_grad():
        expected, _ = mha(query, key, value, attn_mask=banned, need_weights=False)
        out, _ = sparse(query, key, value, attn_mask=banned)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        expected, _ = mha(query[0], key[0], value[0], need_weights=False)
        out, _ = sparse(query[0], key[0], value[0])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_is_causal_and_state_dict():
    torch.manual_seed(2)
    sparse = SparseAttention(32, 4, batch_first=True, block=(16, 16)).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mha.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 40, 32)
    mask = torch.ones(40, 40, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
        out, _ = sparse(x, x, x, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor", "ignore:The PyTorch API of nested tensors")
def test_inside_transformer_encoder():
    """Swapped into nn.TransformerEncoder: PIT runs (the fused fast path stays off), same output."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 20, 32)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 12:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
        for each in encoder.layers:
            each.self_attn = SparseAttention.from_module(each.self_attn, block=(16, 16))
        if encoder.use_nested_tensor:
            with pytest.raises(UnsupportedPattern, match="use_nested_tensor"):
                encoder(x, src_key_padding_mask=padding)
        encoder.use_nested_tensor = False
        calls = []
        encoder.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        out = encoder(x, src_key_padding_mask=padding)
    assert calls
    expected = expected.to_padded_tensor(0.0, out.shape) if expected.is_nested else expected
    torch.testing.assert_close(out[~padding], expected[~padding], rtol=1e-5, atol=1e-5)


def test_module_refuses_what_it_does_not_support():
    with pytest.raises(UnsupportedPattern, match="add_bias_kv"):
        SparseAttention.from_module(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(UnsupportedPattern, match="add_zero_attn"):
        SparseAttention(16, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match="num_heads"):
        SparseAttention(16, 3)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        SparseAttention.from_module(nn.Linear(4, 4))
    sparse = SparseAttention(16, 2, dropout=0.1)
    x = torch.randn(5, 2, 16)
    with pytest.raises(UnsupportedPattern, match="dropout"):
        sparse(x, x, x)
    sparse.eval()
    with pytest.raises(UnsupportedPattern, match="need_weights"):
        sparse(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        sparse(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))
    assert sparse(x, x, x)[0].shape == (5, 2, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["element", "blocks", "padding", "additive", "additive+padding", "none"])
def test_dense_products_where_pit_has_no_tensor_core_kernel(case, dtype, device, monkeypatch):
    """Where the dense fallback applies and no tensor-core kernel takes attention's batched
    products (a GPU today; patched in on the CPU), attention runs as fused SDPA under the same
    masks: the same attention (zeros for rows with nothing allowed), and PIT is not called."""
    from pit_compiler import ops
    from pit_compiler.nn import attention

    monkeypatch.setattr(ops, "DENSE_FALLBACK", True)  # the tests' default is PIT's kernels only
    if device == "cpu":
        monkeypatch.setattr(ops, "weighs_dense_kernels", lambda device: True)
    monkeypatch.setattr(attention, "sparse_matmul", lambda *a, **k: pytest.fail("ran on PIT"))
    block, (q, k, v) = (16, 32), qkv(2, 3, 97, 50, 16, dtype, device, seed=4)
    generator = torch.Generator().manual_seed(6)
    keep, kwargs, bias = torch.ones(2, 3, 97, 50, dtype=torch.bool), {}, None
    if case == "element":
        keep = torch.rand(2, 3, 97, 50, generator=generator) < 0.3
        keep[0, 0, :20] = False  # rows with nothing allowed give zeros
        kwargs = {"attn_mask": keep}
    elif case == "blocks":
        grid = torch.rand(2, 3, 7, 2, generator=generator) < 0.4
        keep, kwargs = expand_grid(grid, block, 97, 50), {"block_mask": grid}
    elif case == "padding":
        padding = torch.arange(50).view(1, -1) >= torch.tensor([13, 40]).view(-1, 1)
        keep, kwargs = ~padding[:, None, None, :], {"key_padding_mask": padding}
    elif case.startswith("additive"):
        keep = torch.rand(97, 50, generator=generator) < 0.5
        bias = torch.full((97, 50), float("-inf")).masked_fill(keep, 0.0) + torch.randn(97, 50, generator=generator) * keep
        kwargs = {"attn_mask": bias}
        bias = bias.masked_fill(~keep, 0.0)
        if case.endswith("padding"):  # the float mask broadcasts against the bigger padding mask
            padding = torch.arange(50).view(1, -1) >= torch.tensor([13, 40]).view(-1, 1)
            keep = keep & ~padding[:, None, None, :]
            kwargs["key_padding_mask"] = padding
    kwargs = {name: mask.to(device) for name, mask in kwargs.items()}
    out = sparse_attention(q, k, v, block=block, **kwargs)
    assert_close_to(out, reference_attention(q, k, v, keep, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["pit", "fused"])
def test_torch_compile_traces_attention_in_one_graph(fused, device, monkeypatch):
    """Under ``torch.compile(fullgraph=True)`` the encoder layer with PIT's attention is one
    graph on either path (PIT's products, or fused SDPA where a GPU has no tensor-core kernel
    for them; patched in on the CPU), with static and dynamic shapes: the choice reads the
    device only, never the planner (whose trace broke BERT-base into dozens of graphs)."""
    import torch._dynamo

    from pit_compiler import ops
    from pit_compiler.nn import attention

    if device == "cpu":
        monkeypatch.setattr(ops, "weighs_dense_kernels", lambda device: fused)
    monkeypatch.setattr(ops, "DENSE_FALLBACK", fused)  # the tests' default is PIT's kernels only
    ran_pit = []
    original = attention.sparse_matmul
    monkeypatch.setattr(attention, "sparse_matmul", lambda *a, **k: ran_pit.append(1) or original(*a, **k))
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).to(device).eval()
    layer.self_attn = SparseAttention.from_module(layer.self_attn, block=(16, 16))

    def run(x, padding):
        return layer(x, src_key_padding_mask=padding)

    torch._dynamo.reset()
    whole = torch.compile(run, backend="eager", fullgraph=True, dynamic=False)
    dynamic = torch.compile(run, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq, compiled in ((20, whole), (20, dynamic), (27, dynamic)):
            x = torch.randn(2, seq, 32, device=device)
            padding = torch.arange(seq, device=device).view(1, -1) >= torch.tensor([[seq], [12]], device=device)
            expected = run(x, padding)
            ran_pit.clear()
            out = compiled(x, padding)
            assert bool(ran_pit) != fused
            torch.testing.assert_close(out[~padding], expected[~padding], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_no_tensor_core_tile_takes_batched_products():
    """What lets attention choose fused SDPA on a GPU from the device alone: PIT's tensor-core
    tiles take 2-D products only, so its batched products (one per head) never reach them. A
    batched tile would make that choice depend on the shapes again."""
    from tvm.target import Target

    from pit_compiler import ops
    from pit_compiler.ir import SparsityAttr, plan_pit

    for arch in ("sm_80", "sm_90"):
        target = Target({"kind": "cuda", "arch": arch})
        for dtype in ("float16", "bfloat16", "float32"):
            for seq_k, dim_v, block in ((4096, 64, (64, 64)), (128, 64, (32, 32)), (512, 128, (16, 32))):
                plan = plan_pit(ops.matmul_contraction(3), SparsityAttr("A", block), {"m": 1, "n": dim_v, "k": seq_k}, "reduce")
                assert ops.tensor_core_kernel(plan, 3, seq_k, dim_v, dtype, dtype, dtype, target) is None
