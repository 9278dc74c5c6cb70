"""CompactCopies: one compact copy per transposed view, reused only while its source is unchanged."""

from __future__ import annotations

import gc

import pytest
import torch

from pit_compiler.runtime import CompactCopies


def weight(rows=6, cols=5, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_copy_is_compact_equal_and_kept():
    copies, w = CompactCopies(1 << 20), weight()
    first = copies.get(w.t())
    assert first.is_contiguous() and torch.equal(first, w.t())
    assert copies.get(w.t()) is first  # a new view object of the same weight: the kept copy
    assert len(copies) == 1


def test_a_write_to_the_source_makes_a_new_copy():
    copies, w = CompactCopies(1 << 20), weight()
    first = copies.get(w.t())
    with torch.no_grad():
        w.mul_(2)  # bumps the version counter, as optimizer steps and load_state_dict do
    second = copies.get(w.t())
    assert second is not first and torch.equal(second, w.t())
    assert len(copies) == 1


def test_a_new_tensor_at_a_freed_address_is_not_served_the_old_copy():
    copies = CompactCopies(1 << 20)
    w = weight(seed=1)
    copies.get(w.t())
    del w
    gc.collect()
    for seed in range(2, 20):  # the allocator may hand the freed memory to one of these
        fresh = weight(seed=seed)
        assert torch.equal(copies.get(fresh.t()), fresh.t())


def test_limit_evicts_the_least_recently_used():
    w1, w2, w3 = weight(seed=1), weight(seed=2), weight(seed=3)
    size = w1.numel() * w1.element_size()
    copies = CompactCopies(2 * size)
    kept1 = copies.get(w1.t())
    copies.get(w2.t())
    assert copies.get(w1.t()) is kept1  # w1 is now the most recent
    copies.get(w3.t())  # evicts w2
    assert len(copies) == 2 and copies.get(w1.t()) is kept1
    assert torch.equal(CompactCopies(0).get(w1.t()), w1.t())  # limit 0: made, never kept


def test_inference_tensors_and_clear():
    copies = CompactCopies(1 << 20)
    with torch.inference_mode():
        w = weight()
        assert torch.equal(copies.get(w.t()), w.t())
    assert len(copies) == 0  # no version counter to follow: not kept
    copies.get(weight().t())
    copies.clear()
    assert len(copies) == 0
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        CompactCopies(-1)
