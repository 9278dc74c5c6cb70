"""The tile database: keys, round trips, damaged and foreign files, two writers, export/import."""

import json
import logging
import multiprocessing

import pytest
from tvm.target import Target

from pit_compiler.ir import SparsityAttr, plan_pit
from pit_compiler.ops import matmul_contraction
from pit_compiler.schedules import template_for
from pit_compiler.tuning import DatabaseError, TileDatabase
from pit_compiler.tuning.database import (
    FORMAT,
    VERSION,
    dense_workload,
    matmul_workload,
    shape_bucket,
    stored_micro_tile,
    workload_key,
)

LLVM = Target("llvm")
LOGGER = "pit_compiler.tuning.database"


def workload(tile=(32, 1), shape=(64, 64, 64), dtype="float32"):
    plan = plan_pit(matmul_contraction(2), SparsityAttr("A", tile), dict(zip("mnk", shape)))
    return matmul_workload(plan, shape, dtype, LLVM, template_for(LLVM))


def point(ms=1.0, sparsity=0.9):
    return {"knobs": {"parallel": True}, "sparsity": sparsity, "shape": [64, 64, 64], "listed": 13, "tiles": 128, "ms": ms}


def backups(path):
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_shape_bucket_rounds_each_axis_up_to_a_power_of_two():
    assert shape_bucket((64, 100, 1)) == (64, 128, 1)
    assert shape_bucket((4096, 4097, 8191)) == (4096, 8192, 8192)


def test_key_covers_every_field_a_kernel_depends_on():
    base = workload()
    assert workload_key(base) == workload_key(json.loads(json.dumps(base)))
    changed = [
        workload(tile=(1, 32)),
        workload(dtype="float16"),
        workload(shape=(64, 64, 128)),
        {**base, "tvm": "0.26.0"},
        {**base, "codegen": base["codegen"] + 1},
        {**base, "target": str(Target({"kind": "cuda", "arch": "sm_90"}))},
        {**base, "template": {**base["template"], "version": 2}},
    ]
    keys = {workload_key(w) for w in changed}
    assert workload_key(base) not in keys and len(keys) == len(changed)
    # Shapes of one bucket share an entry.
    assert workload_key(workload(shape=(40, 50, 60))) == workload_key(base)


def test_whole_row_micro_tiles_are_keyed_independent_of_k():
    plans = [plan_pit(matmul_contraction(2), SparsityAttr("A", (1, k)), {"m": 8, "n": 8, "k": k}) for k in (33, 64)]
    assert [stored_micro_tile(p) for p in plans] == [[1, None], [1, None]]


def test_round_trip_and_stale_entries_never_match(tmp_path):
    path = tmp_path / "tiles.json"
    db = TileDatabase(path)
    key = db.record(workload(), "a", point(2.5))
    db.record({**workload(), "tvm": "0.1.0"}, "a", point(9.0))
    fresh = TileDatabase(path)
    assert fresh.get(key)["measurements"]["a"]["ms"] == 2.5
    assert len(fresh.entries()) == 2
    assert [k for k, _ in fresh.find(op="pit_matmul", tvm=workload()["tvm"])] == [key]
    assert fresh.resolve(key[:6]) == key
    with pytest.raises(KeyError, match="starts with"):
        fresh.resolve("zz")
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == (FORMAT, VERSION)
    assert not list(tmp_path.glob(".tiles.json.*")), "temporary files must not be left behind"


def test_a_second_instance_sees_new_measurements(tmp_path):
    reader, writer = TileDatabase(tmp_path / "t.json"), TileDatabase(tmp_path / "t.json")
    assert reader.entries() == {} and reader.token() is None
    key = writer.record(workload(), "a", point())
    assert reader.get(key) is not None
    token = reader.token()
    writer.record(workload(), "b", point())
    assert reader.token() != token and set(reader.get(key)["measurements"]) == {"a", "b"}


