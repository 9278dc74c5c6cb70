"""The dense fallback's counts, read back without waiting (pit_compiler.runtime.recent_counts)."""

from __future__ import annotations

import pytest
import torch

from pit_compiler.runtime.recent_counts import RecentCount, RecentCounts


class _Copy:
    """Stands in for a slot's landing test: its copy arrives when the test says so."""

    def __init__(self):
        self.arrived = False

    def expect(self):
        self.arrived = False

    def query(self):
        return self.arrived


def test_a_recent_count_never_waits_and_never_overwrites_a_copy_in_flight():
    recent = RecentCount(torch.zeros(2, dtype=torch.int32))
    copies = recent._arrived = [_Copy(), _Copy()]
    assert recent.latest() is None
    recent.post(torch.tensor([2, 3], dtype=torch.int32))
    assert recent.latest() is None  # in flight: not waited for
    recent.post(torch.tensor([3, 4], dtype=torch.int32))
    recent.post(torch.tensor([4, 5], dtype=torch.int32))  # both slots in flight: not posted, 5 is kept
    copies[1].arrived = True
    assert recent.latest() == 7
    copies[0].arrived = True
    assert recent.latest() == 7  # the older copy arriving later does not replace the newer
    recent.post(torch.tensor([5, 6], dtype=torch.int32))
    assert recent.latest() == 7
    copies[0].arrived = True
    assert recent.latest() == 11


def test_a_recent_count_copies_at_most_once_per_interval_but_keeps_a_count_read_at_once():
    recent = RecentCount(torch.zeros(2, dtype=torch.int32), post_every_s=3600.0)
    copies = recent._arrived = [_Copy(), _Copy()]
    recent.post(torch.tensor([1, 2], dtype=torch.int32))
    recent.post(torch.tensor([5, 5], dtype=torch.int32))  # within the interval: not copied
    copies[0].arrived = copies[1].arrived = True
    assert recent.latest() == 3
    recent.post(torch.tensor([4, 4], dtype=torch.int32), known=8)  # read by a first call: the newest at once
    assert recent.latest() == 8
    recent.post_every_s = 0.0
    recent.post(torch.tensor([6, 6], dtype=torch.int32))
    copies[0].arrived = copies[1].arrived = True
    assert recent.latest() == 12


def test_a_slot_shows_whether_its_copy_has_landed():
    """No CUDA event: the slot is filled with -1 before each copy, and counts are never negative."""
    recent = RecentCount(torch.zeros(2, 3, dtype=torch.int32))
    landed, slot = recent._arrived[0], recent._slots[0]
    landed.expect()
    assert not landed.query()
    slot[0] = torch.tensor([0, 2, 5], dtype=torch.int32)  # one row of the copy has landed
    assert not landed.query()
    slot[1] = torch.tensor([1, 0, 0], dtype=torch.int32)
    assert landed.query()
    recent.post(torch.tensor([[1, 1, 1], [2, 2, 2]], dtype=torch.int32))  # a CPU copy lands at once
    assert recent.latest() == 9


def test_recent_counts_drop_the_least_recently_used_signature():
    counts = RecentCounts(capacity=2)
    for key in ("a", "b", "a", "c"):
        counts.count(key, torch.ones(3, dtype=torch.int32))
    assert list(counts._counts) == ["a", "c"]


@pytest.mark.gpu
def test_a_count_is_read_without_waiting_for_the_gpu():
    """With the GPU busy (a long sleep queued), a call whose signature has an arrived count
    returns without waiting, and the count it posts arrives once the GPU gets there."""
    counts = RecentCounts()
    listed, later = (torch.tensor([n, 1], dtype=torch.int32, device="cuda") for n in (2, 6))
    assert counts.count("call", listed) == 3  # the first call sums its own
    torch.cuda.synchronize()  # (no kernel is loaded from here on: a first load would wait for the GPU)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time ahead of the copy
    assert counts.count("call", later) == 3  # the earlier count; 7 is still in flight
    assert not torch.cuda.current_stream().query(), "the call waited for the GPU"
    torch.cuda.synchronize()
    assert counts.count("call", listed) == 7
    assert all(slot.is_pinned() for slot in counts._counts["call"]._slots)


def test_recent_counts_can_be_shared_by_threads():
    """Many threads posting and reading under a few keys, with eviction: no lost key, no error."""
    from concurrent.futures import ThreadPoolExecutor

    counts = RecentCounts(capacity=3)

    def calls(worker):
        return [counts.count(f"k{(worker + i) % 5}", torch.full((2,), i, dtype=torch.int32)) for i in range(300)]

    with ThreadPoolExecutor(8) as pool:
        results = [value for values in pool.map(calls, range(8)) for value in values]
    assert len(results) == 2400 and all(0 <= value <= 2 * 299 for value in results)
    assert len(counts._counts) == 3


def test_a_count_read_by_the_first_call_is_the_newest_at_once():
    """The first call of a signature reads its own count (one wait): later calls see it before
    its copy arrives, and an older copy arriving after it does not replace it."""
    counts = RecentCounts()
    counts.post("call", torch.tensor([1, 1], dtype=torch.int32))  # a copy in flight
    recent = counts._counts["call"]
    copies = recent._arrived = [_Copy(), _Copy()]
    recent._in_flight = [True, False]
    recent._value = None
    assert counts.latest("call") is None
    assert counts.count("call", torch.tensor([4, 5], dtype=torch.int32)) == 9  # read now
    assert counts.latest("call") == 9  # not waiting for its copy
    copies[0].arrived = True
    assert counts.latest("call") == 9  # the older copy does not replace it
    counts.post("call", torch.tensor([2, 2], dtype=torch.int32))
    for copy in copies:
        copy.arrived = True
    assert counts.latest("call") == 4  # a later post does


def test_the_same_counts_posted_twice_are_copied_once():
    """One call's counts posted by the fallback and again by the tile choice: one copy."""
    recent = RecentCount(torch.zeros(2, dtype=torch.int32))
    copies = recent._arrived = [_Copy(), _Copy()]
    counts = torch.tensor([1, 2], dtype=torch.int32)
    recent.post(counts)
    recent.post(counts)
    assert recent._in_flight == [True, False]
    recent.post(torch.tensor([3, 4], dtype=torch.int32))  # another call's counts are copied
    assert recent._in_flight == [True, True]
    copies[1].arrived = True
    assert recent.latest() == 7
