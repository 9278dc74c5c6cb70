"""Compile generated CUDA source with nvcc for sm_90, as the GPU machine's driver would load it.

A cubin (not just PTX) makes ptxas check shared memory and register limits. Without nvcc on
the machine the check is skipped: the TVM build before it still ran.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tvm.target import Target

SM90 = Target({"kind": "cuda", "arch": "sm_90"})  # the H100 and H200: built for here, run there


def assert_compiles_for_sm90(source: str, directory: Path, name: str, what: str = "", *, flags=(), arch="sm_90") -> str | None:
    """nvcc's report (its stderr; ``flags`` such as ``-Xptxas -v`` add to it), or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    path = Path(directory) / f"{name}.cu"
    path.write_text(source)
    result = subprocess.run(
        ["nvcc", f"-arch={arch}", "-cubin", *flags, str(path), "-o", str(path.with_suffix(".cubin"))],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{what}: {result.stderr[-2000:]}"
    return result.stderr
