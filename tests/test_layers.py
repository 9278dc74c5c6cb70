"""The import layering of STYLE.md: data moves frontend -> ir -> schedules -> codegen -> runtime.

Checked on the source with ``ast``, so a violating import fails here even if nothing runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package folder -> (PIT stages it may import, third-party roots it must not import)
RULES = {
    "ir": (set(), {"torch", "tvm", "tvm_ffi", "numpy"}),
    "schedules": ({"ir"}, {"torch"}),
    "codegen": ({"ir", "schedules", "runtime"}, {"torch"}),
    "pit_compiler/runtime": ({"ir"}, set()),
}
STAGES = {"ir", "schedules", "codegen", "runtime", "api", "backend", "cli", "frontend"}


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def pit_stage(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "pit_compiler" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in STAGES else None


@pytest.mark.parametrize("folder", sorted(RULES))
def test_package_imports_follow_the_layers(folder):
    allowed_stages, forbidden_roots = RULES[folder]
    own = Path(folder).name
    files = sorted((ROOT / folder).glob("*.py"))
    assert files, f"no modules found under {folder}"
    for path in files:
        for name in imported_names(path):
            stage = pit_stage(name)
            if stage is not None and stage != own:
                assert stage in allowed_stages, f"{path.relative_to(ROOT)} imports {name} (stage {stage!r})"
            assert name.split(".")[0] not in forbidden_roots, f"{path.relative_to(ROOT)} imports {name}"


def test_checker_sees_every_import_form(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nfrom pit_compiler.codegen import x\ndef f():\n    import tvm.runtime\n")
    names = imported_names(planted)
    assert {"torch", "pit_compiler.codegen", "tvm.runtime"} <= names
    assert pit_stage("pit_compiler.codegen.x") == "codegen"
