"""pit.nn.SparseLinear: activation-sparse inputs, pruned weights, padded rows, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pit_compiler as pit
from sparse_data import assert_matches_reference, expand_mask, micro_tile_sparse

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_linear(in_features, out_features, dtype, device, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(device=device, dtype=dtype)


def reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(32, 1), (1, 16), (1, None)], ids=str)
def test_activation_sparse_input(tile, dtype, device):
    linear = make_linear(70, 45, dtype, device)
    x, _ = micro_tile_sparse((3, 37, 70), tile, 0.2, dtype, device, seed=2)
    module = pit.nn.SparseLinear.from_module(linear, input_micro_tile=tile)
    assert module.weight is linear.weight and module.bias is linear.bias
    assert_matches_reference(module(x), reference(linear, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_weight_index_is_built_once(dtype, device):
    linear = make_linear(96, 50, dtype, device)
    _, grid = micro_tile_sparse((50, 96), (1, 32), 0.3, torch.float32, "cpu", seed=3)
    with torch.no_grad():
        linear.weight.mul_(expand_mask(grid, (1, 32), (50, 96)).to(device=device, dtype=dtype))
    module = pit.nn.SparseLinear.from_module(linear, weight_micro_tile=(1, 32))
    x = torch.randn(2, 21, 96, device=device, dtype=dtype)
    assert_matches_reference(module(x), reference(linear, x))
    first = module.weight_grid()
    assert module.weight_grid() is first, "the weight index was rebuilt without a weight change"
    with torch.no_grad():
        linear.weight[:, :32] = 0  # prune further: the index must follow
    assert module.weight_grid() is not first
    assert_matches_reference(module(x), reference(linear, x))


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "graph-capture"])
@pytest.mark.parametrize("beats_dense", [False, True])
def test_pruned_weight_runs_dense_where_pit_would_lose(beats_dense, capturing, monkeypatch):
    """Where dense kernels are weighed (a GPU; patched in here), a pruned layer that no
    tensor-core tile takes, or too dense to win, runs F.linear: exact, the grid lists every
    non-zero piece of the weight. The choice reads no count from the device, so it holds while
    a CUDA graph is captured too (when the count-reading fallback is off)."""
    from pit_compiler import ops
    from pit_compiler.nn import linear as linear_module

    monkeypatch.setattr(ops, "weighs_dense_kernels", lambda device: True)
    monkeypatch.setattr(ops, "falls_back_on", lambda device: not capturing)
    monkeypatch.setattr(ops, "pruned_weight_beats_dense", lambda x2, weight, tile, listed: beats_dense)
    ran_pit = []
    original = linear_module.sparse_linear
    monkeypatch.setattr(linear_module, "sparse_linear", lambda *a, **k: ran_pit.append(1) or original(*a, **k))
    linear = make_linear(96, 64, torch.float32, "cpu")
    _, grid = micro_tile_sparse((64, 96), (32, 32), 0.5, torch.float32, "cpu", seed=4)
    with torch.no_grad():
        linear.weight.mul_(expand_mask(grid, (32, 32), (64, 96)))
    module = pit.nn.SparseLinear.from_module(linear, weight_micro_tile=(32, 32))
    x = torch.randn(3, 19, 96)
    assert_matches_reference(module(x), reference(linear, x))
    assert ran_pit == ([1] if beats_dense else [])


def test_pruned_weight_prediction_needs_a_tensor_core_tile_and_low_density(monkeypatch):
    """``pruned_weight_beats_dense``: False without a tensor-core tile for the transposed
    product (the CPU), else listed density against that tile's crossover."""
    from pit_compiler import ops

    x2, weight = torch.randn(64, 96), torch.randn(128, 96)
    assert not ops.pruned_weight_beats_dense(x2, weight, (64, 32), 0.01)

    def sparse_a_only(plan, *facts):
        return "reduce" if plan.sparse == "a" and plan.contraction.order("b") == ("k", "n") else None

    monkeypatch.setattr(ops, "tensor_core_kernel", sparse_a_only)  # 64-row blocks: crossover 0.35
    ops.clear_call_caches()  # the choices kept per call signature were made by the replaced function
    assert ops.pruned_weight_beats_dense(x2, weight, (64, 32), 0.2)
    assert not ops.pruned_weight_beats_dense(x2, weight, (64, 32), 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_are_skipped(device):
    """Variable-length batches: rows outside row_mask come out as the bias alone."""
    linear = make_linear(40, 24, torch.float32, device)
    lengths = torch.tensor([5, 17, 0, 12])
    row_mask = torch.arange(17).view(1, -1) < lengths.view(-1, 1)
    x = torch.randn(4, 17, 40, device=device)
    out = pit.nn.SparseLinear.from_module(linear)(x, row_mask=row_mask.to(device))
    expected = reference(linear, x)
    expected[~row_mask.to(device)] = linear.bias.double()
    assert_matches_reference(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["input", "weight"])
def test_gradients_match_dense_reference(mode, device):
    linear = make_linear(64, 40, torch.float32, device)
    if mode == "weight":
        with torch.no_grad():
            linear.weight[:, 32:] = 0
        module = pit.nn.SparseLinear.from_module(linear, weight_micro_tile=(1, 32))
        keep = torch.ones_like(linear.weight)
        keep[:, 32:] = 0
    else:
        module = pit.nn.SparseLinear.from_module(linear, input_micro_tile=(32, 1))
        keep = torch.ones_like(linear.weight)
    # The input's gradient is exact where the model's own ReLU lets it through; PIT zeroes it
    # in empty micro-tiles, where the ReLU's gradient is zero anyway.
    h = torch.randn(3, 33, 64, device=device).requires_grad_()
    module(torch.relu(h)).square().sum().backward()

    h_ref = h.detach().double().requires_grad_()
    w_ref = linear.weight.detach().double().requires_grad_()
    b_ref = linear.bias.detach().double().requires_grad_()
    torch.nn.functional.linear(torch.relu(h_ref), w_ref * keep.double(), b_ref).square().sum().backward()
    for actual, expected in [(h.grad, h_ref.grad), (linear.weight.grad, w_ref.grad), (linear.bias.grad, b_ref.grad)]:
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5 * scale)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="linear"):
        pit.nn.SparseLinear.from_module(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="micro_tile"):
        pit.nn.SparseLinear(8, 8, input_micro_tile=(0, 1))
    with pytest.raises(ValueError, match="row_mask"):
        pit.nn.SparseLinear(8, 4)(torch.randn(5, 8), row_mask=torch.ones(4, dtype=torch.bool))


