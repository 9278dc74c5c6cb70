"""Sparse attention on PIT kernels: scores of listed tiles only, exact under any element mask.

``softmax(q k^T * scale + mask) v`` in three steps:

1. SDD: ``sparse_matmul(q, k^T, sparse="C")`` computes only the ``(block_q, block_k)`` score
   tiles the block grid lists (the rest are written as zero, then masked);
2. softmax in float32 after every disallowed element, inside a listed tile or not, is set to
   ``-inf``, so the result equals eager attention with the same mask, not a block rounding of it;
3. DSD: ``sparse_matmul(p, v, sparse="A")`` in the reduce form gathers, per query block, only
   its listed key blocks.

The score matrix is still stored densely (``sparse_matmul`` takes and returns dense tensors), so
memory is that of eager attention; the two products skip the unlisted tiles.

On a GPU where PIT has no tensor-core kernel for these products (today: every head is one
product of a batch, which only the one-thread-per-output kernel takes), attention runs as
PyTorch's fused ``scaled_dot_product_attention`` instead, under the same masks: exact, as the
tiles PIT would skip hold only masked scores and zero probabilities (see :func:`_runs_fused`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pit_compiler import ops
from pit_compiler.api import sparse_matmul
from pit_compiler.ir import UnsupportedPattern

from .attention_patterns import expand_grid, from_dense_mask, normalize_block

__all__ = ["SparseAttention", "sparse_attention"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq, dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; sparse_attention supports {list(_DTYPES)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if not q.shape[:2] == k.shape[:2] == v.shape[:2]:
        raise ValueError(
            f"q, k and v must share (batch, heads), got shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share seq_k, got k {tuple(k.shape)} and v {tuple(v.shape)}")


def _as_4d(name: str, mask: torch.Tensor, full: tuple[int, ...], device) -> torch.Tensor:
    """``mask`` with leading size-1 dims up to 4-D, checked to broadcast to ``full``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {mask.device}")
    if not 2 <= mask.dim() <= 4:
        raise ValueError(f"{name} must have 2 to 4 dims broadcastable to {full}, got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if any(m not in (1, f) for m, f in zip(mask.shape, full)):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {full}")
    return mask


def _element_masks(attn_mask, key_padding_mask, full, device):
    """``(allowed, bias)``: a bool mask (True = attend) and a float32 additive mask, or None."""
    allowed = bias = None
    if attn_mask is not None:
        attn_mask = _as_4d("attn_mask", attn_mask, full, device)
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        elif attn_mask.is_floating_point():
            bias = attn_mask.float()
            allowed = bias != float("-inf")
        else:
            raise TypeError(f"attn_mask must be bool (True = attend) or a float additive mask, got {attn_mask.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (True = padding), got "
                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}"
            )
        if tuple(key_padding_mask.shape) != (full[0], full[3]):
            raise ValueError(
                f"key_padding_mask must be (batch, seq_k) = {(full[0], full[3])}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask must be on q's device {device}, got {key_padding_mask.device}")
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed, bias


