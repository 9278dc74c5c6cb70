"""PIT's exception hierarchy.

It lives in ``ir`` because every stage imports ``ir``, so each stage can raise and catch the
same types without importing a sibling. The built-in bases let callers that know nothing of PIT
still catch the usual ``ValueError`` or ``RuntimeError``.
"""


class PITError(Exception):
    """Base of every error PIT raises on purpose."""


class UnsupportedPattern(PITError, ValueError):
    """An operator or pattern that PIT cannot parse or transform; the caller should fall back."""


class InvalidKnobs(PITError, ValueError):
    """Schedule knobs that fail validation; the tuner catches it to prune the search."""


class CompilationError(PITError, RuntimeError):
    """TVM failed to build a kernel; raised ``from`` the original TVM error."""


class BackendUnavailable(PITError, RuntimeError):
    """The requested target or device cannot be used on this machine."""
