"""A small progress bar on stderr for tuning runs (no dependency: tqdm is optional in PIT).

On a terminal it redraws one line; into a file or pipe (CI logs, tests) it writes one line per
step instead, so the log stays readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``[#####.....] 5/10  12s  <note>``; ``enabled=False`` draws nothing."""

    def __init__(self, total: int, description: str, *, stream=None, enabled: bool = True, width: int = 24):
        self.total = max(0, int(total))
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, steps: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + steps) if self.total else self.done + steps
        self._draw(note)

    def note(self, note: str) -> None:
        """Show what is running now without advancing (e.g. a kernel build)."""
        if self._interactive:
            self._draw(note)

    def _draw(self, note: str) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"{self.description} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s {note}"
        if self._interactive:
            self.stream.write("\r" + line[:160].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
