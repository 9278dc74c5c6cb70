"""The MoE kernels one by one: the expert index and the grouped gather, scatter and weight-gradient
forms in every storage order, against float64 torch; and their CUDA builds without a GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from tvm.target import Target

from pit_compiler.codegen import compile_primfunc
from pit_compiler.codegen.moe import (
    build_expert_index,
    build_grouped_gather_matmul,
    build_grouped_scatter_matmul,
    build_grouped_weight_grad,
)
from pit_compiler.codegen.moe_kernels import moe_kernel
from pit_compiler.nn.moe_ops import ExpertIndex, expert_index, gather_matmul, scatter_matmul, weight_grad
from sparse_data import assert_matches_reference, dense_operand, poisoned

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CUDA = Target({"kind": "cuda", "arch": "sm_90"})


def reference_index(expert_of: torch.Tensor, num_experts: int, capacity: int):
    """``(counts, lists, slots)`` in pure torch: a running count per expert, in token order."""
    flat = expert_of.flatten().long().cpu()
    position = torch.nn.functional.one_hot(flat, num_experts).cumsum(0).gather(1, flat[:, None])[:, 0] - 1
    kept = position < capacity
    slots = torch.where(kept, position, -1).view(expert_of.shape)
    token = torch.arange(expert_of.shape[0]).repeat_interleave(expert_of.shape[1])
    lists = [token[kept & (flat == e)] for e in range(num_experts)]
    counts = torch.tensor([len(tokens) for tokens in lists])
    return counts, lists, slots


def random_choices(tokens, top_k, num_experts, seed=0, device="cpu"):
    """Distinct experts per token, as top-k routing gives."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=generator)
    return scores.topk(top_k, dim=1).indices.to(device=device, dtype=torch.int32)


