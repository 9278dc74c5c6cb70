"""HuggingFace transformers layers from small configs (random weights, no downloads).

Optional: skipped where transformers is not installed.
"""

from __future__ import annotations

import logging

import pytest
import torch

import pit_compiler as pit

transformers = pytest.importorskip("transformers")


def opt_layer():
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, activation_function="relu")
    config._attn_implementation = "eager"
    return OPTDecoderLayer(config, layer_idx=0).eval()


def first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("capture", ["pit.compile", "torch.compile"])
def test_opt_decoder_layer(capture, caplog):
    import torch._dynamo

    torch._dynamo.reset()
    layer = opt_layer()
    x = torch.randn(2, 45, 64)
    with caplog.at_level(logging.INFO, logger="pit_compiler"):
        compiled = pit.compile(layer) if capture == "pit.compile" else torch.compile(layer, backend="pit")
        with torch.no_grad():
            result, expected = first(compiled(x)), first(layer(x))
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert any("1 operators on PIT" in r.getMessage() for r in caplog.records), "fc2 after ReLU was not rewritten"
    torch._dynamo.reset()


def switch_block():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersLayerFF

    torch.manual_seed(1)
    config = SwitchTransformersConfig(
        d_model=32, d_ff=64, num_experts=4, expert_capacity=6, num_heads=4, d_kv=8, dropout_rate=0.0
    )
    return SwitchTransformersLayerFF(config, is_sparse=True).eval()


def test_switch_transformers_layer():
    """HF's router, its per-sequence capacity (6 of 20 tokens per expert here drops some)."""
    from pit_compiler.nn.huggingface import SwitchTransformersMoE

    block = switch_block()
    compiled = pit.compile(block)
    assert type(compiled.mlp) is SwitchTransformersMoE
    x = torch.randn(3, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
        one_hot, _, _ = block.mlp.router(block.layer_norm(x))
    assert (one_hot.sum(-1) == 0).any(), "the case should drop tokens over capacity"
