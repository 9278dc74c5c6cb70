"""Listed micro-tile counts read back to the host without waiting for the GPU.

The dense fallback weighs how many micro-tiles detection listed. Reading the count of the
call at hand stalls the host until the GPU has caught up (the whole queue drains, then the
GPU idles while Python launches the next kernels: 0.05-0.13 ms per call on an H200 at
8192^3). Instead each call's per-block counts are copied to pinned host memory (one copy, no
reduction kernel: they are summed once they have landed, which the slot itself shows), and a call
decides from the newest count of an earlier call of the same signature that has already
arrived. Both branches are exact, so a stale count only ever costs speed; the first call
of a signature reads its own count. The copy itself costs host time (6.5-11 us a copy on an
H100 machine; about 30 with the CUDA event each copy used to record), so a signature may post
at most once per ``post_every_s``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch


class _Landed:
    """Whether the copy into one pinned slot has landed, read from the slot itself: it is
    filled with -1 before the copy, and counts are never negative.

    A CUDA event would tell as much, but recording one on the current stream cost 11-17 us of
    host time per copy on an H100 machine (finding the stream 9-13 of it), more than the copy.
    Each count is one aligned 4-byte word, so none is ever seen half written.
    """

    def __init__(self, slot):
        self._slot = slot  # numpy view of the pinned slot

    def expect(self) -> None:
        """Called before a copy into the slot is queued."""
        self._slot.fill(-1)

    def query(self) -> bool:
        return bool(self._slot.min(initial=0) >= 0)


class RecentCount:
    """The newest arrived count of one call signature.

    Two pinned slots take turns, so a copy still in flight is never overwritten; where both
    are in flight (the host runs two calls ahead), a new count is simply not posted.
    """

    def __init__(self, counts: torch.Tensor, post_every_s: float = 0.0):
        self.post_every_s = post_every_s
        self._posted_at = -float("inf")  # when the last copy started (time.perf_counter)
        on_gpu = counts.device.type == "cuda"
        self._slots = [torch.zeros(counts.shape, dtype=counts.dtype, pin_memory=on_gpu) for _ in range(2)]
        self._sums = [slot.numpy() for slot in self._slots]  # the same memory: numpy sums it in 1 us, torch in 3
        self._arrived = [_Landed(view.reshape(-1)) for view in self._sums]
        self._in_flight = [False, False]
        self._posted = [0, 0]  # which post each slot holds: a later one arriving first wins
        self._turn = 0
        self._value: int | None = None
        self._value_post = 0
        self._serial = 0  # numbers posts in order
        self._newest: torch.Tensor | None = None  # the counts last copied (one call may post twice)

    def latest(self) -> int | None:
        """The newest count that has arrived, or None before any has."""
        for slot in (0, 1):
            if self._in_flight[slot] and self._arrived[slot].query():
                self._in_flight[slot] = False
                if self._posted[slot] > self._value_post:
                    self._value, self._value_post = int(self._sums[slot].sum()), self._posted[slot]
        return self._value

    def post(self, counts: torch.Tensor, known: int | None = None) -> None:
        """Start copying ``counts`` (integers on the device, shaped as at construction) to the
        host; ``known``: their total, already read, so the newest at once. The very tensor
        posted last is not copied again (a signature's first call posts the count it read, then
        its tile choice posts the same counts), nor anything within ``post_every_s`` of the last copy."""
        if known is None and (counts is self._newest or time.perf_counter() - self._posted_at < self.post_every_s):
            return
        self._serial += 1
        if known is not None:  # newer than any copy in flight: those no longer replace it
            self._value, self._value_post = known, self._serial
        slot = self._turn
        if self._in_flight[slot] and not self._arrived[slot].query():
            return
        self.latest()  # keep whatever that slot held before reusing it
        self._arrived[slot].expect()
        self._slots[slot].copy_(counts, non_blocking=True)  # on the current stream of counts' device
        self._in_flight[slot] = True
        self._posted[slot] = self._serial
        self._turn = 1 - slot
        self._newest = counts
        self._posted_at = time.perf_counter()


class RecentCounts:
    """:class:`RecentCount` per call signature, the least recently used dropped past ``capacity``;
    each signature posts at most once per ``post_every_s`` (a count read by a first call always).
    Safe to share between threads (one lock: each call holds it a few microseconds)."""

    def __init__(self, capacity: int = 512, post_every_s: float = 0.0):
        self.capacity = capacity
        self.post_every_s = post_every_s
        self._counts: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def latest(self, key) -> int | None:
        """The newest arrived total posted under ``key``, or None before any has arrived."""
        with self._lock:
            recent = self._counts.get(key)
            if recent is None:
                return None
            self._counts.move_to_end(key)
            return recent.latest()

    def post(self, key, counts: torch.Tensor) -> None:
        """Start copying ``counts`` (integers on the device) to the host under ``key``; calls
        with one key post counts of one shape."""
        self._post(key, counts, None)

    def _post(self, key, counts: torch.Tensor, known: int | None) -> None:
        with self._lock:
            recent = self._counts.get(key)
            if recent is None:
                recent = self._counts[key] = RecentCount(counts, self.post_every_s)
                if len(self._counts) > self.capacity:
                    self._counts.popitem(last=False)
            recent.post(counts, known)

    def count(self, key, counts: torch.Tensor) -> int:
        """The listed count to decide this call by: the newest arrived total of an earlier call
        with ``key``, else the sum of this call's own per-block ``counts`` (read now: one wait,
        and from then on the newest count of ``key``). Posts ``counts`` for the calls that follow."""
        value = self.latest(key)
        if value is not None:
            self.post(key, counts)
            return value
        value = int(counts.sum())
        self._post(key, counts, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
