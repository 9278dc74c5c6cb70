"""pit.compile and torch.compile(backend="pit") on small models built here."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import pit_compiler as pit
from sparse_data import assert_matches_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class OPTStyleFFN(nn.Module):
    """An OPT decoder's feed-forward block: ReLU activations feed the second linear."""

    def __init__(self, d_model=48, d_ff=96):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class DataDependent(nn.Module):
    """Python control flow on tensor values: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(torch.relu(x))
        return x


def double_forward(model, x):
    copy = {n: p.detach().double() for n, p in model.named_parameters()}
    return torch.func.functional_call(model, copy, (x.double(),))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ffn_equals_eager_and_shares_parameters(device):
    torch.manual_seed(0)
    model = OPTStyleFFN().to(device)
    compiled = pit.compile(model)
    assert type(compiled.fc2) is pit.nn.SparseLinear, "the ReLU-fed linear was not replaced"
    assert type(compiled.fc1) is nn.Linear, "a dense-fed linear was replaced"
    assert compiled.fc2.weight is model.fc2.weight
    assert type(model.fc2) is nn.Linear, "pit.compile changed the user's model"
    x = torch.randn(4, 37, 48, device=device)
    assert_matches_reference(compiled(x), double_forward(model, x))


@pytest.mark.parametrize("device", DEVICES)
def test_training_through_the_compiled_model(device):
    torch.manual_seed(1)
    model = OPTStyleFFN().to(device)
    compiled = pit.compile(model)
    x = torch.randn(2, 33, 48, device=device)
    compiled(x).square().mean().backward()
    pit_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(pit_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_pruned_linear_becomes_weight_sparse():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 8))
    with torch.no_grad():
        model[0].weight[:, :48] = 0
        model[0].weight[:20, 48:] = 0  # 140 of its 160 (1, 16) pieces are empty: 87.5 %
    compiled = pit.compile(model, weight_micro_tile=(1, 16), min_weight_sparsity=0.7)
    first, last = compiled.get_submodule("0"), compiled.get_submodule("2")
    assert type(first) is pit.nn.SparseLinear and first.weight_micro_tile == (1, 16)
    assert type(last) is nn.Linear
    x = torch.randn(5, 64)
    assert_matches_reference(compiled(x), double_forward(model, x))


def test_untraceable_model_is_captured_by_dynamo_with_one_warning(caplog):
    import torch._dynamo

    torch._dynamo.reset()
    model = DataDependent()
    with caplog.at_level(logging.INFO, logger="pit_compiler"):
        compiled = pit.compile(model)
        for sign in (1, -1):
            x = sign * torch.rand(3, 16)
            assert_matches_reference(compiled(x), double_forward(model, x))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not trace" in warnings[0].getMessage()
    rewrites = [r.getMessage() for r in caplog.records if "operators on PIT" in r.getMessage()]
    assert any("1 operators on PIT" in m for m in rewrites), rewrites  # the branch's ReLU -> linear
    torch._dynamo.reset()


def test_example_inputs_warm_up_and_bad_arguments():
    model = OPTStyleFFN()
    compiled = pit.compile(model, example_inputs=(torch.randn(2, 3, 48),))
    assert type(compiled.fc2) is pit.nn.SparseLinear
    with pytest.raises(TypeError, match="model"):
        pit.compile(lambda x: x)
    with pytest.raises(ValueError, match="min_weight_sparsity"):
        pit.compile(model, min_weight_sparsity=2.0)
    with pytest.raises(ValueError, match="micro_tile"):
        pit.compile(model, input_micro_tile=(0, 1))
    with pytest.raises(ValueError, match="compiler must be one of"):
        pit.compile(model, compiler="tvm")


def test_dynamo_backend_is_registered_by_entry_point():
    import torch._dynamo

    assert "pit" in torch._dynamo.list_backends()


def test_torch_compile_backend_matches_eager():
    import torch._dynamo

    torch.manual_seed(3)
    model = OPTStyleFFN()
    x = torch.randn(3, 29, 48)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="pit", options={"input_micro_tile": (32, 1)})
        assert_matches_reference(compiled(x), double_forward(model, x))
        with pytest.raises(Exception, match="Invalid pit backend option"):
            torch.compile(model, backend="pit", options={"bogus": 1})(x)
    finally:
        torch._dynamo.reset()


def test_backend_rewrites_the_relu_fed_linear():
    from torch import fx

    from pit_compiler.backend import pit as pit_backend
    from pit_compiler.nn.functional import sparse_linear

    gm = fx.symbolic_trace(lambda x, w: torch.nn.functional.linear(torch.relu(x), w))
    forward = pit_backend(gm, [torch.randn(4, 8), torch.randn(3, 8)])
    assert any(n.target is sparse_linear for n in gm.graph.nodes)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    torch.testing.assert_close(forward(x, w), torch.relu(x) @ w.t())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_with_padding_mask(norm_first, device):
    """BERT-style: a variable-length batch padded to the longest; attention and FFN skip it."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(48, 4, dim_feedforward=96, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(device).eval()
    compiled = pit.compile(model)
    assert all(type(m) is pit.nn.SparseTransformerEncoderLayer for m in compiled.layers)
    assert all(type(m.self_attn) is pit.nn.SparseAttention for m in compiled.layers)
    assert all(type(m.self_attn) is nn.MultiheadAttention for m in model.layers), "the user's model changed"
    lengths = torch.tensor([40, 7, 23], device=device)
    padding = torch.arange(40, device=device).view(1, -1) >= lengths.view(-1, 1)
    x = torch.randn(3, 40, 48, device=device)
    with torch.no_grad():
        result = compiled(x, src_key_padding_mask=padding)
        expected = model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(result[~padding], expected[~padding], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_runs_the_rewritten_graph(device):
    """``compiler="inductor"``: the graph Dynamo captures around the encoder's untraceable code
    is compiled by inductor, PIT's operators kept opaque, and computes what eager does; an
    fx-traced model stays an fx graph run op by op."""
    import torch._dynamo

    torch.manual_seed(6)
    torch._dynamo.reset()
    try:
        ffn = OPTStyleFFN().to(device)
        x = torch.randn(3, 29, 48, device=device)
        compiled = pit.compile(ffn, input_micro_tile=(32, 1), compiler="inductor")
        assert isinstance(compiled, torch.fx.GraphModule)
        with torch.no_grad():
            assert_matches_reference(compiled(x), double_forward(ffn, x))
        layer = nn.TransformerEncoderLayer(48, 4, dim_feedforward=96, dropout=0.0, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(device).eval()
        padding = torch.arange(40, device=device).view(1, -1) >= torch.tensor([40, 9], device=device).view(-1, 1)
        x = torch.randn(2, 40, 48, device=device)
        with torch.no_grad():
            result = pit.compile(encoder, compiler="inductor")(x, src_key_padding_mask=padding)
            expected = encoder(x, src_key_padding_mask=padding)
        torch.testing.assert_close(result[~padding], expected[~padding], rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["switch", "mixtral"])
def test_moe_block_is_replaced(kind, device):
    from pit_compiler.nn.moe_reference import MixtralMoE, SwitchMoE

    torch.manual_seed(5)
    moe = SwitchMoE(32, 64, 4) if kind == "switch" else MixtralMoE(32, 64, 4, top_k=2)
    model = nn.Sequential(nn.LayerNorm(32), moe).to(device)
    compiled = pit.compile(model)
    assert type(compiled.get_submodule("1")) is pit.nn.SparseMoE
    x = torch.randn(3, 19, 32, device=device)
    with torch.no_grad():
        assert_matches_reference(compiled(x), double_forward(model, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["switch", "attention", "pruned"])
def test_a_model_that_is_itself_a_replaced_block_is_replaced(kind, device, caplog):
    """``pit.compile(moe_block)`` (not only a model holding one) returns the block's drop-in,
    sharing its parameters, and tracing nothing further."""
    from pit_compiler.nn.moe_reference import SwitchMoE

    torch.manual_seed(6)
    x = torch.randn(3, 19, 32, device=device)
    if kind == "switch":
        model, expected_type, args = SwitchMoE(32, 64, 4), pit.nn.SparseMoE, (x,)
    elif kind == "attention":
        model, expected_type, args = nn.MultiheadAttention(32, 4, batch_first=True), pit.nn.SparseAttention, (x, x, x)
    else:
        model, expected_type, args = nn.Linear(32, 48), pit.nn.SparseLinear, (x,)
        with torch.no_grad():
            model.weight[:40] = 0  # 40 of 48 rows, i.e. of its 1x32 pieces, pruned
    model = model.to(device)
    with caplog.at_level("WARNING", logger="pit_compiler"):
        compiled = pit.compile(model, args)
    assert type(compiled) is expected_type
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}
    assert "could not trace" not in caplog.text
    with torch.no_grad():
        result, expected = compiled(*args), model(*args)
    if kind == "attention":
        result, expected = result[0], expected[0]
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
