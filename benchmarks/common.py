"""What every benchmark shares: timing, the GPU's name, results as JSON, and the plot."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path

import torch

from pit_compiler.testing import do_bench

log = logging.getLogger("pit_compiler.benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def time_ms(fn, device: torch.device, *, warmup: int = 3, repeat: int = 20, batch: int = 1) -> dict:
    """Median and 20/80 percentiles in ms (:func:`pit_compiler.testing.do_bench`), as a record."""
    return dataclasses.asdict(do_bench(fn, device, warmup=warmup, repeat=repeat, batch=batch))


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak GPU memory allocated while ``fn`` runs, above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def write_json(records: list[dict], name: str, device: torch.device, *, merge_on: tuple | None = None) -> Path:
    """Write ``results/<name>-<device>.json``. With ``merge_on`` (field names), records already
    there are kept unless a new record has the same values of those fields, so one table can
    be filled by several runs (each under a device call's time limit)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{slug(device_name(device))}.json"
    if merge_on and path.exists():
        fresh = {tuple(r.get(f) for f in merge_on) for r in records}
        kept = [r for r in json.loads(path.read_text()) if tuple(r.get(f) for f in merge_on) not in fresh]
        records = kept + records
    path.write_text(json.dumps(records, indent=1))
    log.info("wrote %s (%d records)", path, len(records))
    return path


def pyplot():
    """``matplotlib.pyplot`` drawing to files, or None (logged) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return None
    return plt
