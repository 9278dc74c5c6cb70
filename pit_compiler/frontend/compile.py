"""``pit.compile(model)``: the model back, with its sparse operators on PIT kernels."""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

from pit_compiler.backend import PITOptions
from pit_compiler.nn import SparseAttention, SparseLinear, SparseMoE, SparseTransformerEncoderLayer
from pit_compiler.validation import input_micro_tile_option

from .modules import ModuleOptions, replace_modules, replacement
from .rewrite import rewrite_sparse_consumers

log = logging.getLogger("pit_compiler")

# PIT's own modules stay whole in traced graphs: their insides are data-dependent.
_PIT_LEAVES = (SparseLinear, SparseAttention, SparseMoE, SparseTransformerEncoderLayer)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _PIT_LEAVES) or super().is_leaf_module(m, qualname)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def compile(
    model: nn.Module,
    example_inputs=None,
    *,
    input_micro_tile="auto",
    attention: bool = True,
    moe: bool = True,
    weight_micro_tile=(1, 32),
    min_weight_sparsity: float = 0.5,
    compiler: str = "eager",
) -> nn.Module:
    """Return ``model`` with its sparse operators replaced by PIT kernels.

    Parameters and buffers are shared with ``model``, which is left unchanged. Replaced:
    ``nn.MultiheadAttention`` (masks become sparse attention), the MoE blocks of
    :mod:`pit_compiler.nn.moe_reference`, linears whose weight has at least
    ``min_weight_sparsity`` empty ``weight_micro_tile`` pieces, and, in the traced graph,
    every linear or matmul fed by a ReLU through zero-keeping operations (its input's
    ``input_micro_tile`` pieces are detected at run time; ``"auto"`` picks, per call, the
    micro-tile the tile database predicts fastest, or dense ``torch.matmul`` where PIT would
    lose, and ``(32, 1)`` when nothing was tuned: see ``pit-tune``). The result is an ``fx.GraphModule``
    whose ``.code`` shows the rewrite; a model torch.fx cannot trace (data-dependent control
    flow, as in most HuggingFace models) is captured by ``torch.compile(backend="pit")``
    instead, around its graph breaks, and that is logged once, never raised.
    ``compiler`` runs the graph Dynamo captures: ``"eager"`` op by op, or ``"inductor"``
    (PyTorch's default compiler: fused elementwise kernels, less host time per op; compiling
    takes longer). On an H100 it took BERT-base (12 layers, 4096 padded tokens) from 15.4 to
    6.6 ms. An fx-traced model always runs op by op: under inductor its ``"auto"`` micro-tile
    choice (host reads) split the OPT feed-forward into 14 graphs, 0.78 ms became 1.59.
    ``example_inputs`` (a tuple), when given, runs the result once to build its kernels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_weight_sparsity <= 1.0:
        raise ValueError(f"min_weight_sparsity must be in [0, 1], got {min_weight_sparsity!r}")
    options = ModuleOptions(attention, moe, tuple(weight_micro_tile), min_weight_sparsity)
    input_micro_tile = input_micro_tile_option(input_micro_tile, 1)  # validated early
    backend_options = {"input_micro_tile": input_micro_tile, "compiler": compiler}
    PITOptions.from_dict(backend_options)  # validated early too

    replaced_model = _shared_copy(model)
    whole = replacement(replaced_model, options)
    if whole is not None:  # the model is itself a block PIT replaces (an MoE block, attention ...)
        log.info("pit.compile(%s): the model itself replaced by %s", type(model).__name__, type(whole).__name__)
        return _built(whole, example_inputs)
    replaced = replace_modules(replaced_model, options)
    compiled = replaced_model
    try:
        graph = _Tracer().trace(replaced_model)
        traced = fx.GraphModule(replaced_model, graph, type(model).__name__)
        report = rewrite_sparse_consumers(traced, input_micro_tile)
        compiled = traced
        log.info(
            "pit.compile(%s): %d modules replaced %s; %d sparse values, %d linears and %d matmuls on PIT",
            type(model).__name__, len(replaced), replaced, report.sparse_values, report.linears, report.matmuls,
        )
    except Exception as error:  # fx cannot trace it: dynamo captures what it can, around graph breaks
        from pit_compiler.backend import pit as pit_backend

        log.warning(
            "pit.compile(%s): torch.fx could not trace the model (%s: %s); capturing it with "
            "torch.compile(backend='pit') instead, %d modules replaced",
            type(model).__name__, type(error).__name__, str(error).splitlines()[0], len(replaced),
        )
        compiled = torch.compile(replaced_model, backend=pit_backend, options=backend_options)
    return _built(compiled, example_inputs)


def _built(compiled, example_inputs):
    """``compiled``, run once on ``example_inputs`` (when given) to build its kernels."""
    if example_inputs is not None:
        with torch.no_grad():
            compiled(*example_inputs)
    return compiled
