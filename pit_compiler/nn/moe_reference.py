"""Eager Mixture-of-Experts blocks: the structures :class:`~pit_compiler.nn.moe.SparseMoE` matches.

Each is the plain PyTorch way, a Python loop of small per-expert matmuls, and the reference
PIT is checked against. Expert weights are stacked per expert in nn.Linear layout
(``w1[e]`` is ``(d_ff, d_model)``), so the grouped kernels read the very same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype):
    """``(weights, experts)``, each ``(tokens, top_k)``: softmax in float32, then top-k.

    Shared by the references and SparseMoE, so both route every token identically.
    """
    probabilities = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def expert_capacity(tokens: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Switch's per-expert token budget ``ceil(capacity_factor * tokens / num_experts)``."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens / num_experts)


def kept_by_capacity(experts: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """Which (token, choice) pairs fit: each expert keeps its first ``capacity`` in token order."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    one_hot = F.one_hot(experts.flatten(), num_experts)
    position = one_hot.cumsum(dim=0).gather(1, experts.flatten()[:, None]).view_as(experts)
    return position <= capacity


def _linear_weights(num_experts: int, out_features: int, in_features: int, bias: bool):
    """Per-expert weights initialised as nn.Linear initialises one."""
    weight = torch.empty(num_experts, out_features, in_features)
    bound = 1 / math.sqrt(in_features)
    for e in range(num_experts):
        nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))
    b = nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound)) if bias else None
    return nn.Parameter(weight), b


class _EagerMoE(nn.Module):
    """Routing and the per-expert loop both references share."""

    num_experts: int
    top_k: int
    renormalize: bool
    capacity_factor: float | None

    def route(self, x2d: torch.Tensor):
        return route_top_k(self.router(x2d), self.top_k, self.renormalize, x2d.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(x2d)
        capacity = expert_capacity(x2d.shape[0], self.num_experts, self.capacity_factor)
        kept = kept_by_capacity(experts, self.num_experts, capacity)
        out = torch.zeros_like(x2d)
        for e in range(self.num_experts):
            rows, choice = torch.nonzero((experts == e) & kept, as_tuple=True)
            y = self.expert(e, x2d[rows]) * weights[rows, choice, None]
            out = out.index_add(0, rows, y)
        return out.view_as(x)


class SwitchMoE(_EagerMoE):
    """Switch Transformer's MoE: top-1 routing with an expert capacity, ReLU experts.

    A token beyond its expert's capacity (in token order) gets zero output: the model's
    residual connection carries it. Outputs are scaled by the router probability.
    """

    top_k = 1
    renormalize = False

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, capacity_factor: float | None = 1.25, bias: bool = True
    ):
        super().__init__()
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = nn.Linear(d_model, num_experts)
        self.w1, self.b1 = _linear_weights(num_experts, d_ff, d_model, bias)
        self.w2, self.b2 = _linear_weights(num_experts, d_model, d_ff, bias)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        b1 = None if self.b1 is None else self.b1[e]
        b2 = None if self.b2 is None else self.b2[e]
        return F.linear(F.relu(F.linear(x, self.w1[e], b1)), self.w2[e], b2)


class MixtralMoE(_EagerMoE):
    """Mixtral's sparse MoE: top-k routing with renormalised weights, SwiGLU experts, no capacity."""

    renormalize = True
    capacity_factor = None

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w1, _ = _linear_weights(num_experts, d_ff, d_model, False)
        self.w3, _ = _linear_weights(num_experts, d_ff, d_model, False)
        self.w2, _ = _linear_weights(num_experts, d_model, d_ff, False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])