def test_is_a_linear():
    module = pit.nn.SparseLinear(8, 4)
    assert isinstance(module, nn.Linear)
    assert set(module.state_dict()) == {"weight", "bias"}
    assert "input_micro_tile=(32, 1)" in repr(module)


@pytest.mark.parametrize("where", ["cpu", "as-on-a-gpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_pruned_layer_compiles_to_one_graph(dynamic, where, monkeypatch):
    """``torch.compile(fullgraph=True)`` of a pruned layer: no graph break where dense kernels
    are weighed either (the planner's choice would trace sympy), and the traced layer matches
    the dense one, padding rows included. On a GPU: float16, PIT's own choice of kernels."""
    from pit_compiler import ops

    device, dtype = ("cuda", torch.float16) if where == "cuda" else ("cpu", torch.float32)
    if where != "cuda":
        monkeypatch.setattr(ops, "weighs_dense_kernels", lambda device: where == "as-on-a-gpu")
    linear = make_linear(96, 64, dtype, device)
    _, grid = micro_tile_sparse((64, 96), (32, 32), 0.5, torch.float32, "cpu", seed=5)
    with torch.no_grad():
        linear.weight.mul_(expand_mask(grid, (32, 32), (64, 96)).to(device=device, dtype=dtype))
    module = pit.nn.SparseLinear.from_module(linear, weight_micro_tile=(32, 32))
    compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=dynamic)
    for tokens in (19, 24):
        x = torch.randn(3, tokens, 96, device=device, dtype=dtype)
        lengths = torch.tensor([tokens, 5, 0], device=device)
        row_mask = torch.arange(tokens, device=device).view(1, -1) < lengths.view(-1, 1)
        assert_matches_reference(compiled(x), reference(linear, x))
        expected = reference(linear, x)
        expected[~row_mask] = linear.bias.double()
        assert_matches_reference(compiled(x, row_mask=row_mask), expected)
        assert_matches_reference(module(x, row_mask=row_mask), expected)
