"""``python -m pit_compiler`` (also installed as ``pit``): the demo and environment report."""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("pit_compiler")


def demo(args) -> int:
    """Compile a sparse matmul, check it against dense torch, print its time against dense."""
    import torch

    import pit_compiler as pit
    from pit_compiler.testing import do_bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    M, N, K = args.shape
    rows, cols = args.micro_tile
    torch.manual_seed(args.seed)
    A = torch.randn(M, K, device=device, dtype=dtype)
    keep = torch.rand((M + rows - 1) // rows, (K + cols - 1) // cols, device=device) >= args.sparsity
    A *= keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:M, :K]
    B = torch.randn(K, N, device=device, dtype=dtype)

    t0 = time.perf_counter()
    C = pit.sparse_matmul(A, B, micro_tile=(rows, cols))
    first_ms = (time.perf_counter() - t0) * 1e3
    reference = (A.double() @ B.double()).to(dtype)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(C, reference, rtol=tol, atol=tol * max(1.0, K**0.5))

    pit_ms = do_bench(lambda: pit.sparse_matmul(A, B, micro_tile=(rows, cols)), device, repeat=args.repeat).median_ms
    dense_ms = do_bench(lambda: A @ B, device, repeat=args.repeat).median_ms
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (TVM llvm)"
    print(f"PIT sparse matmul {M}x{K} @ {K}x{N} {args.dtype}, micro-tile {rows}x{cols}, "
          f"{1 - keep.float().mean().item():.0%} of micro-tiles empty, on {name}")
    print("  result checked against dense torch: OK")
    print(f"  first call (build or load kernels): {first_ms:8.1f} ms")
    print(f"  PIT (detection included), median:   {pit_ms:8.3f} ms")
    print(f"  dense torch A @ B, median:          {dense_ms:8.3f} ms")
    return 0


def _pair(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 32x1, got {text!r}") from None
    return rows, cols


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxNxK such as 512x512x512, got {text!r}") from None
    return m, n, k


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log kernel builds and cache use")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile, check and time one sparse matmul (CPU or GPU)")
    p.add_argument("--shape", type=_shape, default=(512, 512, 512), help="MxNxK (default 512x512x512)")
    p.add_argument("--micro-tile", type=_pair, default=(32, 1), help="ROWSxCOLS of A's micro-tiles (default 32x1)")
    p.add_argument("--sparsity", type=_fraction, default=0.9, help="fraction of empty micro-tiles (default 0.9)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
