"""SparseMoE: an MoE block whose experts run as grouped PIT kernels.

The router (linear, softmax, top-k) stays in PyTorch. Its choices become an on-device index of
each expert's tokens; one gather kernel computes every expert's first linear over its gathered
tokens at once, the activation runs in torch on the packed result, and one scatter kernel
computes the second linear and adds each row, scaled by its router weight, back to its token.
On a GPU the same packed form runs its two linears as batched cuBLAS products instead (the
grouped kernels compute one output per thread, without tensor cores). No token is dropped
unless the model's own capacity rule drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pit_compiler import ops
from pit_compiler.errors import UnsupportedPattern

from .moe_ops import ExpertIndex, GroupedGatherMatmul, GroupedScatterMatmul, expert_index
from .moe_reference import MixtralMoE, SwitchMoE, expert_capacity, route_top_k

SLOT_POLICIES = ("fullest", "capacity")
EXPERT_PATHS = ("auto", "grouped", "batched")


class SparseMoE(nn.Module):
    """Drop-in for :class:`SwitchMoE` or :class:`MixtralMoE`, sharing their parameters.

    Experts compute ``w2(act(w1 x + b1) [* w3 x]) + b2`` in nn.Linear layout: ``w1``/``w3`` are
    ``(E, d_ff, d_model)``, ``w2`` is ``(E, d_model, d_ff)``. Input is ``(..., d_model)``.
    """

    @dataclass(frozen=True)
    class Knobs:
        """``slots``: rows per expert of the packed activations.

        ``"fullest"`` sizes them to the fullest expert, read back from the device (4 bytes, one
        sync per call; under ``torch.compile`` or CUDA graph capture, the bound instead);
        ``"capacity"`` uses the bound known without a sync (the capacity, or every token when
        the model has none): CUDA-graph friendly, but without a capacity it holds ``E / top_k``
        times the activations a model needs.

        ``experts``: what computes the experts' linears on the packed tokens. ``"grouped"``:
        PIT's grouped gather and scatter kernels; ``"batched"``: the packed tokens gathered by the
        same index, then batched cuBLAS products (``torch.baddbmm``) and one ``index_add``;
        ``"auto"``: batched on a GPU (while the dense fallback is on,
        :data:`pit_compiler.ops.DENSE_FALLBACK`), grouped elsewhere.
        """

        slots: str = "fullest"
        experts: str = "auto"

        def __post_init__(self):
            if self.slots not in SLOT_POLICIES:
                raise ValueError(f"Knobs.slots must be one of {SLOT_POLICIES}, got {self.slots!r}")
            if self.experts not in EXPERT_PATHS:
                raise ValueError(f"Knobs.experts must be one of {EXPERT_PATHS}, got {self.experts!r}")

    def __init__(
        self,
        router: nn.Linear,
        w1: torch.Tensor,
        w2: torch.Tensor,
        *,
        b1: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        w3: torch.Tensor | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        top_k: int = 1,
        renormalize: bool = False,
        capacity_factor: float | None = None,
        knobs: SparseMoE.Knobs | None = None,
    ):
        super().__init__()
        if not isinstance(router, nn.Linear):
            raise TypeError(f"router must be an nn.Linear(d_model, num_experts), got {type(router).__name__}")
        E, d = router.out_features, router.in_features
        d_ff = _check_weight("w1", w1, None, (E, None, d))
        _check_weight("w2", w2, w1, (E, d, d_ff))
        _check_weight("w3", w3, w1, (E, d_ff, d))
        _check_weight("b1", b1, w1, (E, d_ff))
        _check_weight("b2", b2, w1, (E, d))
        if not (isinstance(top_k, int) and 1 <= top_k <= E):
            raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        self.router = router
        for name, value in (("w1", w1), ("w2", w2), ("w3", w3), ("b1", b1), ("b2", b2)):
            _share(self, name, value)
        self.activation = activation
        self.num_experts, self.d_model, self.d_ff = E, d, d_ff
        self.top_k, self.renormalize, self.capacity_factor = top_k, renormalize, capacity_factor
        self.knobs = knobs if knobs is not None else SparseMoE.Knobs()

    @classmethod
    def from_module(cls, module: nn.Module, knobs: SparseMoE.Knobs | None = None) -> SparseMoE:
        """The PIT version of a reference MoE block; parameters are shared, not copied."""
        if isinstance(module, SwitchMoE):
            return cls(
                module.router,
                module.w1,
                module.w2,
                b1=module.b1,
                b2=module.b2,
                activation=F.relu,
                top_k=1,
                capacity_factor=module.capacity_factor,
                knobs=knobs,
            )
        if isinstance(module, MixtralMoE):
            return cls(
                module.router,
                module.w1,
                module.w2,
                w3=module.w3,
                activation=F.silu,
                top_k=module.top_k,
                renormalize=True,
                knobs=knobs,
            )
        raise UnsupportedPattern(
            f"SparseMoE.from_module accepts SwitchMoE or MixtralMoE from pit_compiler.nn.moe_reference, "
            f"got {type(module).__name__!r}; build SparseMoE(router, w1, w2, ...) from its weights instead"
        )

    def extra_repr(self) -> str:
        glu = ", gated (w3)" if self.w3 is not None else ""
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}{glu}, knobs={self.knobs}"
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ExpertIndex]:
        """``(weights, experts, index)`` for ``x``: router weights and choices, each ``(tokens, top_k)``,
        and each expert's token list after the capacity rule."""
        x2d = self._check_input(x).reshape(-1, self.d_model)
        weights, experts = route_top_k(self.router(x2d), self.top_k, self.renormalize, x.dtype)
        capacity = expert_capacity(x2d.shape[0], self.num_experts, self.capacity_factor)
        # top-k choices of one token are distinct, so no list can exceed the token count.
        bound = x2d.shape[0] if capacity is None else min(capacity, x2d.shape[0])
        return weights, experts, expert_index(experts, self.num_experts, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts, index = self.route(x)
        x2d = x.reshape(-1, self.d_model).contiguous()
        tokens = x2d.shape[0]
        if tokens == 0:
            return torch.zeros_like(x)
        # Traced or captured in a CUDA graph, the slots are the bound known without a sync:
        # reading the fullest expert's count back would break either (the results are the same;
        # the packing is larger).
        traced = torch.compiler.is_compiling() or ops.capturing_graph(x.device)
        fullest = self.knobs.slots == "fullest" and not traced
        slots = max(int(index.counts.max()) if fullest else index.indices.shape[1], 1)
        gate = _pack_gates(weights, experts, index.slots, self.num_experts, slots)
        if self._batched(x.device):
            return self._batched_experts(x2d, index, gate, slots).view(x.shape)
        return self._grouped_experts(x2d, index, gate, slots).view(x.shape)

    # PIT's grouped kernels are TVM calls inside autograd Functions, which dynamo cannot trace:
    # they run as they are (a graph break; the batched path, a GPU's default, traces whole).
    @torch.compiler.disable
    def _grouped_experts(self, x2d, index: ExpertIndex, gate: torch.Tensor, slots: int) -> torch.Tensor:
        h = GroupedGatherMatmul.apply(x2d, self.w1, self.b1, index.counts, index.indices, slots)
        h = self.activation(h)
        if self.w3 is not None:
            h = h * GroupedGatherMatmul.apply(x2d, self.w3, None, index.counts, index.indices, slots)
        return GroupedScatterMatmul.apply(h, self.w2, self.b2, gate, index.counts, index.indices, x2d.shape[0])

    def _batched(self, device: torch.device) -> bool:
        if self.knobs.experts == "auto":
            return ops.weighs_dense_kernels(device)
        return self.knobs.experts == "batched"

    def _batched_experts(self, x2d, index: ExpertIndex, gate: torch.Tensor, slots: int) -> torch.Tensor:
        """The experts on the packed tokens as batched dense products: gather, two (or three)
        ``baddbmm``, scale by the gate, ``index_add`` back. Slots past an expert's count read
        and write one spare row past the tokens, which is cut off."""
        tokens = x2d.shape[0]
        listed = torch.arange(slots, device=x2d.device) < index.counts[:, None]
        rows = torch.where(listed, index.indices[:, :slots], tokens).long()
        packed = torch.cat([x2d, x2d.new_zeros(1, self.d_model)])[rows]
        h = self.activation(_linear_batched(packed, self.w1, self.b1))
        if self.w3 is not None:
            h = h * _linear_batched(packed, self.w3, None)
        y = _linear_batched(h, self.w2, self.b2) * gate[..., None]
        out = x2d.new_zeros(tokens + 1, self.d_model, dtype=torch.float32)
        out = out.index_add(0, rows.flatten(), y.reshape(-1, self.d_model).float())
        return out[:tokens].to(x2d.dtype)

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be (..., d_model={self.d_model}), e.g. (batch, seq, {self.d_model}) or "
                f"(tokens, {self.d_model}); got shape {tuple(x.shape)}"
            )
        if x.dtype != self.w1.dtype or x.device != self.w1.device:
            raise TypeError(
                f"x is {x.dtype} on {x.device} but the expert weights are {self.w1.dtype} on "
                f"{self.w1.device}; convert one with .to()"
            )
        return x


