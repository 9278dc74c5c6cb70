"""
Mixture of Experts
==================

In this tutorial you will replace an eager Mixture-of-Experts block with PIT kernels.

In doing so, you will learn about:

* why MoE routing is a *spatial-axis permutation*: gather each expert's tokens, compute a dense
  tile, scatter the results back to the same token rows;
* building the per-expert token index on the tensor's own device, with the model's capacity rule;
* ``pit.compile``: the MoE block of a model found and replaced, parameters shared;
* ``pit_compiler.nn.moe.SparseMoE.from_module``: a drop-in that shares the block's parameters
  and trains through PIT backward kernels;
* reading the TIR PIT generates, and timing PIT against the eager loop.
"""

# %%
# Motivation
# ----------
# A Switch Transformer layer sends each token to one of ``E`` experts, each a small
# feed-forward network. The eager way is a Python loop: for every expert, select its tokens,
# run two small matmuls, add the result back. Each expert's matmul is dense but tiny, and
# their sizes change with every batch.
#
# PIT sees the routing as dynamic sparsity on the token axis ``m`` of ``Y[m, n] = X[m, k] W[n, k]``.
# ``m`` is a spatial axis, so its rows may be permuted freely as long as input and output use the
# same permutation: gather the tokens of every expert into one packed tensor, run *one* grouped
# kernel for all experts, and write every row back to its own token (adding, when a token meets
# several experts). No token is dropped unless the model's own capacity rule drops it.

import torch

import pit_compiler as pit
from pit_compiler.codegen.build import default_knobs
from pit_compiler.codegen.moe import build_grouped_gather_matmul
from pit_compiler.nn.moe import SparseMoE
from pit_compiler.nn.moe_reference import SwitchMoE
from pit_compiler.targets import target_for
from pit_compiler.testing import do_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
# Build
# -----
# ``SwitchMoE`` is the eager reference: a router ``Linear(d, E)``, softmax, top-1, an expert
# capacity of ``ceil(capacity_factor * tokens / E)`` (later tokens beyond it give zero output;
# the residual carries them), ReLU experts, and the output scaled by the router probability.
# ``SparseMoE.from_module`` matches it and holds the very same parameter tensors.


def switch_layer(d_model=64, d_ff=128, num_experts=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    eager = SwitchMoE(d_model, d_ff, num_experts, capacity_factor=1.25).to(DEVICE, dtype)
    return eager, SparseMoE.from_module(eager)


eager, moe = switch_layer()
x = torch.randn(4, 33, 64, device=DEVICE)  # (batch, seq, d_model): 132 tokens, a multiple of nothing
print(moe)

# %%
# Check against eager PyTorch
# ---------------------------

with torch.no_grad():
    torch.testing.assert_close(moe(x), eager(x), rtol=1e-5, atol=1e-5)

# %%
# The same through ``pit.compile``
# --------------------------------
# In a whole model nobody swaps modules by hand: ``pit.compile`` finds the MoE block (and any
# other sparse operator), replaces it, shares every parameter, and leaves the rest to PyTorch.


class SwitchBlock(torch.nn.Module):
    """A Switch Transformer feed-forward block: pre-norm, MoE, residual."""

    def __init__(self, moe):
        super().__init__()
        self.norm = torch.nn.LayerNorm(moe.router.in_features)
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


model = SwitchBlock(eager).to(DEVICE)
compiled = pit.compile(model)
print(type(compiled.moe).__name__, "replaced", type(model.moe).__name__)
with torch.no_grad():
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)

# %%
# The index PIT built on the device: tokens per expert after the capacity rule, and how many
# choices the capacity dropped (their rows are zero in both outputs).

weights, experts, index = moe.route(x)
print("tokens per expert:", index.counts.tolist(), "capacity:", index.indices.shape[1])
print("dropped tokens:", int((index.slots < 0).sum()))

# %%
# Training goes through PIT as well: the input gradient is a grouped scatter, the weight
# gradients a grouped reduction over each expert's gathered tokens, and the router receives
# its gradient through the gate probabilities.

x.requires_grad_(True)
(moe(x) ** 2).sum().backward()
pit_grads = [x.grad.clone(), *(p.grad.clone() for p in eager.parameters())]
x.grad = None
eager.zero_grad()
(eager(x) ** 2).sum().backward()
for got, want in zip(pit_grads, [x.grad, *(p.grad for p in eager.parameters())]):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
x.requires_grad_(False)

# %%
# What PIT generated
# ------------------
# The first linear of every expert is one TIR function over symbolic shapes (so any token count
# reuses one build). ``X[Idx[e, j], k]`` is the gather (SRead); slots past ``Cnt[e]`` are zero.
# The ``pit.parallel_loops`` annotation tells the schedule template how many loops are race-free;
# the template (``CpuParallel`` on the CPU, ``SimtThreads`` on CUDA) takes its knobs from there.

print(build_grouped_gather_matmul("float32", bias=True))
print("SparseMoE knobs:", moe.knobs)
print("schedule knobs:", default_knobs(target_for(x.device)))

# %%
# Benchmark
# ---------
# Median and 20/80 percentiles of the forward pass, eager loop against PIT, over token counts.
# PIT's kernels are not tuned yet (plain one-thread-per-output CUDA, a naive CPU loop nest), so
# this measures where the grouped form stands today, not its ceiling.


def sweep(token_counts, d_model=128, d_ff=256, num_experts=8):
    eager, moe = switch_layer(d_model, d_ff, num_experts)
    print(f"{'tokens':>8} {'eager: median [p20, p80]':>26} {'PIT: median [p20, p80]':>26}")
    for tokens in token_counts:
        x = torch.randn(tokens, d_model, device=DEVICE)
        with torch.no_grad():
            eager_time = do_bench(lambda: eager(x), DEVICE, repeat=10)
            pit_time = do_bench(lambda: moe(x), DEVICE, repeat=10)
        print(f"{tokens:>8} {str(eager_time):>26} {str(pit_time):>26}")


def test_moe_tutorial():
    """A small case of the tutorial, for pytest: both structures, forward and gradients."""
    from pit_compiler.nn.moe_reference import MixtralMoE

    torch.manual_seed(0)
    for eager in (SwitchMoE(16, 24, 4, capacity_factor=1.0), MixtralMoE(16, 24, 4)):
        moe = SparseMoE.from_module(eager)
        x = torch.randn(2, 19, 16, requires_grad=True)
        y = moe(x)
        torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(y.sum(), x)
        (expected,) = torch.autograd.grad(eager(x).sum(), x)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    sweep([64, 256, 1024, 4096] if DEVICE == "cpu" else [256, 1024, 4096, 16384])
