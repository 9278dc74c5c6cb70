"""The kernel cache: memory and disk hits, damaged entries, unwritable places, many processes."""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import tvm
from tvm.script import tirx as T

import pit_compiler as pit
from pit_compiler.runtime import ENV_CACHE_DIR, KernelCache, default_cache_dir

CACHE_LOGGER = "pit_compiler.runtime.cache"


@T.prim_func
def add_one(a: T.handle, b: T.handle):
    T.func_attr({"global_symbol": "main", "tirx.noalias": True})
    n = T.int32()
    A = T.match_buffer(a, (n,), "float32")
    B = T.match_buffer(b, (n,), "float32")
    for i in range(n):
        B[i] = A[i] + T.float32(1)


class CountingBuild:
    """A build callback that compiles ``add_one`` and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return tvm.compile(tvm.IRModule({"main": add_one}), target="llvm")


def assert_adds_one(module):
    a = torch.arange(7, dtype=torch.float32)
    b = torch.full((7,), -99.0)
    module["main"](a, b)
    torch.testing.assert_close(b, a + 1)


def kernel_files(directory: Path) -> list[str]:
    """The keys of the entries on disk, one per file (entries are named KEY-CHECKSUM.so)."""
    folder = directory / "kernels"
    return sorted(p.name.rsplit("-", 1)[0] for p in folder.iterdir()) if folder.exists() else []


def entry_path(directory: Path, key: str) -> Path:
    (path,) = (directory / "kernels").glob(f"{key}-*.so")
    return path


@pytest.fixture(scope="module")
def built_entry(tmp_path_factory):
    """(file name, bytes) of one valid cache entry for key "k", built once for the module."""
    directory = tmp_path_factory.mktemp("seed")
    KernelCache(directory).get("k", CountingBuild())
    path = entry_path(directory, "k")
    return path.name, path.read_bytes()


@pytest.fixture
def seeded_dir(tmp_path, built_entry):
    """A cache directory that already holds a valid entry for key "k"."""
    name, data = built_entry
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / name).write_bytes(data)
    return tmp_path


@pytest.fixture
def pit_cache(tmp_path):
    """Route ``pit``'s process-wide cache to ``tmp_path``; restore the default afterwards."""
    cache = KernelCache(tmp_path)
    pit.set_kernel_cache(cache)
    yield cache
    pit.set_kernel_cache(None)


# Memory


def test_memory_hit_does_not_build(tmp_path):
    cache, build = KernelCache(tmp_path), CountingBuild()
    first = cache.get("k", build)
    second = cache.get("k", build)
    assert second is first
    assert (build.calls, cache.builds) == (1, 1)
    assert_adds_one(second)


def test_main_is_the_modules_function_looked_up_once(tmp_path):
    cache, build = KernelCache(tmp_path), CountingBuild()
    main = cache.main("k", build)
    assert cache.main("k", build) is main and build.calls == 1
    assert_adds_one({"main": main})
    assert cache.get("k", build) is not None and build.calls == 1  # one build serves both


def test_memory_only_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache, build = KernelCache(None), CountingBuild()
    assert_adds_one(cache.get("k", build))
    assert_adds_one(cache.get("k", build))
    assert (build.calls, cache.builds) == (1, 1)
    assert list(tmp_path.iterdir()) == []


def test_distinct_keys_build_separately(tmp_path):
    cache, build = KernelCache(tmp_path), CountingBuild()
    cache.get("k1", build)
    cache.get("k2", build)
    assert (build.calls, cache.builds) == (2, 2)
    assert kernel_files(tmp_path) == ["k1", "k2"]


