"""Replace the consumers of sparse graph values with PIT kernels; leave the rest alone."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from pit_compiler.api import sparse_matmul
from pit_compiler.nn.functional import sparse_linear
from pit_compiler.nn.linear import SparseLinear

from .sparsity import SPARSE, propagate_sparsity

log = logging.getLogger(__name__)

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}


@dataclass
class RewriteReport:
    """What one pass over a graph did, for the log line and for tests."""

    sparse_values: int = 0
    linears: int = 0
    matmuls: int = 0

    @property
    def rewritten(self) -> int:
        return self.linears + self.matmuls


def _input_is_sparse(node: fx.Node) -> bool:
    first = node.args[0] if node.args else node.kwargs.get("input")
    return isinstance(first, fx.Node) and SPARSE in first.meta


def rewrite_sparse_consumers(gm: fx.GraphModule, input_micro_tile=(32, 1)) -> RewriteReport:
    """Route linears and matmuls whose first operand is sparse through PIT; recompile ``gm``."""
    report = RewriteReport(sparse_values=propagate_sparsity(gm))
    for node in list(gm.graph.nodes):
        if not _input_is_sparse(node):
            continue
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
            linear = gm.get_submodule(node.target)
            _set_submodule(gm, node.target, SparseLinear.from_module(linear, input_micro_tile=input_micro_tile))
            report.linears += 1
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            node.target = sparse_linear
            node.kwargs = {**node.kwargs, "input_micro_tile": input_micro_tile}
            report.linears += 1
        elif node.op == "call_function" and node.target in MATMUL_FUNCTIONS:
            node.target = _sparse_matmul_or_dense
            node.kwargs = {**node.kwargs, "micro_tile": input_micro_tile}
            report.matmuls += 1
    gm.graph.lint()
    gm.recompile()
    return report


def _sparse_matmul_or_dense(A, B, *, micro_tile):
    """``A @ B`` through PIT where the shapes are a matmul PIT takes, else torch's."""
    if isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dim() == B.dim() and A.dim() in (2, 3):
        return sparse_matmul(A, B, micro_tile=micro_tile)
    return torch.matmul(A, B)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)
