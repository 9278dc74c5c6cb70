"""PIT's exceptions (defined in ``ir``, which every stage imports; re-exported here)."""

from pit_compiler.ir.errors import (  # noqa: F401
    BackendUnavailable,
    CompilationError,
    InvalidKnobs,
    PITError,
    UnsupportedPattern,
)
