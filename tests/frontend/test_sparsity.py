"""Sparsity attributes on fx graphs: made by ReLU, kept by zero-keeping operations only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from pit_compiler.frontend.sparsity import SPARSE, propagate_sparsity


def marked(fn) -> set[str]:
    gm = fx.symbolic_trace(fn)
    propagate_sparsity(gm)
    return {node.name for node in gm.graph.nodes if SPARSE in node.meta}


def test_relu_and_what_keeps_its_zeros():
    def f(x, y):
        a = torch.relu(x)
        b = F.dropout(a, 0.1).view(-1).reshape(x.shape)
        c = b * y  # a product is zero wherever one factor is
        d = b + y  # a sum is not
        e = F.gelu(c)  # gelu(0) == 0
        return d, e

    assert marked(f) == {"relu", "dropout", "view", "reshape", "mul", "gelu"}


def test_methods_and_modules():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.drop = nn.Dropout()
            self.sig = nn.Sigmoid()

        def forward(self, x):
            return self.sig(self.drop(self.act(x))), x.relu().transpose(0, 1), self.sig(x)

    assert marked(M()) == {"act", "drop", "relu", "transpose"}


def test_threshold_to_zero_is_a_source_but_to_other_values_is_not():
    def f(x):
        return F.threshold(x, 0.5, 0.0), F.threshold(x, 0.5, 1.0)

    gm = fx.symbolic_trace(f)
    propagate_sparsity(gm)
    to_zero, to_one = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert SPARSE in to_zero.meta and SPARSE not in to_one.meta


def test_nothing_sparse_in_a_dense_graph():
    def f(x, w):
        return torch.sigmoid(x @ w) + 1

    assert marked(f) == set()
