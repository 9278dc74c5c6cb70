"""Sparsity attributes on graph values: which operations make zeros, which keep them.

SparTA's "tensor with sparsity attribute", for fx graphs: a value is *sparse* when it comes
from a zero-making operation (ReLU) or from an operation that maps zeros to zeros applied to a
sparse value (a reshape, dropout, a product with anything). Consumers of sparse values are
where PIT kernels pay off; the micro-tile pattern itself is only known at run time, so the
kernels detect it online.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

SPARSE = "pit_sparse"  # node.meta key: the name of the zero-making operation upstream

# Zero-making: negative inputs become exact zeros.
SOURCE_FUNCTIONS = {torch.relu, F.relu, torch.relu_, F.relu6, F.hardtanh}
SOURCE_METHODS = {"relu", "relu_"}
SOURCE_MODULES = (nn.ReLU, nn.ReLU6)

# Zero-keeping, in their first tensor argument: f(0) = 0 elementwise, or a layout change.
KEEPING_FUNCTIONS = {
    F.dropout, torch.dropout, torch.neg, operator.neg, torch.abs, torch.square, torch.tanh,
    torch.sin, F.gelu, F.silu, torch.flatten, torch.reshape, torch.transpose, torch.permute,
    torch.clone, torch.detach,
}
KEEPING_METHODS = {
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "to", "float", "half",
    "bfloat16", "type", "clone", "detach", "neg", "abs", "tanh", "square", "type_as",
}
KEEPING_MODULES = (nn.Dropout, nn.GELU, nn.SiLU, nn.Tanh, nn.Flatten, nn.Identity)

# Zero-keeping in any operand: a product is zero wherever one factor is.
PRODUCT_FUNCTIONS = {operator.mul, torch.mul}
PRODUCT_METHODS = {"mul", "mul_"}


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_sparse(value) -> bool:
    return isinstance(value, fx.Node) and SPARSE in value.meta


def _first_tensor_arg(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def source_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of the operation that makes ``node`` sparse, or None."""
    if node.op == "call_function":
        if node.target in SOURCE_FUNCTIONS:
            return getattr(node.target, "__name__", str(node.target))
        if node.target is F.threshold and len(node.args) >= 3 and node.args[2] == 0:
            return "threshold"
        if node.target in KEEPING_FUNCTIONS and _is_sparse(_first_tensor_arg(node)):
            return _first_tensor_arg(node).meta[SPARSE]
        if node.target in PRODUCT_FUNCTIONS:
            return next((a.meta[SPARSE] for a in node.args if _is_sparse(a)), None)
    elif node.op == "call_method":
        if node.target in SOURCE_METHODS:
            return node.target
        if node.target in KEEPING_METHODS and _is_sparse(node.args[0]):
            return node.args[0].meta[SPARSE]
        if node.target in PRODUCT_METHODS:
            return next((a.meta[SPARSE] for a in node.args if _is_sparse(a)), None)
    elif node.op == "call_module":
        module = _module(gm, node)
        if isinstance(module, SOURCE_MODULES):
            return type(module).__name__
        if isinstance(module, KEEPING_MODULES) and _is_sparse(_first_tensor_arg(node)):
            return _first_tensor_arg(node).meta[SPARSE]
    return None


def propagate_sparsity(gm: fx.GraphModule) -> int:
    """Mark every node whose value is sparse (``node.meta[SPARSE]``); return how many."""
    marked = 0
    for node in gm.graph.nodes:
        node.meta.pop(SPARSE, None)
        source = source_of(gm, node)
        if source is not None:
            node.meta[SPARSE] = source
            marked += 1
    return marked
