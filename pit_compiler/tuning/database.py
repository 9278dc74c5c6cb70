"""The tile database: measured PIT kernel and dense times, on disk, shared by every process.

Ideas taken from TVM meta-schedule's ``JSONDatabase`` (a workload is the key, measurements
hang off it, the file is plain JSON a person can read), but not its classes: those key a
workload by an ``IRModule``'s structural hash and store schedule traces, while PIT replays
typed knobs through ``apply`` (STYLE.md) and needs its own key. A key is the SHA-256 of the
normalized workload (operator signature, shape bucket, dtype, micro-tile, target, TVM,
codegen and template versions), so an entry from another version simply never matches.

Every change is a locked read-modify-write (``fcntl.flock`` on ``<file>.lock``) that writes a
temporary file and renames it into place: readers never see half a file, and two tuners
running at once both keep their measurements. A file that is not a valid database of this
version is reported, moved aside to ``<file>.corrupt-<timestamp>`` and rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterator

from pit_compiler.runtime.cache import ENV_CACHE_DIR

try:
    import fcntl
except ImportError:  # not POSIX: atomic renames still keep the file whole
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "pit-tile-database"
VERSION = 1
DEFAULT_FILE = "tiles.json"


class DatabaseError(ValueError):
    """A file that is not a valid tile database of this version (the reason says why)."""


def shape_bucket(shape) -> tuple[int, ...]:
    """Each extent rounded up to a power of two: kernels of one bucket share measurements."""
    return tuple(1 << max(0, math.ceil(math.log2(max(1, int(size))))) for size in shape)


def workload_key(workload: dict) -> str:
    """The hash of a normalized workload: what a measurement depends on, nothing else."""
    text = json.dumps(workload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def knobs_text(knobs) -> str:
    """A knob setting as stable JSON (part of a measurement's id)."""
    return json.dumps(knobs if isinstance(knobs, dict) else asdict(knobs), sort_keys=True, separators=(",", ":"))


def shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def target_label(target) -> str:
    """``llvm`` or ``cuda sm_90``, from a target or its JSON text (keys keep the full text)."""
    try:
        parsed = json.loads(str(target))
    except ValueError:
        return str(target)
    return " ".join(str(parsed[k]) for k in ("kind", "arch") if k in parsed)


def template_info(template) -> dict:
    """Name, version and knob fields: a template whose knobs change never matches old entries."""
    return {
        "name": template.name,
        "version": getattr(template, "version", 1),
        "knobs": sorted(f.name for f in fields(template.Knobs)),
    }


def versions() -> dict:
    """The versions every key carries, so entries of another TVM or codegen never match."""
    import tvm

    from pit_compiler.codegen import CODEGEN_VERSION

    return {"tvm": tvm.__version__, "codegen": CODEGEN_VERSION}


def stored_micro_tile(plan) -> list:
    """The sparse operand's micro-tile in storage order; ``None`` where it spans all of k."""
    roles = [r for r in plan.contraction.order(plan.sparse) if r != "batch"]
    whole_k = plan.form == "scatter" and not plan.accumulate  # the signature's "k:all"
    return [None if (whole_k and role == "k") else int(plan.tile[role]) for role in roles]


def matmul_workload(plan, shape, dtype: str, target, template) -> dict:
    """The normalized key fields of one PIT matmul kernel (``shape`` is ``(M, N, K)``)."""
    c = plan.contraction
    return {
        "op": "pit_matmul",
        "operator": f"{c.c} += {c.a} * {c.b}",
        "sparse": plan.sparse.upper(),
        "signature": plan.signature(),
        "bucket": list(shape_bucket(shape)),
        "dtype": dtype,
        "micro_tile": stored_micro_tile(plan),
        "target": str(target),
        "template": template_info(template),
        **versions(),
    }


def dense_workload(shape, dtype: str, target) -> dict:
    """The key fields of the dense fallback, ``torch.matmul`` (cuBLAS, MKL...)."""
    import torch

    return {
        "op": "dense_matmul",
        "bucket": list(shape_bucket(shape)),
        "dtype": dtype,
        "target": str(target),
        "torch": torch.__version__.split("+")[0],
        **versions(),
    }


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise DatabaseError(reason)


def validate(data) -> dict:
    """The entries of a parsed database file; :class:`DatabaseError` if it is not one."""
    _check(isinstance(data, dict) and data.get("format") == FORMAT, f"not a PIT tile database (format != {FORMAT!r})")
    _check(
        data.get("version") == VERSION,
        f"database version {data.get('version')!r}, this PIT reads version {VERSION}",
    )
    entries = data.get("entries")
    _check(isinstance(entries, dict), "'entries' is not an object")
    for key, entry in entries.items():
        _check(isinstance(entry, dict) and isinstance(entry.get("workload"), dict), f"entry {key} has no workload")
        _check(workload_key(entry["workload"]) == key, f"entry {key} does not hash to its key (edited or damaged)")
        _check(isinstance(entry.get("measurements"), dict), f"entry {key} has no measurements object")
        for name, m in (*entry["measurements"].items(), *entry.get("detect", {}).items()):
            _check(isinstance(m, dict), f"entry {key}: measurement {name} is not an object")
            ok = isinstance(m.get("ms"), (int, float)) and m["ms"] >= 0 or isinstance(m.get("error"), str)
            _check(ok, f"entry {key}: measurement {name} has neither a time 'ms' nor an 'error'")
    return entries


def merge_entries(into: dict, new: dict) -> tuple[int, int]:
    """Merge ``new`` entries into ``into``; of two measurements with one id the later wins.

    Returns (entries added, measurements added or replaced).
    """
    added = changed = 0
    for key, entry in new.items():
        if key not in into:
            into[key] = json.loads(json.dumps(entry))
            added += 1
            changed += len(entry["measurements"]) + len(entry.get("detect", {}))
            continue
        for part in ("measurements", "detect"):
            mine = into[key].setdefault(part, {})
            for name, m in entry.get(part, {}).items():
                if name not in mine or m.get("taken", 0) > mine[name].get("taken", 0):
                    mine[name] = m
                    changed += 1
    return added, changed


_serials = itertools.count()


class TileDatabase:
    """A JSON file of tuning measurements; ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path).expanduser() if path is not None else None
        self._memory: dict = {}
        self._snapshot: tuple | None = None  # (file identity, entries)
        self._lock = threading.Lock()
        self._changes = 0  # of a memory-only database, for token()
        self._checked_at = -math.inf  # when token() last looked at the file (time.monotonic)
        self.serial = next(_serials)  # unlike id(), never reused by a later database

    def __repr__(self):
        return f"TileDatabase({str(self.path) if self.path else None!r})"

    # Reading

    def entries(self) -> dict:
        """All entries (read again only when the file changed); treat as read-only."""
        if self.path is None:
            return self._memory
        with self._lock:
            identity = self._identity()
            if identity is None:
                self._snapshot = None
                return {}
            if self._snapshot is None or self._snapshot[0] != identity:
                entries = self._read()
                if entries is None:  # unreadable: move it aside under the lock, start over
                    with self._locked():
                        entries = self._read_or_reset()
                self._snapshot = (self._identity(), entries)
            return self._snapshot[1]

    def token(self, max_age_s: float = 0.0):
        """Changes whenever the entries may have (``None``: no database file yet).

        For caches of what is derived from the entries, such as the best knobs of a kernel.
        ``max_age_s``: a file checked that recently is not checked again (run-time lookups ask
        on every call, and the check cost 7-16 us of host time on an H100 machine); what this
        object writes shows at once, another process's writes within ``max_age_s``.
        """
        if self.path is None:
            return ("memory", self.serial, self._changes)
        now = time.monotonic()
        if max_age_s <= 0 or now - self._checked_at >= max_age_s:
            self.entries()
            self._checked_at = now
        return None if self._snapshot is None else self._snapshot[0]

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def find(self, **fields) -> Iterator[tuple[str, dict]]:
        """Entries whose workload has every given field equal to the given value."""
        for key, entry in self.entries().items():
            workload = entry["workload"]
            if all(workload.get(name) == value for name, value in fields.items()):
                yield key, entry

    def resolve(self, prefix: str) -> str:
        """The one key starting with ``prefix`` (as git resolves a short hash)."""
        matches = [key for key in self.entries() if key.startswith(prefix)]
        if len(matches) != 1:
            found = "no entry" if not matches else f"{len(matches)} entries"
            raise KeyError(f"{found} in {self.path} starts with {prefix!r}; `pit-tune list` shows the keys")
        return matches[0]

    # Writing

    def update(self, change: Callable[[dict], object]):
        """Apply ``change(entries)`` as one locked read-modify-write; returns its result."""
        if self.path is None:
            self._changes += 1
            return change(self._memory)
        with self._lock, self._locked():
            entries = self._read_or_reset()
            result = change(entries)
            self._write(entries)
            self._snapshot = (self._identity(), entries)
            return result

    def record(self, workload: dict, name: str, measurement: dict, part: str = "measurements") -> str:
        """Persist one measurement of ``workload`` under ``name`` at once; returns the key."""
        key = workload_key(workload)
        measurement = {**measurement, "taken": time.time()}

        def change(entries):
            entry = entries.setdefault(key, {"workload": workload, "measurements": {}})
            entry.setdefault(part, {})[name] = measurement

        self.update(change)
        return key

    def merge(self, entries: dict) -> tuple[int, int]:
        return self.update(lambda mine: merge_entries(mine, entries))

    def export(self, destination: Path | str) -> int:
        """Write every entry to ``destination`` (atomically); returns how many."""
        entries = self.entries()
        _write_atomic(Path(destination), {"format": FORMAT, "version": VERSION, "entries": entries})
        return len(entries)

    def import_file(self, source: Path | str) -> tuple[int, int]:
        """Merge a database file exported elsewhere; a bad file raises, the database is kept."""
        source = Path(source)
        try:
            entries = validate(json.loads(source.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatabaseError(f"cannot read {source} as a tile database: {error}") from error
        except DatabaseError as error:
            raise DatabaseError(f"{source} is not importable: {error}") from None
        return self.merge(entries)

    # File handling

    def _identity(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        with open(f"{self.path}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict | None:
        """The entries on disk; ``{}`` if there is no file, ``None`` if it is unreadable."""
        try:
            return validate(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, DatabaseError):
            return None

    def _read_or_reset(self) -> dict:
        """Under the lock: the entries, or ``{}`` after moving an unreadable file aside."""
        try:
            return validate(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, DatabaseError) as error:
            reason = str(error) if isinstance(error, DatabaseError) else f"{type(error).__name__}: {error}"
        backup = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, backup)
            where = f"moved it to {backup}"
        except OSError as error:
            where = f"could not move it aside ({error})"
        log.warning(
            "PIT tile database %s is unusable (%s); %s and started an empty one: "
            "run pit-tune again to refill it",
            self.path,
            reason,
            where,
        )
        return {}

    def _write(self, entries: dict) -> None:
        _write_atomic(self.path, {"format": FORMAT, "version": VERSION, "entries": entries})


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_database: TileDatabase | None = None
_by_path: dict[Path, TileDatabase] = {}
_by_environment: dict[tuple, TileDatabase] = {}


def default_database_path() -> Path:
    """``<default_cache_dir()>/tiles.json`` (``$PIT_CACHE_DIR`` moves it)."""
    from pit_compiler.runtime import default_cache_dir

    return default_cache_dir() / DEFAULT_FILE


def tile_database() -> TileDatabase:
    """The process-wide database: the one set by :func:`set_tile_database`, else the default file."""
    if _database is not None:
        return _database
    # Looked up on every kernel call: the environment that decides the path is cheaper to read
    # than the path is to build (and three reads in a row cheaper than a loop over names).
    environ = os.environ
    where = (environ.get(ENV_CACHE_DIR), environ.get("XDG_CACHE_HOME"), environ.get("HOME"))
    if where not in _by_environment:
        path = default_database_path()
        _by_path.setdefault(path, TileDatabase(path))
        _by_environment[where] = _by_path[path]
    return _by_environment[where]


def set_tile_database(database: TileDatabase | None) -> None:
    """Use ``database`` for run-time lookups (``None``: back to the default file)."""
    global _database
    _database = database
