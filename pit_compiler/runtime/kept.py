"""Answers kept per call signature: bounded memo tables that start over when full, and
bounded per-key turn counters (which calls of a signature do extra work).

PIT decides much of each call from its operands' shapes, layouts and dtypes and from the tile
database's version (routes, detections, which tensor-core tile serves a plan, tuned knobs, the
fitted cost models and the candidates of ``micro_tile="auto"``).
Deriving those took tens of microseconds of host time per call, so each is kept under its key.
"""

from __future__ import annotations

from typing import Callable, TypeVar

Answer = TypeVar("Answer")
_MISSING = object()
CAPACITY = 4096


def kept(store: dict, key, derive: Callable[[], Answer], capacity: int = CAPACITY) -> Answer:
    """``store[key]``, from ``derive()`` where missing (None is an answer too). A store past
    ``capacity`` entries starts over: what it holds is derived from shapes and versions, and
    those long gone are never asked again."""
    found = store.get(key, _MISSING)
    if found is _MISSING:
        if len(store) >= capacity:
            store.clear()
        found = store[key] = derive()
    return found


def next_turn(store: dict, key, capacity: int = CAPACITY) -> int:
    """How many times ``key`` was counted in ``store`` before (0 the first time), then one more;
    past ``capacity`` keys the store starts over, as :func:`kept`'s do."""
    if key not in store and len(store) >= capacity:
        store.clear()
    turn = store[key] = store.get(key, -1) + 1
    return turn