def test_a_token_of_bounded_age_checks_the_file_at_most_that_often(tmp_path):
    """Run-time lookups ask for the token on every call: within ``max_age_s`` of a check the
    file is not looked at again, yet what the same object writes shows at once."""
    reader, writer = TileDatabase(tmp_path / "t.json"), TileDatabase(tmp_path / "t.json")
    writer.record(workload(), "a", point())
    token = reader.token(max_age_s=3600)
    writer.record(workload(), "b", point())  # another object (another process, as pit-tune)
    assert reader.token(max_age_s=3600) == token, "checked again within the age"
    assert reader.token() != token, "an exact token always checks"
    newer = reader.token(max_age_s=3600)
    reader.record(workload(), "c", point())
    assert reader.token(max_age_s=3600) != newer, "its own write shows at once"


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{ not json", "JSONDecodeError"),
        (json.dumps({"format": FORMAT, "version": VERSION + 1, "entries": {}}), "version"),
        (json.dumps({"format": "something else", "entries": {}}), "not a PIT tile database"),
        (json.dumps({"format": FORMAT, "version": VERSION, "entries": {"bad": {"workload": {}, "measurements": {}}}}), "hash"),
    ],
    ids=["garbage", "foreign-version", "foreign-format", "tampered-key"],
)
def test_unusable_file_is_moved_aside_with_a_warning_and_rebuilt(tmp_path, caplog, content, reason):
    path = tmp_path / "tiles.json"
    path.write_text(content)
    db = TileDatabase(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert db.entries() == {}
    assert reason in caplog.text and "moved it to" in caplog.text
    (backup,) = backups(path)
    assert backup.read_text() == content
    assert not path.exists()
    key = db.record(workload(), "a", point())
    assert TileDatabase(path).get(key) is not None
    assert len(backups(path)) == 1


def test_recording_into_a_damaged_file_keeps_a_backup(tmp_path, caplog):
    path = tmp_path / "tiles.json"
    path.write_bytes(b"\x00\xff" * 10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        key = TileDatabase(path).record(workload(), "a", point())
    assert "unusable" in caplog.text and len(backups(path)) == 1
    assert list(TileDatabase(path).entries()) == [key]


def _write_many(path, tile, count):
    db = TileDatabase(path)
    for i in range(count):
        db.record(workload(tile=tile), f"p{i}", point(ms=float(i)))


def test_two_processes_writing_at_once_keep_both_keys(tmp_path):
    path = tmp_path / "tiles.json"
    context = multiprocessing.get_context("fork")  # children inherit the imports: no 4 s start
    writers = [context.Process(target=_write_many, args=(path, tile, 25)) for tile in ((32, 1), (1, 32))]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    entries = TileDatabase(path).entries()
    assert set(entries) == {workload_key(workload(tile=(32, 1))), workload_key(workload(tile=(1, 32)))}
    assert all(len(e["measurements"]) == 25 for e in entries.values())


def test_export_and_import_merge_keeping_the_later_measurement(tmp_path):
    mine, theirs = TileDatabase(tmp_path / "mine.json"), TileDatabase(tmp_path / "theirs.json")
    shared = mine.record(workload(), "old", point(1.0))
    mine.record(workload(), "kept", point(1.0))
    theirs.record(workload(), "old", point(3.0))  # taken later: wins
    other = theirs.record(workload(tile=(1, 32)), "a", point(2.0))
    dense = theirs.record(dense_workload((64, 64, 64), "float32", LLVM), "64x64x64", {"shape": [64, 64, 64], "ms": 0.1})
    assert theirs.export(tmp_path / "shipped.json") == 3
    added, changed = mine.import_file(tmp_path / "shipped.json")
    assert (added, changed) == (2, 3)
    entries = TileDatabase(tmp_path / "mine.json").entries()
    assert set(entries) == {shared, other, dense}
    assert entries[shared]["measurements"]["old"]["ms"] == 3.0
    assert entries[shared]["measurements"]["kept"]["ms"] == 1.0


def test_importing_a_bad_file_raises_and_keeps_the_database(tmp_path):
    db = TileDatabase(tmp_path / "tiles.json")
    key = db.record(workload(), "a", point())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": FORMAT, "version": 99, "entries": {}}))
    with pytest.raises(DatabaseError, match="version 99"):
        db.import_file(bad)
    with pytest.raises(DatabaseError, match="cannot read"):
        db.import_file(tmp_path / "missing.json")
    assert list(TileDatabase(tmp_path / "tiles.json").entries()) == [key]
    assert bad.exists() and not backups(bad)


def test_memory_database_needs_no_file():
    db = TileDatabase(None)
    token = db.token()
    key = db.record(workload(), "a", point())
    assert db.get(key) is not None and db.token() != token
