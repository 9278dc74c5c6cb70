"""runtime.kept: answers kept per key, None among them, the store starting over when full; turns
counted per key the same way."""

from __future__ import annotations

import pytest

from pit_compiler.runtime import kept, next_turn


def test_derives_once_per_key_none_included():
    store, calls = {}, []

    def derive(answer):
        calls.append(answer)
        return answer

    for _ in range(3):
        assert kept(store, "a", lambda: derive(1)) == 1
        assert kept(store, "none", lambda: derive(None)) is None  # an answer, not a miss
    assert calls == [1, None]


def test_a_full_store_starts_over():
    store = {}
    for key in range(4):
        kept(store, key, lambda key=key: key * 10, capacity=4)
    assert len(store) == 4
    assert kept(store, "new", lambda: "fresh", capacity=4) == "fresh"
    assert store == {"new": "fresh"}


def test_a_failing_derivation_keeps_nothing():
    store = {}

    def fail():
        raise ValueError("no answer")

    with pytest.raises(ValueError, match="no answer"):
        kept(store, "k", fail)
    assert store == {}
    assert kept(store, "k", lambda: 3) == 3


def test_turns_count_per_key_and_a_full_store_starts_over():
    store = {}
    assert [next_turn(store, "a") for _ in range(3)] == [0, 1, 2]
    assert next_turn(store, "b") == 0 and next_turn(store, "a") == 3
    full = {key: 5 for key in range(4)}
    assert next_turn(full, 2, capacity=4) == 6  # a known key keeps counting
    assert next_turn(full, "new", capacity=4) == 0 and full == {"new": 0}
