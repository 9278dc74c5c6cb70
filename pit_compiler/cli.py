"""``pit-tune``: tune PIT kernels into the tile database, and inspect, export or import it.

Exit status: 0 success, 1 failure (the message says what failed), 2 bad usage (the message
names the flag), 130 interrupted (every measurement taken so far is saved; rerun to resume).
The database is ``--db``, else ``$PIT_CACHE_DIR/tiles.json``, else ``~/.cache/pit/tiles.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("pit_compiler.cli")

DTYPES = ("float32", "float16", "bfloat16")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Failure(Exception):
    """A one-line error for exit status 1."""


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxNxK such as 64x64x64, got {text!r}") from None
    if min(m, n, k) < 1:
        raise argparse.ArgumentTypeError(f"extents must be positive, got {text!r}")
    return m, n, k


def _micro_tiles(text: str) -> list[tuple]:
    tiles = []
    for item in text.split(","):
        try:
            rows, cols = (None if x in ("all", "*") else int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected ROWSxCOLS[,ROWSxCOLS...] such as 32x1,1x32 ('all' spans an axis: 1xall), got {item!r}"
            ) from None
        if any(t is not None and t < 1 for t in (rows, cols)):
            raise argparse.ArgumentTypeError(f"micro-tile sizes must be positive, got {item!r}")
        tiles.append((rows, cols))
    return tiles


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.5,0.9,0.99, got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1], got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _database(args):
    from pit_compiler.tuning import TileDatabase, default_database_path

    return TileDatabase(args.db or default_database_path())


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text)


def tune(args) -> int:
    import torch

    from pit_compiler.tuning import format_report, tune_matmul
    from pit_compiler.tuning.tuner import DEFAULT_EVALUATOR

    if args.target == "cuda" and not torch.cuda.is_available():
        raise Failure("--target cuda: no CUDA GPU here (torch.cuda.is_available() is False); use --target llvm")
    evaluator = DEFAULT_EVALUATOR._replace(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    report = tune_matmul(
        args.shape,
        args.dtype,
        args.micro_tile,
        args.sparsity,
        sparse=args.sparse,
        layout=args.layout,
        target=args.target,
        trials=args.trials,
        database=_database(args),
        evaluator=evaluator,
        seed=args.seed,
        progress=not args.no_progress,
    )
    _emit(args, report.to_json(), format_report(report))
    return 0 if not any(k.measured + k.reused == 0 for k in report.kernels) else 1


def summarize(key: str, entry: dict) -> dict:
    """One line of ``list``: what the entry is, how much it holds, whether it still matches."""
    from pit_compiler.tuning.cost_model import best_knobs
    from pit_compiler.tuning.database import target_label, versions

    workload = entry["workload"]
    current = all(workload.get(k) == v for k, v in versions().items())
    measured = [m for m in entry["measurements"].values() if "ms" in m]
    return {
        "key": key,
        "op": workload["op"],
        "sparse": workload.get("sparse"),
        "micro_tile": workload.get("micro_tile"),
        "bucket": workload["bucket"],
        "dtype": workload["dtype"],
        "target": target_label(workload["target"]),
        "measurements": len(measured),
        "best_knobs": best_knobs(entry) if workload["op"] == "pit_matmul" else None,
        "current": current,
    }


def list_entries(args) -> int:
    db = _database(args)
    rows = [summarize(key, entry) for key, entry in sorted(db.entries().items())]
    lines = [f"{len(rows)} entries in {db.path}"]
    if rows:
        heading = f"{'key':<12} {'op':<12} {'sparse':<6} {'micro-tile':<10} {'bucket':<16} {'dtype':<9}"
        lines.append(f"{heading} {'target':<12} {'points':>6}  best knobs")
    for r in rows:
        tile = "-" if r["micro_tile"] is None else "x".join("all" if t is None else str(t) for t in r["micro_tile"])
        knobs = json.dumps(r["best_knobs"]) if r["best_knobs"] else "-"
        stale = "" if r["current"] else "  (another TVM or codegen version: never used)"
        bucket = "x".join(map(str, r["bucket"]))
        lines.append(
            f"{r['key'][:12]:<12} {r['op']:<12} {r['sparse'] or '-':<6} {tile:<10} {bucket:<16} {r['dtype']:<9} "
            f"{r['target']:<12} {r['measurements']:>6}  {knobs}{stale}"
        )
    _emit(args, rows, "\n".join(lines))
    return 0


def show(args) -> int:
    from pit_compiler.tuning.cost_model import kernel_model

    db = _database(args)
    try:
        key = db.resolve(args.key)
    except KeyError as error:
        raise Failure(f"KEY: {error.args[0]}") from None
    entry = db.get(key)
    model = kernel_model(entry) if entry["workload"]["op"] == "pit_matmul" else None
    data = {"key": key, **entry}
    if model is not None:
        line = model.line
        data["model"] = {"knobs": model.knobs, "a_ms": line.a, "b_ms_per_listed": line.b, "points": line.points}
    lines = [f"key {key}", "workload:"]
    lines += [f"  {name}: {json.dumps(value)}" for name, value in sorted(entry["workload"].items())]
    lines.append("measurements:")
    lines += [f"  {name}: {json.dumps(m)}" for name, m in sorted(entry["measurements"].items())]
    for name, m in sorted(entry.get("detect", {}).items()):
        lines.append(f"detection {name}: {m['ms']:.4f} ms")
    if model is not None:
        lines.append(f"model: ms = {model.line.a:.4f} + {model.line.b:.4g} * listed at knobs {json.dumps(model.knobs)}")
    _emit(args, data, "\n".join(lines))
    return 0


def export(args) -> int:
    db = _database(args)
    count = db.export(args.file)
    _emit(args, {"path": args.file, "entries": count}, f"exported {count} entries from {db.path} to {args.file}")
    return 0


def import_(args) -> int:
    from pit_compiler.tuning import DatabaseError

    db = _database(args)
    try:
        added, merged = db.import_file(args.file)
    except DatabaseError as error:
        raise Failure(f"FILE: {error}") from None
    text = f"imported {args.file} into {db.path}: {added} new entries, {merged} measurements added or updated"
    data = {"path": args.file, "database": str(db.path), "entries_added": added, "measurements_merged": merged}
    _emit(args, data, text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--db", help="tile database (default: $PIT_CACHE_DIR/tiles.json, ~/.cache/pit/tiles.json)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at DEBUG level")
    output = Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print the result as JSON")

    parser = Parser(prog="pit-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("matmul", parents=[common, output], help="tune sparse @ dense matmul kernels")
    p.add_argument("--shape", type=_shape, required=True, help="MxNxK, e.g. 8192x8192x8192")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="operand dtype (default float32)")
    p.add_argument("--micro-tile", type=_micro_tiles, default=[(32, 1)], help="ROWSxCOLS[,...] (default 32x1)")
    p.add_argument(
        "--sparsity", type=_sparsities, default=[0.5, 0.9, 0.99], help="fractions of empty micro-tiles (0.5,0.9,0.99)"
    )
    p.add_argument("--trials", type=_positive, default=64, help="most (knobs, sparsity) points per micro-tile (64)")
    p.add_argument("--sparse", choices=("A", "B"), default="A", help="the sparse operand (default A)")
    p.add_argument(
        "--layout",
        choices=("nn", "nt", "tn", "tt"),
        default="nn",
        help="storage of A and B, n as written, t a transposed view (default nn; "
        "nt is x @ W.t() of an nn.Linear, what pit.nn.SparseLinear runs)",
    )
    p.add_argument("--target", choices=("cuda", "llvm"), help="default: cuda when a GPU is present, else llvm")
    p.add_argument("--repeat", type=_positive, default=5, help="timed repeats per point (default 5)")
    p.add_argument("--min-repeat-ms", type=_positive, default=50, help="shortest repeat in ms (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random pattern seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=tune)

    p = sub.add_parser("list", parents=[common, output], help="list the database's entries")
    p.set_defaults(run=list_entries)
    p = sub.add_parser("show", parents=[common, output], help="show one entry's measurements and fitted model")
    p.add_argument("key", metavar="KEY", help="an entry's key, or a unique prefix of it")
    p.set_defaults(run=show)
    p = sub.add_parser("export", parents=[common, output], help="write the database to FILE, e.g. to ship with a model")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(run=export)
    p = sub.add_parser("import", parents=[common, output], help="merge a database FILE into this one")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(run=import_)
    return parser


def main(argv=None) -> int:
    from pit_compiler.ir import PITError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    prog = f"pit-tune {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        message = "interrupted; the measurements taken so far are saved: run the same command to resume"
        print(f"{prog}: {message}", file=sys.stderr)
        return 130
    except Failure as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except (PITError, ValueError, OSError) as error:  # DatabaseError is a ValueError
        print(f"{prog}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
