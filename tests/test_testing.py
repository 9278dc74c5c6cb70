"""pit_compiler.testing.do_bench: the one timing method of tutorials, benchmarks and the demo."""

from pit_compiler.testing import Timing, do_bench


def test_counts_calls_and_orders_percentiles():
    calls = []
    timing = do_bench(lambda: calls.append(sum(range(2000))), "cpu", warmup=2, repeat=9)
    assert len(calls) == 11
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert str(timing).endswith("]") and "ms" in str(timing)


def test_single_repeat():
    timing = do_bench(lambda: None, None, warmup=0, repeat=1)
    assert isinstance(timing, Timing) and timing.p20_ms == timing.median_ms == timing.p80_ms


def test_a_batch_of_calls_is_one_sample_of_their_mean():
    calls = []
    timing = do_bench(lambda: calls.append(1), "cpu", warmup=1, repeat=3, batch=5)
    assert len(calls) == 16 and timing.median_ms >= 0


def test_batch_must_be_positive():
    import pytest

    with pytest.raises(ValueError, match="batch"):
        do_bench(lambda: None, "cpu", batch=0)