def _masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax of the last dim over ``keep``; a row with nothing kept gives zeros, not NaN."""
    if keep is None:
        return torch.softmax(scores, -1)
    scores.masked_fill_(~keep, float("-inf"))
    return torch.softmax(scores, -1).masked_fill(~keep.any(-1, keepdim=True), 0.0)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_mask: torch.Tensor | None = None,
    block=(32, 32),
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention of ``(batch, heads, seq, dim)`` tensors over allowed keys only.

    Args:
        q, k, v: ``(batch, heads, seq_q, dim)``, ``(batch, heads, seq_k, dim)`` and
            ``(batch, heads, seq_k, dim_v)``; float32, float16 or bfloat16 on one device.
        attn_mask: broadcastable to ``(batch, heads, seq_q, seq_k)``; bool with True = attend,
            or a float mask added to the scaled scores (``-inf`` = masked): SDPA's conventions.
        key_padding_mask: ``(batch, seq_k)`` bool, True = padding key, never attended
            (``nn.MultiheadAttention``'s convention).
        block_mask: bool tile grid broadcastable to ``(batch, heads, q_blocks, k_blocks)``
            (see :mod:`.attention_patterns`); unlisted tiles are masked whole.
        block: ``(block_q, block_k)`` of the score tiles, or one int.
        scale: score scale, ``1 / sqrt(dim)`` by default.

    The tiles computed are those ``block_mask`` lists that also hold an element the element
    masks allow, found on the device by :func:`.from_dense_mask`. The result equals eager
    attention under ``attn_mask & ~key_padding_mask & block_mask`` (expanded to elements),
    except that a query row with no allowed key returns zeros where eager returns NaN.
    Scores are rounded to the input dtype (as ``q @ k^T`` in eager), then softmax runs in
    float32.
    """
    _check_qkv(q, k, v)
    block = normalize_block(block)
    batch, heads, seq_q, dim = q.shape
    seq_k, dim_v = k.shape[2], v.shape[3]
    full = (batch, heads, seq_q, seq_k)
    grid_shape = (batch, heads, math.ceil(seq_q / block[0]), math.ceil(seq_k / block[1]))
    if scale is None:
        scale = 1.0 / math.sqrt(dim) if dim else 1.0

    allowed, bias = _element_masks(attn_mask, key_padding_mask, full, q.device)
    keep = allowed
    grid = None
    if block_mask is not None:
        block_mask = _as_4d("block_mask", block_mask, grid_shape, q.device)
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tile grid, got {block_mask.dtype}")
        grid = block_mask
        tiles = expand_grid(block_mask, block, seq_q, seq_k)
        keep = tiles if keep is None else keep & tiles
    if 0 in (batch, heads, seq_q, seq_k, dim_v):
        return q.new_zeros(batch, heads, seq_q, dim_v)
    if _runs_fused(q):
        return _fused_attention(q, k, v, keep, bias, scale)  # (no tile grid needed)
    if allowed is not None:
        reachable = from_dense_mask(allowed, block)
        grid = reachable if grid is None else grid & reachable
    if grid is None:
        grid = torch.ones((1, 1) + grid_shape[2:], dtype=torch.bool, device=q.device)
    grid = grid.expand(grid_shape).reshape(batch * heads, *grid_shape[2:])  # (nothing masked: every tile)

    q3, k3 = q.reshape(batch * heads, seq_q, dim), k.reshape(batch * heads, seq_k, dim).transpose(1, 2)
    scores = sparse_matmul(q3, k3, sparse="C", micro_tile=block, mask=grid)
    scores = scores.view(full).float() * scale
    if bias is not None:
        scores.add_(bias)
    probs = _masked_softmax(scores, keep).to(q.dtype).view(batch * heads, seq_q, seq_k)
    v3 = v.reshape(batch * heads, seq_k, dim_v)
    out = sparse_matmul(probs, v3, sparse="A", micro_tile=block, mask=grid, form="reduce")
    return out.view(batch, heads, seq_q, dim_v)


