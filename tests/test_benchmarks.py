"""The benchmarks run end to end on the CPU at a tiny size; spmm's ``--merge`` fills one table."""

from __future__ import annotations

import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_spmm_checks_every_output_and_merges_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import spmm

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    options = ["--sizes", "64", "--dtypes", "float32", "--sparsities", "0.5", "--repeat", "1"]
    assert spmm.main([*options, "--micro-tiles", "32x1"]) == 0
    assert spmm.main([*options, "--micro-tiles", "row", "--merge"]) == 0
    (path,) = tmp_path.glob("spmm-*.json")
    records = json.loads(path.read_text())
    assert {r["micro_tile"] for r in records} == {"32x1", "row"}
    assert {"pit", "cublas", "pit_detect"} <= {r["impl"] for r in records}
    assert all(r["checked"] and r["median_ms"] > 0 for r in records)
    assert spmm.main([*options, "--micro-tiles", "row"]) == 0  # without --merge the file is replaced
    assert {r["micro_tile"] for r in json.loads(path.read_text())} == {"row"}
    assert spmm.main([*options, "--micro-tiles", "row", "--batch", "3"]) == 0  # back to back: its own file
    batched = json.loads((tmp_path / path.name.replace("spmm-", "spmm-batch3-")).read_text())
    assert {r["batch"] for r in batched} == {3} and all(r["checked"] for r in batched)


def test_tuning_benchmark_reports_auto_both_ways(tmp_path, monkeypatch):
    """``benchmarks/tuning.py`` end to end on the CPU at a tiny size: it tunes, checks every
    output, and reports auto per pattern timed call by call and back to back."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import tuning

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    options = ["--sizes", "64", "--micro-tiles", "32x1", "--sparsities", "0.9", "--patterns", "32x1", "--seeds", "1"]
    assert tuning.main([*options, "--trials", "2", "--repeat", "1", "--db", str(tmp_path / "tiles.json")]) == 0
    (path,) = tmp_path.glob("tuning-*.json")
    records = json.loads(path.read_text())
    (auto,) = [r for r in records if r["section"] == "auto"]
    assert auto["checked"] and auto["auto_ms"] > 0 and auto["auto_back_to_back_ms"] > 0
    assert set(auto["fixed_back_to_back_ms"]) == set(auto["fixed_ms"]) == {"32x1", "dense"}
    assert auto["picked_best"] == (auto["auto_choice"] == auto["best"])
    (summary,) = [r for r in records if r["section"] == "summary"]
    assert {"auto_within_5pct", "auto_within_5pct_back_to_back", "auto_picked_best"} <= set(summary)
    assert all(r["checked"] for r in records if r["section"] == "kernels")
