"""Torch glue for the MoE kernels: the expert index, and the grouped matmuls as autograd Functions.

Packed tensors are ``(E, S, ...)``: slot ``j`` of expert ``e`` holds token ``indices[e, j]`` for
``j < counts[e]`` and zeros beyond. The backward pass runs the same three kernels with other
weight storage orders (see :mod:`pit_compiler.codegen.moe`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pit_compiler.ops import kernel_cache, traced, tvm_dtype
from pit_compiler.codegen.moe_kernels import moe_kernel
from pit_compiler.targets import target_for


INDEX_CHUNK = 64  # tokens per task of the index kernel


class ExpertIndex(NamedTuple):
    """Tokens per expert: ``indices[e, :counts[e]]`` in token order; ``slots[t, c]`` or -1 if dropped."""

    counts: torch.Tensor
    indices: torch.Tensor
    slots: torch.Tensor


def _kernel(form: str, device: torch.device, **options):
    return moe_kernel(form, target_for(device), kernel_cache(), **options)


def expert_index(expert_of: torch.Tensor, num_experts: int, capacity: int | None = None) -> ExpertIndex:
    """List each expert's tokens from the router's choices ``expert_of`` (``(tokens, top_k)`` ints).

    ``capacity`` caps each list (later tokens are dropped, Switch's rule); ``None`` keeps all.
    Runs on ``expert_of``'s device, with no host round trip.
    """
    if not isinstance(expert_of, torch.Tensor) or expert_of.dim() != 2 or expert_of.is_floating_point():
        raise ValueError(
            f"expert_of must be an integer tensor of shape (tokens, top_k), got "
            f"{getattr(expert_of, 'shape', type(expert_of).__name__)!r}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts!r}")
    tokens, top_k = expert_of.shape
    capacity = tokens * top_k if capacity is None else capacity
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, got {capacity!r}")
    if traced(expert_of):
        return ExpertIndex(*expert_index_op(expert_of, num_experts, capacity))
    return ExpertIndex(*_expert_index(expert_of, num_experts, capacity))


@torch.library.custom_op("pit::expert_index", mutates_args=())
def expert_index_op(
    expert_of: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts, indices, slots)`` of :class:`ExpertIndex`; an opaque operator to torch.compile,
    so a traced MoE layer keeps its TVM call in the graph."""
    return _expert_index(expert_of, num_experts, capacity)


def _expert_index(expert_of: torch.Tensor, num_experts: int, capacity: int) -> tuple:
    """:func:`expert_index_op`'s work, which eager calls run without the operator's dispatch."""
    tokens, top_k = expert_of.shape
    device = expert_of.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    indices = torch.empty((num_experts, capacity), dtype=torch.int32, device=device)
    slots = torch.empty((tokens, top_k), dtype=torch.int32, device=device)
    if expert_of.numel() == 0 or capacity == 0:
        return counts.zero_(), indices, slots.fill_(-1)
    offsets = torch.empty((num_experts, -(-tokens // INDEX_CHUNK)), dtype=torch.int32, device=device)
    kernel = _kernel("index", device, chunk=INDEX_CHUNK)
    kernel(expert_of.to(torch.int32).contiguous(), counts, indices, slots, offsets)
    return counts, indices, slots


@expert_index_op.register_fake
def _(expert_of, num_experts, capacity):
    tokens, top_k = expert_of.shape
    shapes = ((num_experts,), (num_experts, capacity), (tokens, top_k))
    return tuple(expert_of.new_empty(shape, dtype=torch.int32) for shape in shapes)


def _output(out, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {tuple(shape)} {dtype} tensor on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def _compact(**operands) -> list:
    """The operands as the kernels read them (compact), checked to share one dtype."""
    present = {name: t for name, t in operands.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        found = ", ".join(f"{name} {t.dtype}" for name, t in present.items())
        raise TypeError(f"MoE kernel operands must share one dtype, got {found}; cast them with .to()")
    return [t.contiguous() for t in present.values()]


def gather_matmul(x, w, bias, index: ExpertIndex, slots: int, weight_order: str = "fk", out=None) -> torch.Tensor:
    """``P[e, j] = x[indices[e, j]] @ w[e]^T (+ bias[e])`` as ``(E, slots, F)``; no autograd."""
    E = w.shape[0]
    F = w.shape[1] if weight_order == "fk" else w.shape[2]
    p = _output(out, (E, slots, F), x.dtype, x.device)
    kernel = _kernel(
        "gather", x.device, dtype=tvm_dtype(x.dtype, "x"), weight_order=weight_order, bias=bias is not None
    )
    kernel(*_compact(x=x, w=w, bias=bias), index.counts, index.indices, p)
    return p


def scatter_matmul(
    p, w, bias, gate, index: ExpertIndex, tokens: int, weight_order: str = "nf", out=None
) -> torch.Tensor:
    """``Y[indices[e, j]] += gate[e, j] * (p[e, j] @ w[e]^T + bias[e])`` as float32 ``(tokens, N)``."""
    N = w.shape[1] if weight_order == "nf" else w.shape[2]
    y = _output(out, (tokens, N), torch.float32, p.device)
    kernel = _kernel(
        "scatter",
        p.device,
        dtype=tvm_dtype(p.dtype, "p"),
        weight_order=weight_order,
        gate=gate is not None,
        bias=bias is not None,
    )
    kernel(*_compact(p=p, w=w, bias=bias, gate=gate), index.counts, index.indices, y)
    return y


def weight_grad(g, x, index: ExpertIndex, out_order: str = "ab", out=None) -> torch.Tensor:
    """``dW[e, a, b] = sum_j g[e, j, a] * x[indices[e, j], b]`` (``out_order="ba"``: ``(E, B, A)``)."""
    E, A, B = g.shape[0], g.shape[2], x.shape[1]
    dw = _output(out, (E, A, B) if out_order == "ab" else (E, B, A), g.dtype, g.device)
    kernel = _kernel("weight_grad", g.device, dtype=tvm_dtype(g.dtype, "g"), out_order=out_order)
    kernel(*_compact(g=g, x=x), index.counts, index.indices, dw)
    return dw


def _slot_sum(packed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum over each expert's listed slots of ``(E, S, F)``: the gradient of a per-expert bias."""
    valid = torch.arange(packed.shape[1], device=packed.device) < counts[:, None]
    return torch.einsum("esf,es->ef", packed, valid.to(packed.dtype))


class GroupedGatherMatmul(torch.autograd.Function):
    """Differentiable :func:`gather_matmul` in nn.Linear layout (``w`` is ``(E, F, K)``)."""

    @staticmethod
    def forward(ctx, x, w, bias, counts, indices, slots: int):
        index = ExpertIndex(counts, indices, None)
        ctx.save_for_backward(x, w, counts, indices)
        ctx.has_bias = bias is not None
        return gather_matmul(x, w, bias, index, slots)

    @staticmethod
    def backward(ctx, dp):
        x, w, counts, indices = ctx.saved_tensors
        index = ExpertIndex(counts, indices, None)
        dp = dp.contiguous()
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            dx = scatter_matmul(dp, w, None, None, index, x.shape[0], weight_order="fn").to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dp, x, index, "ab")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = _slot_sum(dp, counts)
        return dx, dw, dbias, None, None, None


class GroupedScatterMatmul(torch.autograd.Function):
    """Differentiable :func:`scatter_matmul` in nn.Linear layout (``w`` is ``(E, N, F)``); ``gate`` may be None."""

    @staticmethod
    def forward(ctx, h, w, bias, gate, counts, indices, tokens: int):
        index = ExpertIndex(counts, indices, None)
        ctx.save_for_backward(h, w, bias, gate, counts, indices)
        return scatter_matmul(h, w, bias, gate, index, tokens).to(h.dtype)

    @staticmethod
    def backward(ctx, dy):
        h, w, bias, gate, counts, indices = ctx.saved_tensors
        index = ExpertIndex(counts, indices, None)
        dy = dy.contiguous()
        slots = h.shape[1]
        need_h, need_w, need_bias, need_gate = ctx.needs_input_grad[:4]
        dh = dw = dbias = dgate = None
        if gate is None:
            gate = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        # dz[e, j, f] = sum_n dy[token, n] * w[e, n, f]: the gradient before the gate's scaling.
        dz = gather_matmul(dy, w, None, index, slots, weight_order="kf") if need_h or need_gate else None
        if need_h:
            dh = dz * gate[..., None]
        if need_w:
            dw = weight_grad(h * gate[..., None], dy, index, "ba")
        if need_bias:
            dbias = weight_grad(gate[..., None].contiguous(), dy, index, "ab")[:, 0]
        if need_gate:
            # d/dgate of gate * (h @ w^T + bias) . dy = h . dz + bias . dy[token]
            dgate = (h * dz).sum(-1)
            if bias is not None:
                dgate = dgate + gather_matmul(dy, bias[:, None, :], None, index, slots)[..., 0]
        return dh, dw, dbias, dgate, None, None, None
