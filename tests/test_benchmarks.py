"""The spmm benchmark runs end to end on the CPU at a tiny size, and ``--merge`` fills one table."""

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
