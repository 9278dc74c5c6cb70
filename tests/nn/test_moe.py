"""SparseMoE against the eager MoE blocks it replaces: forward, capacity drops, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pit_compiler.errors import UnsupportedPattern
from pit_compiler.nn.moe import SparseMoE
from pit_compiler.nn.moe_reference import MixtralMoE, SwitchMoE, expert_capacity, kept_by_capacity

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D_MODEL, D_FF = 32, 48
# Relative to the largest reference entry. Both sides round every linear's output to the dtype,
# at the same points; they differ in summation order, and PIT adds top-k rows in float32.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# PIT's grouped kernels, and the same packed tokens through batched dense products.
EXPERT_PATHS = ["grouped", "batched"]


def reference_module(structure: str, num_experts: int, dtype=torch.float32, device="cpu", seed=0, **options):
    torch.manual_seed(seed)
    if structure == "switch":
        module = SwitchMoE(D_MODEL, D_FF, num_experts, **{"capacity_factor": 1.25, **options})
    else:
        module = MixtralMoE(D_MODEL, D_FF, num_experts, **{"top_k": min(2, num_experts), **options})
    return module.to(device=device, dtype=dtype)


def tokens_of(count: int, dtype, device, seed=1, requires_grad=False) -> torch.Tensor:
    """``(count, d)``, or ``(batch, seq, d)`` when ``count`` splits in two."""
    shape = (2, count // 2, D_MODEL) if count % 2 == 0 else (count, D_MODEL)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def assert_close_to(result: torch.Tensor, expected: torch.Tensor) -> None:
    assert result.shape == expected.shape and result.dtype == expected.dtype
    assert not torch.isnan(result).any(), "output has NaN: some element was never written"
    scale = max(expected.abs().max().item(), 1e-3)
    tolerance = TOLERANCE[result.dtype] * scale
    torch.testing.assert_close(result.double().cpu(), expected.double().cpu(), rtol=0, atol=tolerance)


def route_all_to(module: nn.Module, expert: int) -> None:
    """Make the router send every token to ``expert`` first (ties after it, in index order)."""
    with torch.no_grad():
        module.router.weight.zero_()
        if module.router.bias is not None:
            module.router.bias.zero_()
            module.router.bias[expert] = 4.0
        else:
            module.router.weight[expert] = 0.0
            module.router.weight[expert, 0] = 1e3  # x[:, 0] > 0 below


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["switch", "mixtral"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 37, 130])
@pytest.mark.parametrize("num_experts", [1, 4, 8])
@pytest.mark.parametrize("experts", EXPERT_PATHS)
def test_forward_matches_eager(structure, dtype, tokens, num_experts, experts, device):
    reference = reference_module(structure, num_experts, dtype, device)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(experts=experts))
    x = tokens_of(tokens, dtype, device)
    with torch.no_grad():
        assert_close_to(moe(x), reference(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["switch", "mixtral"])
@pytest.mark.parametrize("experts", EXPERT_PATHS)
def test_experts_with_no_tokens_and_all_tokens_on_one(structure, experts, device):
    reference = reference_module(structure, 8, device=device, capacity_factor=None) if structure == "switch" else (
        reference_module(structure, 8, device=device)
    )
    route_all_to(reference, 5)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(experts=experts))
    x = tokens_of(37, torch.float32, device).abs()
    _, _, index = moe.route(x)
    assert index.counts[5].item() == 37
    assert index.counts.sum().item() == 37 * moe.top_k
    with torch.no_grad():
        assert_close_to(moe(x), reference(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", ["fullest", "capacity"])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("experts", EXPERT_PATHS)
def test_capacity_drops_exactly_the_reference_tokens(slots, skew, experts, device):
    """Tokens past an expert's capacity (in token order) give zero; every other token is kept."""
    reference = reference_module("switch", 4, device=device, capacity_factor=1.0)
    if skew:
        route_all_to(reference, 2)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(slots=slots, experts=experts))
    x = tokens_of(130, torch.float32, device).abs()
    weights, experts, index = moe.route(x)
    expected_kept = kept_by_capacity(experts, 4, expert_capacity(130, 4, 1.0))
    assert not expected_kept.all(), "the case should overflow some expert"
    assert torch.equal(index.slots >= 0, expected_kept)
    with torch.no_grad():
        y = moe(x).reshape(130, D_MODEL)
        assert_close_to(y, reference(x).reshape(130, D_MODEL))
    assert (y[~expected_kept[:, 0]] == 0).all()
    assert (y[expected_kept[:, 0]].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "structure,options",
    [("switch", {}), ("switch", {"bias": False, "capacity_factor": None}), ("mixtral", {}), ("mixtral", {"top_k": 3})],
    ids=["switch-capacity", "switch-no-bias", "mixtral-top2", "mixtral-top3"],
)
@pytest.mark.parametrize("experts", EXPERT_PATHS)
def test_gradients_match_eager(structure, options, experts, device):
    """d(input), d(every expert weight and bias) and d(router) through the PIT backward kernels
    (or, batched, through torch's autograd of the same packed products)."""
    reference = reference_module(structure, 4, device=device, **options)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(experts=experts))
    x = tokens_of(38, torch.float32, device, requires_grad=True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    parameters = [x, *reference.parameters()]
    expected = torch.autograd.grad(reference(x), parameters, grad_out)
    result = torch.autograd.grad(moe(x), parameters, grad_out)
    names = ["x", *(name for name, _ in reference.named_parameters())]
    for name, got, want in zip(names, result, expected):
        scale = max(want.abs().max().item(), 1e-3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("device,fallback,batched", [("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_auto_batches_the_experts_on_a_gpu(device, fallback, batched, monkeypatch):
    """``experts="auto"`` runs batched cuBLAS products where the dense fallback applies (a GPU),
    PIT's grouped kernels elsewhere (and in the kernels' own tests, which turn the fallback off)."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "DENSE_FALLBACK", fallback)
    moe = SparseMoE.from_module(reference_module("switch", 4))
    assert moe._batched(torch.device(device)) is batched
    assert SparseMoE.from_module(reference_module("switch", 4), SparseMoE.Knobs(experts="grouped"))._batched(
        torch.device(device)
    ) is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["switch", "mixtral"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_batched_experts_compile_to_one_graph(structure, dynamic, device):
    """``torch.compile(fullgraph=True)``: the expert index is an operator and the slots the
    bound known without a sync, so the batched path (a GPU's default) is one graph; two token
    counts through one compiled layer, each against the reference."""
    reference = reference_module(structure, 8, torch.float32, device)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(experts="batched"))
    compiled = torch.compile(moe, backend="eager", fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for tokens in (37, 64):
            x = tokens_of(tokens, torch.float32, device)
            assert_close_to(compiled(x), reference(x))


def test_a_capture_sizes_the_slots_without_reading_the_device(monkeypatch):
    """While a CUDA graph is captured (patched in here) no count is read back: the slots are
    the capacity bound, and the result is the reference's."""
    from pit_compiler import ops

    reference = reference_module("switch", 8)
    moe = SparseMoE.from_module(reference, SparseMoE.Knobs(experts="batched"))
    x = tokens_of(64, torch.float32, "cpu")
    monkeypatch.setattr(ops, "capturing_graph", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("read a count back during a capture"))
    with torch.no_grad():
        result = moe(x)
    monkeypatch.undo()
    assert_close_to(result, reference(x))


def test_parameters_are_shared_not_copied():
    reference = reference_module("switch", 4)
    moe = SparseMoE.from_module(reference)
    assert {id(p) for p in moe.parameters()} == {id(p) for p in reference.parameters()}
    assert moe.w1 is reference.w1 and moe.router is reference.router
    with torch.no_grad():
        reference.w2.mul_(2)  # a change to the reference is seen by PIT at once
        x = tokens_of(37, torch.float32, "cpu")
        assert_close_to(moe(x), reference(x))


def test_empty_input_and_repr():
    moe = SparseMoE.from_module(reference_module("mixtral", 4))
    assert moe(torch.zeros(0, D_MODEL)).shape == (0, D_MODEL)
    assert "top_k=2" in repr(moe) and "gated" in repr(moe)


def test_bad_inputs_raise_clear_errors():
    moe = SparseMoE.from_module(reference_module("switch", 4))
    with pytest.raises(UnsupportedPattern, match="SwitchMoE or MixtralMoE.*'Linear'"):
        SparseMoE.from_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., d_model=32\)"):
        moe(torch.randn(5, 31))
    with pytest.raises(TypeError, match="x is torch.float16"):
        moe(torch.randn(5, D_MODEL, dtype=torch.float16))
    router = nn.Linear(D_MODEL, 4)
    with pytest.raises(ValueError, match=r"w2 must have shape \(4, 32, 48\)"):
        SparseMoE(router, torch.zeros(4, 48, 32), torch.zeros(4, 48, 32))
    with pytest.raises(ValueError, match=r"b1 must have shape \(4, 48\)"):
        SparseMoE(router, torch.zeros(4, 48, 32), torch.zeros(4, 32, 48), b1=torch.zeros(4, 32))
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(router, torch.zeros(4, 48, 32), torch.zeros(4, 32, 48), top_k=5)
    with pytest.raises(TypeError, match="router"):
        SparseMoE(nn.Conv1d(1, 1, 1), torch.zeros(4, 48, 32), torch.zeros(4, 32, 48))
    with pytest.raises(ValueError, match="Knobs.slots"):
        SparseMoE.Knobs(slots="max")
    with pytest.raises(ValueError, match="Knobs.experts must be one of"):
        SparseMoE.Knobs(experts="cublas")
