"""``pit-tune`` driven as a user drives it: subprocesses on the CPU target, databases in tmp_path.

Every process pays seconds importing torch and TVM, so the two subprocess runs (``python -m
pit_compiler.cli`` and the installed ``pit-tune`` script) run side by side, and what needs no
second process (argument errors, list, show, export) calls ``cli.main`` here.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

from pit_compiler import cli
from pit_compiler.tuning import TileDatabase, tune_matmul

MODULE = [sys.executable, "-m", "pit_compiler.cli"]
TUNE = ["matmul", "--shape", "64x64x64", "--micro-tile", "32x1,1x32", "--sparsity", "0.5,0.9", "--target", "llvm"]
FAST = ["--repeat", "1", "--min-repeat-ms", "1"]


def run_all(commands):
    """Run ``(argv, environment additions)`` pairs at once; (returncode, stdout, stderr) of each."""
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        for argv, env in commands
    ]
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=900)
            results.append((p.returncode, out, err))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tuning run through ``python -m pit_compiler.cli`` and, beside it, an import of a shipped
    database through the installed ``pit-tune``, each into the default place of its own
    ``$PIT_CACHE_DIR``."""
    root = tmp_path_factory.mktemp("cli")
    shipped = root / "shipped.json"
    source = TileDatabase(root / "source.json")
    fast = EvaluatorConfig(number=1, repeat=1, min_repeat_ms=1, enable_cpu_cache_flush=False)
    tune_matmul((64, 64, 64), "float32", [(32, 1)], [0.5], target="llvm", database=source, evaluator=fast, progress=False)
    source.export(shipped)
    script = shutil.which("pit-tune")
    assert script, "pit-tune is not installed: pip install -e ."
    tuned, imported = run_all(
        [
            (MODULE + TUNE + FAST + ["--json"], {"PIT_CACHE_DIR": str(root / "tuned")}),
            ([script, "import", str(shipped), "--json"], {"PIT_CACHE_DIR": str(root / "imported")}),
        ]
    )
    return root, tuned, imported


def test_tune_measures_into_the_default_database_and_shows_progress(runs):
    root, (code, out, err), _ = runs
    assert code == 0, err
    report = json.loads(out)
    assert report["database"] == str(root / "tuned" / "tiles.json")
    assert [k["micro_tile"] for k in report["kernels"]] == [[32, 1], [1, 32]]
    assert all(k["measured"] == 4 and k["best_knobs"] is not None for k in report["kernels"])
    assert report["dense_ms"] > 0
    assert "pit-tune [" in err and "11/11" in err  # progress: dense + 2 detections + 8 points


def test_installed_script_imports_a_shipped_database(runs):
    root, _, (code, out, err) = runs
    assert code == 0, err
    assert json.loads(out)["entries_added"] == 2  # the kernel and the dense time
    imported = TileDatabase(root / "imported" / "tiles.json").entries()
    assert set(imported) == set(TileDatabase(root / "source.json").entries())


def test_list_show_export(runs, tmp_path, capsys):
    root, (code, out, _), _ = runs
    assert code == 0
    key = json.loads(out)["kernels"][0]["key"]
    db = ["--db", str(root / "tuned" / "tiles.json")]
    assert cli.main(["list", "--json", *db]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in rows} == {"pit_matmul", "dense_matmul"} and all(r["current"] for r in rows)
    assert cli.main(["list", *db]) == 0
    listing = capsys.readouterr().out
    assert "3 entries" in listing and key[:12] in listing
    assert cli.main(["show", key[:10], "--json", *db]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["key"] == key and len(entry["measurements"]) == 4 and entry["model"]["b_ms_per_listed"] >= 0
    assert cli.main(["show", key[:10], *db]) == 0
    assert "model: ms =" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "out.json"), "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path / "out.json"), "entries": 3}


@pytest.mark.parametrize(
    "flag, value", [("--shape", "12x12"), ("--dtype", "int8"), ("--micro-tile", "0x1"), ("--sparsity", "2"), ("--trials", "0")]
)
def test_usage_errors_exit_2_naming_the_flag(flag, value, tmp_path, capsys):
    argv = ["matmul", "--shape", "64x64x64", flag, value, "--db", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"argument {flag}:" in captured.err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("command", ["matmul", "list", "show", "export", "import"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert f"pit-tune {command}" in out and "--db" in out and "--json" in out


def test_failures_exit_1_with_one_line(tmp_path, capsys):
    assert cli.main(["show", "abc", "--db", str(tmp_path / "t.json")]) == 1
    assert cli.main(["import", str(tmp_path / "missing.json"), "--db", str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("pit-tune show: error: KEY:") and "FILE:" in err[1]


def test_cuda_target_without_a_gpu_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.main(["matmul", "--shape", "64x64x64", "--target", "cuda", "--db", str(tmp_path / "t.json")]) == 1
    assert "--target cuda" in capsys.readouterr().err


def test_interrupt_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pit_compiler.tuning.tune_matmul", interrupted)
    assert cli.main(["matmul", "--shape", "64x64x64", "--target", "llvm", "--db", str(tmp_path / "t.json")]) == 130
    assert "resume" in capsys.readouterr().err


def test_a_corrupt_database_warns_and_lists_empty(tmp_path, capsys, caplog):
    path = tmp_path / "t.json"
    path.write_text("[1, 2")
    assert cli.main(["list", "--json", "--db", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert "unusable" in caplog.text and list(tmp_path.glob("t.json.corrupt-*"))
