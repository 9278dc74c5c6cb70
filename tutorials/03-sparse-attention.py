"""
Sparse Attention
================

In this tutorial, you will run Longformer-style attention on PIT kernels, computing only the
score tiles the attention pattern needs, and check it against eager PyTorch.

In doing so, you will learn about:

* Building block masks of attention patterns (sliding window, global tokens, BigBird, causal,
  MInference's vertical-slash) with :mod:`pit_compiler.nn.attention_patterns`.

* Why a block mask alone rounds a pattern to tiles, and how an element mask makes the result
  exact.

* Swapping ``nn.MultiheadAttention`` for :class:`~pit_compiler.nn.attention.SparseAttention`
  without copying its weights.

* Timing PIT against eager attention over a sweep of sequence lengths.
"""

# %%
# Motivation
# ----------
#
# Longformer lets each token attend only its neighbours within a window, plus a few *global*
# tokens (e.g. ``[CLS]``) that attend to, and are attended by, every token. At 2048 tokens with
# a window of 64 on each side, about 90 % of the score matrix is masked out, yet eager
# attention computes all of ``q @ k^T`` and then throws most of it away.
#
# PIT computes attention in three steps, each skipping the empty ``(block_q, block_k)`` tiles:
#
# 1. ``sparse_matmul(q, k^T, sparse="C", mask=grid)``: the output-sparse (SDD) form computes only
#    the listed score tiles;
# 2. a float32 softmax, after every disallowed element is set to ``-inf``;
# 3. ``sparse_matmul(p, v, sparse="A", mask=grid)``: the reduce form gathers, per query block,
#    only its listed key blocks (permuting the reduction axis leaves the sum unchanged).

import torch
import torch.nn.functional as F

from pit_compiler.nn.attention import SparseAttention, sparse_attention
from pit_compiler.nn.attention_patterns import longformer
from pit_compiler.schedules import template_for
from pit_compiler.targets import target_for
from pit_compiler.testing import do_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# %%
# Build the mask
# --------------
#
# Every builder returns a boolean grid of ``(q_blocks, k_blocks)`` tiles; with ``block=1`` the
# grid *is* the element mask. The grid says which tiles to compute; the element mask says which
# scores inside them count. Passing both keeps the kernels sparse and the answer exact.


def longformer_masks(seq, window=64, global_tokens=(0,), block=(32, 32)):
    elements = longformer(seq, window, list(global_tokens), block=1, device=DEVICE)
    grid = longformer(seq, window, list(global_tokens), block=block, device=DEVICE)
    return elements, grid


elements, grid = longformer_masks(512)
print(f"512 tokens: {grid.float().mean().item():.1%} of 32x32 tiles computed, "
      f"{elements.float().mean().item():.1%} of scores allowed")

# %%
# Run and check
# -------------
#
# ``sparse_attention`` takes ``(batch, heads, seq, dim)`` tensors, like
# ``F.scaled_dot_product_attention``, and SDPA's mask convention (True = attend). Check the
# result against eager attention with the same mask before timing anything.


def check_against_eager(seq, dtype=torch.float32, heads=4, dim=64):
    q, k, v = (torch.randn(1, heads, seq, dim, device=DEVICE, dtype=dtype) for _ in range(3))
    elements, grid = longformer_masks(seq)
    out = sparse_attention(q, k, v, attn_mask=elements, block_mask=grid, block=(32, 32))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=elements)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    return q, k, v, elements, grid


check_against_eager(97)  # not a multiple of the block: tails are predicated, never padded

# %%
# With ``block_mask`` alone, every element of a listed tile takes part: BigBird-style block
# attention. That is a different (coarser) pattern, so it does not match the element mask.
# A query row with no allowed key returns zeros, where eager attention returns NaN.
#
# The kernels were scheduled by this template (its knobs are printed too):

template = template_for(target_for(DEVICE))
print(f"schedule template {template.name!r} with knobs {template.Knobs()!r}")

# %%
# A drop-in for nn.MultiheadAttention
# -----------------------------------
#
# ``SparseAttention.from_module`` shares the module's parameters (no copy); masks keep MHA's
# conventions (True = masked). Rows every key of which is masked are left out of the check:
# there eager MHA returns NaN.

mha = torch.nn.MultiheadAttention(64, 4, batch_first=True, device=DEVICE).eval()
sparse_mha = SparseAttention.from_module(mha, block=(32, 32))
x = torch.randn(2, 200, 64, device=DEVICE)
banned = ~longformer(200, 16, [0], block=1, device=DEVICE)
with torch.no_grad():
    torch.testing.assert_close(
        sparse_mha(x, x, x, attn_mask=banned)[0], mha(x, x, x, attn_mask=banned, need_weights=False)[0],
        rtol=1e-5, atol=1e-5,
    )

# %%
# Benchmark
# ---------
#
# Time eager SDPA (with the same boolean mask) against PIT over a sweep of sequence lengths. We
# report the median with the 20th and 80th percentiles. PIT's time includes building the tile
# list from the element mask on the device, as a real model would pay it on every call.
#
# Expect PIT to lose for now: batched float32 attention runs on plain-loop kernels (tensor cores
# serve 2-D float16 products only; see the README's status), so the sweep measures how the cost
# falls with tile density, not yet a speed-up over the eager kernels.


def benchmark(seqs=(256, 512, 1024, 2048), reps=5, heads=4, dim=64):
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"Longformer attention, window 64, 1 global token, {heads} heads x {dim}, float32 on {device_name}")
    print(f"{'seq':>6} {'tiles':>7} {'eager: median [p20, p80]':>24} {'PIT: median [p20, p80]':>24}")
    for seq in seqs:
        q, k, v, elements, grid = check_against_eager(seq, heads=heads, dim=dim)
        eager = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=elements), DEVICE, repeat=reps)
        pit = do_bench(lambda: sparse_attention(q, k, v, attn_mask=elements, block_mask=grid), DEVICE, repeat=reps)
        density = grid.float().mean().item()
        print(f"{seq:>6} {density:>7.1%} {str(eager):>24} {str(pit):>24}")


def test_sparse_attention_tutorial():
    q, k, v, elements, grid = check_against_eager(200, heads=2, dim=32)
    assert sparse_attention(q, k, v, attn_mask=elements, block_mask=grid).shape == (1, 2, 200, 32)
    assert 0 < grid.float().mean().item() < 1  # some tiles are skipped


if __name__ == "__main__":
    benchmark()
