"""Gradients of pit.sparse_matmul against autograd through the dense reference (A ⊙ M) @ B."""

from __future__ import annotations

import pytest
import torch

import pit_compiler as pit
from sparse_data import dense_operand, expand_mask, micro_tile_sparse

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CASES = [
    ("A", (32, 1), None),
    ("A", (1, 16), None),
    ("A", (1, None), None),
    ("A", (8, 8), "scatter"),
    ("B", (16, 1), None),
    ("B", (1, 32), None),
]


def reference_grads(A, B, keep_a, keep_b, upstream):
    A_ref = A.detach().double().requires_grad_()
    B_ref = B.detach().double().requires_grad_()
    C = (A_ref * keep_a) @ (B_ref * keep_b)
    C.backward(upstream.double())
    return A_ref.grad, B_ref.grad


def assert_grad_close(actual, expected):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("sparse,tile,form", CASES, ids=str)
def test_gradients_of_sparse_operand(sparse, tile, form, batch, device):
    M, K, N = 45, 70, 33
    shapes = {"A": (*batch, M, K), "B": (*batch, K, N)}
    S, grid = micro_tile_sparse(shapes[sparse], tile, 0.4, torch.float32, device, seed=11)
    other = dense_operand(shapes["B" if sparse == "A" else "A"], torch.float32, device, seed=12)
    A, B = (S, other) if sparse == "A" else (other, S)
    A.requires_grad_()
    B.requires_grad_()
    full_tile = tuple(size if t is None else t for t, size in zip(tile, shapes[sparse][-2:]))
    keep = expand_mask(grid, full_tile, shapes[sparse][-2:]).double()
    ones = torch.ones((), dtype=torch.float64, device=device)
    keep_a, keep_b = (keep, ones) if sparse == "A" else (ones, keep)

    C = pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, form=form)
    upstream = dense_operand(C.shape, torch.float32, device, seed=13)
    C.backward(upstream)
    dA, dB = reference_grads(A, B, keep_a, keep_b, upstream)
    assert_grad_close(A.grad, dA)
    assert_grad_close(B.grad, dB)
    sparse_grad = A.grad if sparse == "A" else B.grad
    assert (sparse_grad[keep == 0] == 0).all(), "the sparse operand's gradient left its micro-tiles"


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_sparse_output(device):
    M, K, N, tile = 50, 40, 70, (16, 32)
    A = dense_operand((M, K), torch.float32, device, seed=14).requires_grad_()
    B = dense_operand((K, N), torch.float32, device, seed=15).requires_grad_()
    _, grid = micro_tile_sparse((M, N), tile, 0.5, torch.float32, device, seed=16)
    keep = expand_mask(grid, tile, (M, N)).double()
    C = pit.sparse_matmul(A, B, sparse="C", micro_tile=tile, mask=grid)
    upstream = dense_operand(C.shape, torch.float32, device, seed=17)
    C.backward(upstream)
    A_ref = A.detach().double().requires_grad_()
    B_ref = B.detach().double().requires_grad_()
    ((A_ref @ B_ref) * keep).backward(upstream.double())
    assert_grad_close(A.grad, A_ref.grad)
    assert_grad_close(B.grad, B_ref.grad)


def test_only_requested_gradients_are_computed():
    A, _ = micro_tile_sparse((40, 40), (32, 1), 0.5, torch.float32)
    B = dense_operand((40, 8), torch.float32).requires_grad_()
    pit.sparse_matmul(A, B).sum().backward()
    assert A.grad is None and B.grad is not None


def test_out_with_grad_is_refused():
    A = dense_operand((8, 8), torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="out="):
        pit.sparse_matmul(A, dense_operand((8, 8), torch.float32), out=torch.empty(8, 8))


def test_no_grad_mode_takes_the_plain_path():
    A = dense_operand((8, 8), torch.float32).requires_grad_()
    with torch.no_grad():
        C = pit.sparse_matmul(A, dense_operand((8, 8), torch.float32), out=torch.empty(8, 8))
    assert not C.requires_grad


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_sees_one_operator(backend):
    """fullgraph=True: no graph break on the TVM calls, forward and backward."""
    import torch._dynamo

    torch._dynamo.reset()
    A, _ = micro_tile_sparse((40, 64), (32, 1), 0.5, torch.float32, seed=31)
    B = dense_operand((64, 24), torch.float32, seed=32).requires_grad_()

    def f(A, B):
        return torch.relu(pit.sparse_matmul(A, B, micro_tile=(32, 1))).sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss = compiled(A, B)
    loss.backward()
    B_ref = B.detach().double().requires_grad_()
    expected = torch.relu(A.double() @ B_ref).sum()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-4)
    assert_grad_close(B.grad, B_ref.grad)
    torch._dynamo.reset()


def test_only_calls_that_need_gradients_go_through_the_operator(monkeypatch):
    """Eager calls without gradients run the kernels directly (no operator dispatch, no grid);
    calls that need a backward go through ``pit::sparse_matmul``; both compute the same product."""
    from pit_compiler import api

    calls = []
    original = api.sparse_matmul_op
    monkeypatch.setattr(api, "sparse_matmul_op", lambda *a: calls.append(a[3]) or original(*a))
    A, _ = micro_tile_sparse((45, 70), (32, 1), 0.5, torch.float32, seed=3)
    B = dense_operand((70, 33), torch.float32, seed=4)
    direct = pit.sparse_matmul(A, B)
    assert calls == []
    torch.testing.assert_close(direct, A @ B, rtol=1e-5, atol=1e-4)
    A.requires_grad_()
    with torch.no_grad():
        pit.sparse_matmul(A, B)
    assert calls == []
    through = pit.sparse_matmul(A, B)
    assert calls == [[32, 1]] and through.grad_fn is not None
    torch.testing.assert_close(through.detach(), direct, rtol=0, atol=0)
    through.sum().backward()
    assert A.grad is not None