def test_threads_share_one_build(tmp_path):
    cache, build = KernelCache(tmp_path), CountingBuild()
    modules = []
    threads = [threading.Thread(target=lambda: modules.append(cache.get("k", build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (build.calls, cache.builds) == (1, 1)
    assert len(modules) == 4 and all(m is modules[0] for m in modules)


# Disk


def test_disk_hit_in_new_cache_does_not_build(tmp_path):
    KernelCache(tmp_path).get("k", CountingBuild())
    assert kernel_files(tmp_path) == ["k"]

    fresh, build = KernelCache(tmp_path), CountingBuild()
    module = fresh.get("k", build)
    assert (build.calls, fresh.builds) == (0, 0)
    assert_adds_one(module)


def test_sparse_matmul_disk_hit_in_new_cache(tmp_path, pit_cache):
    A = torch.randn(40, 24)
    A[:, 3:9] = 0
    B = torch.randn(24, 17)
    torch.testing.assert_close(pit.sparse_matmul(A, B), A @ B)
    assert pit_cache.builds > 0
    files = kernel_files(tmp_path)
    assert len(files) == pit_cache.builds

    fresh = KernelCache(tmp_path)
    pit.set_kernel_cache(fresh)
    torch.testing.assert_close(pit.sparse_matmul(A, B), A @ B)
    assert fresh.builds == 0
    assert kernel_files(tmp_path) == files


# Damaged entries


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"\x00not an ELF file\xff" * 64, id="garbage"),
        pytest.param(lambda data: b"\x7fELF" + b"\x00" * (len(data) - 4), id="garbage_same_size"),
        pytest.param(lambda data: data[:64], id="truncated_to_header"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_entry_warns_and_rebuilds(seeded_dir, built_entry, damage, caplog):
    path = entry_path(seeded_dir, "k")
    path.write_bytes(damage(built_entry[1]))

    cache, build = KernelCache(seeded_dir), CountingBuild()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        module = cache.get("k", build)
    assert (build.calls, cache.builds) == (1, 1)
    assert_adds_one(module)
    warnings = [r for r in caplog.records if r.name == CACHE_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()

    # The rebuilt entry replaced the damaged one: a third cache loads it without building.
    assert kernel_files(seeded_dir) == ["k"]
    again, build = KernelCache(seeded_dir), CountingBuild()
    assert_adds_one(again.get("k", build))
    assert (build.calls, again.builds) == (0, 0)


TRUNCATED_CHILD = f"""
import logging, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pit_compiler.runtime import KernelCache
from test_cache import CountingBuild

logging.basicConfig(level=logging.WARNING)
cache = KernelCache(Path(sys.argv[1]))
module = cache.get("k", CountingBuild())
print("builds", cache.builds)
"""


def test_half_truncated_entry_is_rebuilt(seeded_dir, built_entry, tmp_path):
    # Run in a child: dlopen of a half-truncated library dies of SIGBUS, which must never
    # happen, and if it did it must not take pytest with it.
    data = built_entry[1]
    entry_path(seeded_dir, "k").write_bytes(data[: len(data) // 2])
    script = tmp_path / "child.py"
    script.write_text(TRUNCATED_CHILD)
    child = subprocess.run(
        [sys.executable, str(script), str(seeded_dir)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, f"child exited {child.returncode}: {child.stderr[-2000:]}"
    assert "builds 1" in child.stdout
    assert "unreadable" in child.stderr


# Unwritable places


def test_unwritable_directory_keeps_working_from_memory(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cache, build = KernelCache(blocker / "cache"), CountingBuild()

    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        first = cache.get("k", build)
    assert_adds_one(first)
    assert any("could not save" in r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        assert cache.get("k", build) is first
    assert (build.calls, cache.builds) == (1, 1)
    assert not [r for r in caplog.records if r.name == CACHE_LOGGER]
    assert blocker.read_text() == "not a directory"


def test_failed_save_leaves_no_temporary_file(tmp_path, caplog):
    class Unexportable:
        def export_library(self, path):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")

        def __getitem__(self, name):
            raise KeyError(name)

    cache = KernelCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        module = cache.get("k", Unexportable)
    assert isinstance(module, Unexportable) and cache.builds == 1
    assert "disk full" in caplog.text
    assert kernel_files(tmp_path) == []


# Many processes

CHILD = """
import os, sys, time
import torch
import pit_compiler as pit

ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)

torch.manual_seed(0)
A = torch.randn(50, 40)
A[:, 5:20] = 0
B = torch.randn(40, 30)
torch.testing.assert_close(pit.sparse_matmul(A, B), A @ B)
print("builds", pit.kernel_cache().builds)
"""


def run_children(count: int, cache_dir: Path, scratch: Path) -> list[int]:
    """Start ``count`` processes that call ``pit.sparse_matmul`` at the same moment."""
    env = {**os.environ, ENV_CACHE_DIR: str(cache_dir)}
    go = scratch / "go"
    go.unlink(missing_ok=True)
    children = []
    for i in range(count):
        ready = scratch / f"ready{i}"
        ready.unlink(missing_ok=True)
        children.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(ready), str(go)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    try:
        for ready, child in children:
            while not ready.exists():
                assert child.poll() is None, child.communicate()[1][-2000:]
                time.sleep(0.01)
        go.touch()
        builds = []
        for _, child in children:
            out, err = child.communicate(timeout=180)
            assert child.returncode == 0, err[-2000:]
            builds.append(int(out.split("builds")[-1]))
        return builds
    finally:
        for _, child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_concurrent_processes_share_the_disk_cache(tmp_path):
    cache_dir, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()

    builds = run_children(2, cache_dir, scratch)
    # Each needs a detection kernel and a matmul kernel: built, or loaded from the other's file.
    assert all(0 <= b <= 2 for b in builds) and sum(builds) >= 2
    files = sorted((cache_dir / "kernels").iterdir())
    assert [p.name for p in files if p.name.startswith(".")] == []  # no temporary files left
    assert len(files) == 2  # one per key
    for path in files:
        assert tvm.runtime.load_module(str(path)).implements_function("main")

    assert run_children(1, cache_dir, scratch) == [0]
    assert sorted((cache_dir / "kernels").iterdir()) == files


# Where the cache lives


def test_default_cache_dir_prefers_pit_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "pit_here"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "pit_here"


def test_default_cache_dir_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(ENV_CACHE_DIR, "~/kernels_here")
    assert default_cache_dir() == tmp_path / "kernels_here"


@pytest.mark.parametrize("pit_cache_dir", [None, ""])
def test_default_cache_dir_uses_xdg_cache_home(monkeypatch, tmp_path, pit_cache_dir):
    if pit_cache_dir is None:
        monkeypatch.delenv(ENV_CACHE_DIR, raising=False)
    else:
        monkeypatch.setenv(ENV_CACHE_DIR, pit_cache_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pit"


def test_default_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_CACHE_DIR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "pit"


def test_process_cache_follows_pit_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    pit.set_kernel_cache(None)
    try:
        cache = pit.kernel_cache()
        assert cache.directory == tmp_path
        assert pit.kernel_cache() is cache
    finally:
        pit.set_kernel_cache(None)
