"""PIT drop-ins for HuggingFace ``transformers`` blocks (used when transformers is installed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import SparseMoE
from .moe_ops import expert_index


class SwitchTransformersMoE(SparseMoE):
    """``SwitchTransformersSparseMLP`` on PIT's grouped kernels.

    Routing is HF's own router (top-1, its per-sequence ``expert_capacity``, its float32
    softmax), so the same tokens are kept and dropped. HF keeps one ``nn.Linear`` per expert;
    the grouped kernels read experts stacked in one tensor, so :meth:`from_module` stacks them:
    a copy, made once, which training this module would update instead of HF's modules.
    """

    @classmethod
    def from_module(cls, module: nn.Module, knobs: SparseMoE.Knobs | None = None) -> "SwitchTransformersMoE":
        if type(module).__name__ != "SwitchTransformersSparseMLP":
            raise TypeError(f"module must be a transformers SwitchTransformersSparseMLP, got {type(module).__name__}")
        experts = [module.experts[f"expert_{e}"] for e in range(module.router.num_experts)]
        if any(type(e.act) is not nn.ReLU for e in experts):
            raise TypeError("SwitchTransformersMoE covers ReLU experts (the released Switch checkpoints); got another activation")
        with torch.no_grad():
            w1 = nn.Parameter(torch.stack([e.wi.weight for e in experts]))
            w2 = nn.Parameter(torch.stack([e.wo.weight for e in experts]))
        moe = cls(module.router.classifier, w1, w2, activation=F.relu, top_k=1, knobs=knobs)
        moe.hf_router = module.router
        return moe

    def route(self, x: torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, d_model) as HF passes it, got shape {tuple(x.shape)}")
        one_hot, probabilities, _ = self.hf_router(x)  # capacity already applied, per sequence
        one_hot = one_hot.reshape(-1, self.num_experts)
        kept = one_hot.any(dim=-1, keepdim=True)
        # A dropped token is routed to expert E, which no list holds.
        experts = torch.where(kept, one_hot.argmax(dim=-1, keepdim=True), self.num_experts)
        weights = probabilities.reshape(-1, 1).to(x.dtype)
        return weights, experts, expert_index(experts, self.num_experts, experts.shape[0])