def _fused_attention(q, k, v, keep: torch.Tensor | None, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The same attention as one fused ``scaled_dot_product_attention`` under the same masks
    (a query row with no allowed key gives zeros here too, where SDPA gives NaN)."""
    mask = keep
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if keep is None else torch.where(keep, bias, float("-inf"))  # (either may broadcast)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if keep is None:
        return out
    return out.masked_fill(~keep.any(-1, keepdim=True), 0.0)


def _runs_fused(q: torch.Tensor) -> bool:
    """Whether attention runs as PyTorch's fused SDPA under the same masks rather than on PIT:
    wherever its choices weigh dense kernels (a GPU; :func:`~pit_compiler.ops.weighs_dense_kernels`).

    PIT's tensor-core tiles take 2-D products only (:func:`~pit_compiler.ops.tensor_core_kernel`),
    and attention's two are batched (one per head), so there only the one-thread-per-output
    kernel would run: on an NVIDIA H200 (float16) it made Longformer-base attention at 4096
    tokens take 27.0 ms against 0.300 eager, and the two products as dense batched cuBLAS with
    the softmax between them in float32 still took 5.43 ms on an H100 (eager SDPA: 0.298).
    Exact: a tile PIT skips holds only disallowed scores (masked before the softmax either way)
    and zero probabilities. Decided without looking at sizes, so ``torch.compile`` keeps one
    graph with static and dynamic shapes alike (tracing the planner broke BERT-base into dozens).
    """
    return ops.weighs_dense_kernels(q.device)


def _stay_unfused(module, args):
    """A no-op pre-hook: ``nn.TransformerEncoderLayer`` skips its fused fast path when a child
    has hooks; that path reads ``self_attn``'s weights directly and would bypass PIT."""
    return None


class SparseAttention(nn.Module):
    """``nn.MultiheadAttention`` with its attention on PIT kernels (:func:`sparse_attention`).

    Same constructor, parameters (names and ``state_dict``) and ``forward`` as MHA, so it swaps
    in for one; :meth:`from_module` wraps an existing MHA's parameters without a copy. The masks
    take MHA's conventions (bool True = masked). Differences: ``need_weights`` defaults to
    False and True is refused (the weights are never formed); a query row whose keys are all
    masked gives zeros, not NaN; ``is_causal=True`` without ``attn_mask`` applies a causal mask
    (MHA needs the mask). ``add_bias_kv``, ``add_zero_attn`` and dropout in training raise
    :class:`~pit_compiler.ir.UnsupportedPattern`: keep ``nn.MultiheadAttention`` for those.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        block=(32, 32),
    ) -> None:
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise UnsupportedPattern(
                f"SparseAttention does not support add_bias_kv={add_bias_kv!r} or add_zero_attn={add_zero_attn!r}; "
                "keep nn.MultiheadAttention for this layer"
            )
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.block = normalize_block(block)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()
        self.register_forward_pre_hook(_stay_unfused)

    def _reset_parameters(self) -> None:
        """MHA's initialization, so a fresh module trains like a fresh MHA."""
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, *, block=(32, 32)) -> "SparseAttention":
        """A SparseAttention over ``module``'s own parameters (shared, not copied)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedPattern(
                "SparseAttention.from_module: the module uses add_bias_kv or add_zero_attn, which SparseAttention "
                "does not support; keep nn.MultiheadAttention for this layer"
            )
        sparse = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",
            block=block,
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            setattr(sparse, name, getattr(module, name))
        sparse.out_proj = module.out_proj
        return sparse.train(module.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        block_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """MHA's forward; returns ``(output, None)``. ``block_mask`` adds a tile pattern."""
        if need_weights:
            raise UnsupportedPattern(
                "SparseAttention never forms the attention weights; call it with need_weights=False, "
                "or use nn.MultiheadAttention where the weights are needed"
            )
        if self.training and self.dropout > 0:
            raise UnsupportedPattern(
                f"SparseAttention has no attention dropout (dropout={self.dropout}); "
                "call .eval(), or build it with dropout=0.0 for training"
            )
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            raise UnsupportedPattern(
                "SparseAttention takes padded tensors with key_padding_mask, not nested tensors; inside "
                "nn.TransformerEncoder set encoder.use_nested_tensor = False"
            )
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 3-D batch or a 2-D unbatched tensor, got {shape}")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, seq_q, _ = query.shape
        seq_k = key.shape[1]

        q, k, v = self._project(query, key, value)
        attn_mask, key_padding_mask = self._sdpa_masks(attn_mask, key_padding_mask, batch, seq_q, seq_k, is_causal, query)
        out = sparse_attention(
            q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, block_mask=block_mask, block=self.block
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, seq_q, self.embed_dim))
        if not batched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query, key, value):
        """The per-head ``(batch, heads, seq, head_dim)`` q, k and v."""
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(
            F.linear(x, w, b).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
            for x, w, b in zip((query, key, value), weights, biases)
        )

    def _sdpa_masks(self, attn_mask, key_padding_mask, batch, seq_q, seq_k, is_causal, query):
        """MHA's masks (True = masked, or additive) as :func:`sparse_attention` takes them."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != batch * self.num_heads:
                    raise ValueError(
                        f"a 3-D attn_mask must be (batch * num_heads, seq_q, seq_k) = "
                        f"{(batch * self.num_heads, seq_q, seq_k)}, got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask.reshape(batch, self.num_heads, *attn_mask.shape[1:])
            elif attn_mask.dim() != 2:
                raise ValueError(f"attn_mask must be 2-D or 3-D as in nn.MultiheadAttention, got {tuple(attn_mask.shape)}")
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            # An additive padding mask joins the additive attn_mask, as MHA merges them.
            padding = key_padding_mask.float()[:, None, None, :]
            if attn_mask is None:
                attn_mask = padding
            elif attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, device=query.device).masked_fill(~attn_mask, float("-inf")) + padding
            else:
                attn_mask = attn_mask.float() + padding
            key_padding_mask = None
        return attn_mask, key_padding_mask
