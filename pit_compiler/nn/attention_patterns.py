"""Block masks of sparse attention patterns: which (query block, key block) tiles to compute.

Every builder returns a boolean grid ``(q_blocks, k_blocks)`` (with leading dims where the
pattern has them): tile ``(a, b)`` is True when some query of block ``a`` may attend some key
of block ``b``. ``block`` is ``(block_q, block_k)`` or one int for both; ``block=1`` gives the
element mask itself, which :func:`~pit_compiler.nn.attention.sparse_attention` takes as
``attn_mask`` to be exact inside partly allowed tiles. Positions are absolute (query ``i`` and
key ``j`` count from 0), and grids cover tails: ``q_blocks = ceil(seq_q / block_q)``. Grids are
built on ``device`` (the CPU by default).

The pattern builders work from block bounds, never from an expanded element mask, so a grid
costs ``O(q_blocks * k_blocks)`` whatever the sequence length.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pit_compiler.api import detect_micro_tiles
from pit_compiler.ops import expand_micro_tiles

__all__ = [
    "bigbird",
    "causal",
    "expand_grid",
    "from_dense_mask",
    "longformer",
    "normalize_block",
    "sliding_window",
    "vertical_slash",
]


def normalize_block(block) -> tuple[int, int]:
    """``(block_q, block_k)`` from an int or a pair of positive ints."""
    pair = (block, block) if isinstance(block, int) else block
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair)
    ):
        raise ValueError(f"block must be a positive int or a pair (block_q, block_k) of them, e.g. (32, 32); got {block!r}")
    return tuple(pair)


def _check_count(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _bounds(seq: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each block (the last block may be a short tail)."""
    lo = torch.arange(0, seq, block, device=device)
    return lo, (lo + block).clamp(max=seq) - 1


def _positions(name: str, values, seq: int, device) -> torch.Tensor:
    """Sorted int64 positions in ``[0, seq)`` (leading dims kept) for ``searchsorted``."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    t = torch.as_tensor(values).to("cpu" if device is None else device)
    if t.numel() == 0:
        t = t.to(torch.int64)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer positions, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= seq):
        raise ValueError(f"{name} must lie in [0, {seq}), got values from {int(t.min())} to {int(t.max())}")
    return t.to(device=device, dtype=torch.int64).sort(-1).values


def _any_between(sorted_values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Whether some value lies in ``[lo, hi]``, per (broadcast) pair of bounds."""
    shape = torch.broadcast_shapes(lo.shape, hi.shape)
    lead = sorted_values.shape[:-1]
    lo = lo.expand(shape).reshape(-1).expand(*lead, -1).contiguous()
    hi = hi.expand(shape).reshape(-1).expand(*lead, -1).contiguous()
    first = torch.searchsorted(sorted_values, lo)
    past = torch.searchsorted(sorted_values, hi, right=True)
    return (past > first).view(*lead, *shape)


def _window_grid(seq_q: int, seq_k: int, window: int, block: tuple[int, int], device) -> torch.Tensor:
    q_lo, q_hi = _bounds(seq_q, block[0], device)
    k_lo, k_hi = _bounds(seq_k, block[1], device)
    gap = torch.maximum(k_lo[None, :] - q_hi[:, None], q_lo[:, None] - k_hi[None, :]).clamp(min=0)
    return gap <= window


def _global_grid(seq: int, global_tokens, block: tuple[int, int], device) -> torch.Tensor:
    """Tiles that hold a global query (whole row) or a global key (whole column)."""
    if isinstance(global_tokens, int) and not isinstance(global_tokens, bool):
        _check_count("global_tokens", global_tokens, 0)
        tokens = torch.arange(min(global_tokens, seq), device=device)
    else:
        tokens = _positions("global_tokens", global_tokens, seq, device)
        if tokens.dim() != 1:
            raise ValueError(f"global_tokens must be an int or a 1-D list of positions, got shape {tuple(tokens.shape)}")
    q_lo, q_hi = _bounds(seq, block[0], device)
    k_lo, k_hi = _bounds(seq, block[1], device)
    return _any_between(tokens, q_lo, q_hi)[:, None] | _any_between(tokens, k_lo, k_hi)[None, :]


def sliding_window(seq_q: int, seq_k: int, window: int, block=(32, 32), *, device=None) -> torch.Tensor:
    """Local attention: query ``i`` attends key ``j`` when ``|i - j| <= window``.

    ``window`` is the reach on each side (Longformer's one-sided ``w / 2``).
    """
    _check_count("seq_q", seq_q, 1)
    _check_count("seq_k", seq_k, 1)
    _check_count("window", window, 0)
    return _window_grid(seq_q, seq_k, window, normalize_block(block), device)


def longformer(seq: int, window: int, global_tokens, block=(32, 32), *, device=None) -> torch.Tensor:
    """Longformer: a sliding window, plus global tokens that attend to and from every token.

    ``global_tokens`` is a count (the first ``n`` tokens, e.g. ``[CLS]``) or a list of positions
    (e.g. the question tokens in QA).
    """
    _check_count("seq", seq, 1)
    _check_count("window", window, 0)
    block = normalize_block(block)
    return _window_grid(seq, seq, window, block, device) | _global_grid(seq, global_tokens, block, device)


