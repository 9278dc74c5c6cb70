"""Compiled kernels, kept in memory and on disk so a second call or process never rebuilds.

Disk entries are written to a temporary file and renamed into place, so a reader sees a whole
file or none, and two processes building the same kernel both leave a valid one. Each entry's
name carries the SHA-256 of its bytes, checked before the library is loaded: a damaged file
can crash the loader itself (a half-truncated shared library dies in dlopen with SIGBUS), so
an entry that fails the check, or fails to load, is reported, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import tvm.runtime

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "PIT_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$PIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/pit``, else ``~/.cache/pit``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pit"


class KernelCache:
    """Maps a kernel key to a loaded TVM module; ``directory=None`` keeps memory only."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        self._loaded: dict[str, object] = {}
        self._mains: dict[str, object] = {}
        self._lock = threading.Lock()
        self.builds = 0  # compilations done by this cache (disk and memory hits excluded)

    def _folder(self) -> Path:
        assert self.directory is not None
        return self.directory / "kernels"

    def get(self, key: str, build: Callable[[], object]):
        """The module for ``key``: from memory, else disk, else ``build()`` (then saved)."""
        with self._lock:
            module = self._loaded.get(key)
            if module is None:
                module = self._load(key)
            if module is None:
                module = build()
                self.builds += 1
                self._save(key, module)
            self._loaded[key] = module
            return module

    def main(self, key: str, build: Callable[[], object]):
        """The ``main`` function of :meth:`get`'s module, kept: a module's function lookup costs
        tens of microseconds, on every kernel call otherwise."""
        function = self._mains.get(key)
        if function is None:
            function = self._mains[key] = self.get(key, build)["main"]
        return function

    def _load(self, key: str):
        if self.directory is None:
            return None
        for path in sorted(self._folder().glob(f"{key}-*.so")):
            try:
                intact = _digest(path.read_bytes()) == path.stem.rsplit("-", 1)[1]
                if intact:
                    return tvm.runtime.load_module(str(path))
                problem = "its contents do not match the checksum in its name"
            except FileNotFoundError:  # another process replaced it meanwhile
                continue
            except Exception as error:  # a damaged entry must never stop the user: rebuild it
                problem = str(error)
            log.warning("PIT kernel cache entry %s is unreadable (%s); rebuilding it", path, problem)
            path.unlink(missing_ok=True)
        return None

    def _save(self, key: str, module) -> None:
        if self.directory is None:
            return
        folder = self._folder()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".so")
            os.close(fd)
            try:
                module.export_library(tmp)
                digest = _digest(Path(tmp).read_bytes())
                os.replace(tmp, folder / f"{key}-{digest}.so")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as error:  # a read-only or full disk costs a rebuild later, nothing more
            log.warning("could not save PIT kernel under %s (%s); keeping it in memory only", folder, error)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