def assert_index_matches(index, expert_of, num_experts, capacity):
    counts, lists, slots = reference_index(expert_of, num_experts, capacity)
    assert index.counts.dtype == index.indices.dtype == index.slots.dtype == torch.int32
    assert tuple(index.indices.shape) == (num_experts, capacity)
    assert index.counts.cpu().tolist() == counts.tolist()
    for e in range(num_experts):
        assert index.indices[e, : counts[e]].cpu().tolist() == lists[e].tolist(), e
    assert torch.equal(index.slots.cpu().long(), slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 37, 130])
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 1), (4, 2), (8, 2)])
@pytest.mark.parametrize("capacity", ["all", "tight"])
def test_expert_index(tokens, num_experts, top_k, capacity, device):
    expert_of = random_choices(tokens, top_k, num_experts, seed=tokens, device=device)
    cap = tokens if capacity == "all" else max(1, tokens * top_k // (2 * num_experts))
    index = expert_index(expert_of, num_experts, cap)
    assert_index_matches(index, expert_of, num_experts, cap)


def test_expert_index_runs_eager_calls_without_the_operator(monkeypatch):
    """The operator is for torch.compile (its graph records it); eager calls skip its dispatch."""
    from pit_compiler.nn import moe_ops

    dispatched = []
    original = moe_ops.expert_index_op
    monkeypatch.setattr(moe_ops, "expert_index_op", lambda *a: dispatched.append(1) or original(*a))
    expert_of = random_choices(37, 2, 4, seed=3, device="cpu")
    assert_index_matches(moe_ops.expert_index(expert_of, 4, 37), expert_of, 4, 37)
    assert dispatched == []

    def counts(choices):
        return moe_ops.expert_index(choices, 4, 37).counts

    assert torch.equal(torch.compile(counts, backend="eager", fullgraph=True)(expert_of), counts(expert_of))
    assert dispatched, "the traced call did not go through the operator"


@pytest.mark.parametrize("device", DEVICES)
def test_expert_index_edge_cases(device):
    """Experts with no tokens, one expert with all, and choices naming no expert are dropped."""
    expert_of = torch.tensor([[2], [2], [2], [7], [-1], [2]], dtype=torch.int32, device=device)
    index = expert_index(expert_of, 4, capacity=3)
    assert index.counts.tolist() == [0, 0, 3, 0]
    assert index.indices[2].tolist() == [0, 1, 2]
    assert index.slots.flatten().tolist() == [0, 1, 2, -1, -1, -1]
    # Without a capacity every valid choice is kept.
    index = expert_index(torch.full((5, 1), 3, dtype=torch.int64, device=device), 4)
    assert index.counts.tolist() == [0, 0, 0, 5] and index.slots.flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_expert_index_any_chunk(chunk):
    """Chunks of tokens counted and listed by separate tasks join in token order, at any size."""
    from pit_compiler.ops import kernel_cache

    expert_of = random_choices(130, 2, 4, seed=11)
    capacity = 50
    counts = torch.empty(4, dtype=torch.int32)
    indices = torch.empty((4, capacity), dtype=torch.int32)
    slots = torch.empty((130, 2), dtype=torch.int32)
    offsets = torch.empty((4, -(-130 // chunk)), dtype=torch.int32)
    kernel = moe_kernel("index", Target("llvm"), kernel_cache(), chunk=chunk)
    kernel(expert_of, counts, indices, slots, offsets)
    assert_index_matches(ExpertIndex(counts, indices, slots), expert_of, 4, capacity)


def test_expert_index_rejects_bad_input():
    with pytest.raises(ValueError, match="expert_of"):
        expert_index(torch.zeros(4, 1), 2)
    with pytest.raises(ValueError, match="num_experts"):
        expert_index(torch.zeros(4, 1, dtype=torch.int32), 0)


# Grouped kernels against float64 torch on packed data

E, TOKENS, TOP_K, K, F, N = 4, 37, 2, 19, 13, 11
CAPACITY = 15  # below the fullest list, so some choices are dropped


@pytest.fixture(scope="module")
def routing():
    expert_of = random_choices(TOKENS, TOP_K, E, seed=3)
    index = expert_index(expert_of, E, CAPACITY)
    assert (index.slots < 0).any(), "the capacity should drop some choices"
    return index


def on(index, device):
    return type(index)(*(t.to(device) for t in index))


def valid_slots(index, slots):
    return torch.arange(slots)[None, :] < index.counts.cpu()[:, None]


def gathered(x, index, slots):
    """``(E, slots, K)`` float64: token rows per slot, zero past each count."""
    rows = torch.zeros(index.indices.shape[0], slots, dtype=torch.long)
    width = min(slots, index.indices.shape[1])
    rows[:, :width] = index.indices.cpu()[:, :width]
    valid = valid_slots(index, slots)
    return x.double().cpu()[torch.where(valid, rows, 0)] * valid[..., None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,weight_order,bias",
    [
        (torch.float32, "fk", True),
        (torch.float32, "kf", False),
        (torch.float16, "fk", True),
        (torch.bfloat16, "fk", False),
    ],
    ids=str,
)
@pytest.mark.parametrize("extra_slots", [0, 3])
def test_gather_matmul(routing, dtype, weight_order, bias, extra_slots, device):
    """Every slot is written: the product for listed slots, zero for the rest."""
    index = on(routing, device)
    slots = int(routing.counts.max()) + extra_slots
    x = dense_operand((TOKENS, K), dtype, device, seed=1)
    w = dense_operand((E, F, K) if weight_order == "fk" else (E, K, F), dtype, device, seed=2)
    b = dense_operand((E, F), dtype, device, seed=4) if bias else None
    out = poisoned((E, slots, F), dtype, device)
    p = gather_matmul(x, w, b, index, slots, weight_order, out=out)
    w64 = w.double().cpu() if weight_order == "fk" else w.double().cpu().transpose(1, 2)
    expected = torch.einsum("ejk,efk->ejf", gathered(x, routing, slots), w64)
    if bias:
        expected = expected + b.double().cpu()[:, None, :] * valid_slots(routing, slots)[..., None]
    assert p is out
    assert_matches_reference(p, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,weight_order,gate,bias",
    [
        (torch.float32, "nf", True, True),
        (torch.float32, "fn", False, False),
        (torch.float32, "nf", True, False),
        (torch.float16, "nf", True, True),
        (torch.bfloat16, "nf", True, False),
    ],
    ids=str,
)
def test_scatter_matmul(routing, dtype, weight_order, gate, bias, device):
    """Rows of tokens listed under two experts add up; tokens nobody kept are zero."""
    index = on(routing, device)
    slots = int(routing.counts.max())
    p = dense_operand((E, slots, F), dtype, device, seed=5)
    w = dense_operand((E, N, F) if weight_order == "nf" else (E, F, N), dtype, device, seed=6)
    b = dense_operand((E, N), dtype, device, seed=7) if bias else None
    g = dense_operand((E, slots), dtype, device, seed=8) if gate else None
    out = poisoned((TOKENS, N), torch.float32, device)
    y = scatter_matmul(p, w, b, g, index, TOKENS, weight_order, out=out)
    w64 = w.double().cpu() if weight_order == "nf" else w.double().cpu().transpose(1, 2)
    rows = torch.einsum("ejf,enf->ejn", p.double().cpu(), w64)
    if bias:
        rows = rows + b.double().cpu()[:, None, :]
    if gate:
        rows = rows * g.double().cpu()[..., None]
    valid = valid_slots(routing, slots)
    expected = torch.zeros(TOKENS, N, dtype=torch.float64)
    expected.index_add_(0, routing.indices[:, :slots][valid].long(), rows[valid])
    assert y is out
    scale = max(expected.abs().max().item(), 1.0)
    tolerance = {torch.float32: 2e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}[dtype] * scale
    torch.testing.assert_close(y.double().cpu(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,out_order", [(torch.float32, "ab"), (torch.float32, "ba"), (torch.bfloat16, "ab")], ids=str
)
def test_weight_grad(routing, dtype, out_order, device):
    """A reduction over each expert's listed slots only: stale data past a count never leaks in."""
    index = on(routing, device)
    slots = int(routing.counts.max()) + 2
    g = dense_operand((E, slots, F), dtype, device, seed=9)
    x = dense_operand((TOKENS, K), dtype, device, seed=10)
    shape = (E, F, K) if out_order == "ab" else (E, K, F)
    out = poisoned(shape, dtype, device)
    dw = weight_grad(g, x, index, out_order, out=out)
    expected = torch.einsum("eja,ejb->eab", g.double().cpu(), gathered(x, routing, slots))
    assert dw is out
    assert_matches_reference(dw, expected if out_order == "ab" else expected.transpose(1, 2))


def test_kernels_are_built_once_for_every_size():
    from pit_compiler.ops import kernel_cache

    cache = kernel_cache()
    for tokens in (5, 64):
        expert_of = random_choices(tokens, 2, 3, seed=tokens)
        index = expert_index(expert_of, 3, tokens)
        x = dense_operand((tokens, 7), torch.float32, seed=tokens)
        gather_matmul(x, dense_operand((3, 9, 7), torch.float32), None, index, tokens)
        if tokens == 5:
            builds = cache.builds
    assert cache.builds == builds


def test_bad_orders_and_forms_are_named():
    with pytest.raises(ValueError, match="weight_order"):
        build_grouped_gather_matmul("float32", weight_order="nf")
    with pytest.raises(ValueError, match="out_order"):
        build_grouped_weight_grad("float32", out_order="fk")
    with pytest.raises(ValueError, match="form"):
        moe_kernel("dense", CUDA, None)
    index = expert_index(random_choices(5, 1, 2), 2)
    with pytest.raises(TypeError, match="x torch.float32, w torch.float16"):
        gather_matmul(torch.zeros(5, 3), torch.zeros(2, 4, 3, dtype=torch.float16), None, index, 5)


# CUDA builds on a machine without a GPU


def cuda_source(func) -> str:
    return compile_primfunc(func, CUDA).mod.imports[0].inspect_source()


@pytest.fixture(scope="module")
def cuda_sources():
    return {
        "index": cuda_source(build_expert_index(chunk=64)),
        "gather": cuda_source(build_grouped_gather_matmul("float16", bias=True)),
        "gather_kf": cuda_source(build_grouped_gather_matmul("bfloat16", weight_order="kf")),
        "scatter": cuda_source(build_grouped_scatter_matmul("float16", bias=True, atomic=True)),
        "scatter_fn": cuda_source(build_grouped_scatter_matmul("float32", weight_order="fn", gate=False, atomic=True)),
        "weight_grad": cuda_source(build_grouped_weight_grad("bfloat16", out_order="ba")),
    }


def test_cuda_kernels_build(cuda_sources):
    for name, source in cuda_sources.items():
        assert 'extern "C" __global__' in source, name
        assert ("atomicAdd" in source) == name.startswith("scatter"), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sources_compile_with_nvcc(cuda_sources, tmp_path):
    for name, source in cuda_sources.items():
        path = tmp_path / f"{name}.cu"
        path.write_text(source)
        result = subprocess.run(
            ["nvcc", "-arch=sm_90", "-ptx", str(path), "-o", str(tmp_path / f"{name}.ptx")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