def bigbird(
    seq: int,
    window: int,
    global_tokens,
    random_blocks: int,
    block=(32, 32),
    generator: torch.Generator | None = None,
    *,
    device=None,
) -> torch.Tensor:
    """BigBird (ITC): Longformer's window and global tokens, plus random key blocks per query block.

    Each query block gets ``random_blocks`` key blocks drawn uniformly from those the window and
    global tokens leave out (all of them when fewer are left), so the random part always adds
    reach. Draws come from ``generator`` (on its device) for reproducible masks.
    """
    _check_count("random_blocks", random_blocks, 0)
    grid = longformer(seq, window, global_tokens, block, device=device)
    if random_blocks == 0:
        return grid
    draw_device = generator.device if generator is not None else grid.device
    scores = torch.rand(grid.shape, generator=generator, device=draw_device).to(grid.device)
    scores = scores.masked_fill(grid, -1.0)
    top = scores.topk(min(random_blocks, grid.shape[1]), dim=1)
    chosen = torch.zeros_like(grid).scatter_(1, top.indices, top.values >= 0)
    return grid | chosen


def causal(seq: int, block=(32, 32), *, device=None) -> torch.Tensor:
    """Decoder attention: query ``i`` attends key ``j`` when ``j <= i``."""
    _check_count("seq", seq, 1)
    block = normalize_block(block)
    _, q_hi = _bounds(seq, block[0], device)
    k_lo, _ = _bounds(seq, block[1], device)
    return k_lo[None, :] <= q_hi[:, None]


def vertical_slash(seq: int, vertical_indices, slash_offsets, block=(32, 32), *, causal: bool = True, device=None) -> torch.Tensor:
    """MInference's vertical-slash pattern: whole key columns plus diagonal lines.

    Query ``i`` attends key ``j`` when ``j`` is in ``vertical_indices`` (a vertical line) or
    ``i - j`` is in ``slash_offsets`` (a slash line; 0 is the main diagonal, ``o > 0`` lies ``o``
    keys back), and, with ``causal`` (MInference's decoder prefill), only when ``j <= i``. Both
    lists may carry the same leading dims (e.g. ``(heads, n)``: one pattern per head); the grid
    gets them too.
    """
    _check_count("seq", seq, 1)
    block = normalize_block(block)
    verticals = _positions("vertical_indices", vertical_indices, seq, device)
    slashes = torch.as_tensor(slash_offsets, device=verticals.device)
    if slashes.is_floating_point() or slashes.is_complex() or slashes.dtype == torch.bool:
        raise TypeError(f"slash_offsets must hold integer offsets, got dtype {slashes.dtype}")
    if slashes.dim() == 0:
        slashes = slashes.view(1)
    if slashes.numel() and int(slashes.abs().max()) >= seq:
        raise ValueError(f"slash_offsets must lie in ({-seq}, {seq}), got a largest |offset| of {int(slashes.abs().max())}")
    slashes = slashes.to(torch.int64).sort(-1).values
    if verticals.dim() == 0:
        verticals = verticals.view(1)
    if verticals.shape[:-1] != slashes.shape[:-1]:
        raise ValueError(
            f"vertical_indices and slash_offsets must share their leading dims, got shapes "
            f"{tuple(verticals.shape)} and {tuple(slashes.shape)}"
        )
    q_lo, q_hi = _bounds(seq, block[0], verticals.device)
    k_lo, k_hi = _bounds(seq, block[1], verticals.device)
    # A diagonal i - j = o crosses a tile exactly when o lies in [q_lo - k_hi, q_hi - k_lo].
    slash_lo = q_lo[:, None] - k_hi[None, :]
    if causal:
        slash_lo = slash_lo.clamp(min=0)
    grid = _any_between(slashes, slash_lo, q_hi[:, None] - k_lo[None, :])
    vertical_hi = torch.minimum(k_hi[None, :], q_hi[:, None]) if causal else k_hi[None, :].expand(len(q_lo), -1)
    return grid | _any_between(verticals, k_lo[None, :], vertical_hi)


def from_dense_mask(mask: torch.Tensor, block=(32, 32)) -> torch.Tensor:
    """The tiles of an element mask that hold at least one allowed element.

    ``mask`` is ``(..., seq_q, seq_k)``: bool or integer with non-zero (True) = attend, or a
    float additive mask where ``-inf`` = masked (SDPA's conventions). Any user mask takes this
    path. The tiles are found by PIT's detection kernel on the mask's own device, with no host
    round trip; the grid is ``(..., q_blocks, k_blocks)``. A size-1 dim (a broadcast mask)
    stays size 1 in the grid, which broadcasts the same way.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() < 2:
        raise ValueError(f"mask must be (..., seq_q, seq_k), got shape {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or a float additive mask, got {mask.dtype}")
    block = normalize_block(block)
    allowed = mask != float("-inf") if mask.is_floating_point() else mask != 0
    lead, (seq_q, seq_k) = mask.shape[:-2], mask.shape[-2:]
    grid_shape = (*lead, math.ceil(seq_q / block[0]), math.ceil(seq_k / block[1]))
    if allowed.numel() == 0:
        return torch.zeros(grid_shape, dtype=torch.bool, device=mask.device)
    index = detect_micro_tiles(allowed.reshape(-1, seq_q, seq_k), block)
    return index.to_mask().view(grid_shape)


def expand_grid(grid: torch.Tensor, block: Sequence[int], seq_q: int, seq_k: int) -> torch.Tensor:
    """The element mask of a tile grid: every element of a listed tile, tails cut off."""
    return expand_micro_tiles(grid, block, seq_q, seq_k)