def _linear_batched(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x[e] @ w[e]^T (+ bias[e])`` for every expert: ``(E, S, K)`` by nn.Linear-layout ``(E, F, K)``."""
    if bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(bias[:, None, :], x, w.transpose(1, 2))


def _pack_gates(weights, experts, slot_of, num_experts: int, slots: int) -> torch.Tensor:
    """Router weights placed at each choice's slot, ``(E, slots)``; differentiable, no host sync.

    Dropped choices land on one spare element past the end, which is then cut off.
    """
    spare = num_experts * slots
    place = torch.where(slot_of >= 0, experts * slots + slot_of, spare).flatten()
    packed = weights.new_zeros(spare + 1).scatter(0, place, weights.flatten())
    return packed[:spare].view(num_experts, slots)


def _check_weight(name: str, value, like, shape: tuple) -> int | None:
    """Check ``value`` against ``shape`` (``None`` entries free); return its second extent."""
    if value is None:
        if name in ("w1", "w2"):
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        expected = tuple("any" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {expected} (nn.Linear layout per expert), got {tuple(value.shape)}")
    if like is not None and (value.dtype != like.dtype or value.device != like.device):
        raise TypeError(f"{name} is {value.dtype} on {value.device}, but w1 is {like.dtype} on {like.device}")
    return value.shape[1] if value.dim() > 1 else None


def _share(module: nn.Module, name: str, value) -> None:
    """Hold ``value`` itself (never a copy), as a parameter if it is one."""
    if value is None or isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    else:
        module.register_buffer(name, value)
