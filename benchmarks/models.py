"""Eager PyTorch against ``pit.compile`` on the four kinds of dynamic sparsity of the PIT paper.

Run on a GPU machine (fp16 by default): ``python benchmarks/models.py``. Every compiled model's
output is checked against eager before it is timed. Writes
``benchmarks/results/models-<gpu>.json`` (one record per model and implementation: median and
20/80 percentile latency in ms, peak memory in MiB, the sparsity measured in the run) and, with
matplotlib, ``models-<gpu>.png``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_compiler as pit  # noqa: E402
from common import device_name, peak_memory_mb, pyplot, time_ms, write_json  # noqa: E402
from pit_compiler.nn.moe_reference import SwitchMoE  # noqa: E402

log = logging.getLogger("pit_compiler.benchmarks")


class OPTFeedForward(nn.Module):
    """An OPT-1.3B decoder's FFN (2048 -> 8192 -> 2048, ReLU)."""

    def __init__(self, d_model=2048, d_ff=8192, bias_shift=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        with torch.no_grad():
            self.fc1.bias -= bias_shift  # trained OPT models are far sparser than random weights

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def opt_case(device, dtype, args):
    model = OPTFeedForward(bias_shift=args.opt_bias_shift).to(device, dtype).eval()
    x = torch.randn(args.batch, args.seq, 2048, device=device, dtype=dtype)
    with torch.no_grad():
        hidden = torch.relu(model.fc1(x)).reshape(-1, 8192)
    tiles = pit.detect_micro_tiles(hidden, (32, 1))
    sparsity = {
        "elements_zero": (hidden == 0).float().mean().item(),
        "micro_tiles_32x1_empty": 1 - tiles.nnz / tiles.indices.numel(),
    }
    return "opt-1.3b-ffn", model, (x,), sparsity


def switch_case(device, dtype, args):
    model = SwitchMoE(768, 3072, args.experts).to(device, dtype).eval()
    x = torch.randn(args.batch, args.seq, 768, device=device, dtype=dtype)
    return f"switch-base-{args.experts}-moe", model, (x,), {"experts": args.experts, "capacity_factor": 1.25}


def bert_case(device, dtype, args):
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True)
    model = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(0)
    # GLUE-like: most sentences far shorter than the 128 they are padded to.
    lengths = (torch.distributions.LogNormal(math.log(40), 0.5).sample((args.batch,)).clamp(4, 128)).long()
    padding = (torch.arange(128).view(1, -1) >= lengths.view(-1, 1)).to(device)
    x = torch.randn(args.batch, 128, 768, generator=generator).to(device, dtype)
    sparsity = {"padding_fraction": padding.float().mean().item(), "mean_length": lengths.float().mean().item()}
    return "bert-base-varlen", model, (x, None, padding), sparsity


class LongformerAttention(nn.Module):
    """Longformer-base-4096 self-attention: 12 heads of 64, window 512, a few global tokens."""

    def __init__(self, seq, device, window=512, global_tokens=(0,)):
        super().__init__()
        self.mask = pit.nn.longformer(seq, window, list(global_tokens), block=1).to(device)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def longformer_case(device, dtype, args):
    seq = args.longformer_seq
    model = LongformerAttention(seq, device)
    q, k, v = (torch.randn(1, 12, seq, 64, device=device, dtype=dtype) for _ in range(3))
    density = model.mask.float().mean().item()
    return "longformer-base-4096-attention", model, (q, k, v), {"seq": seq, "allowed_fraction": density}


def pit_longformer(model):
    grid = pit.nn.from_dense_mask(model.mask, (64, 64))

    def run(q, k, v):
        return pit.nn.sparse_attention(q, k, v, attn_mask=model.mask, block_mask=grid, block=(64, 64))

    return run


def kernel_table(fn, device, calls=10) -> str:
    """torch.profiler's table of the GPU kernels and host time of ``calls`` calls of ``fn``."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    return profile.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50)


def cuda_graphed(fn, inputs, device):
    """``fn(*inputs)`` captured once in a CUDA graph, and a replay of it returning its output
    (the inputs stay where they are): what host-bound inference does to drop the host's time
    per kernel. The warm-up runs outside the capture, so kernels are built, weights' compact
    copies made and micro-tile counts read before it (PIT reads nothing back during one)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*inputs)

    def replay(*_):
        graph.replay()
        return output

    return replay


def relative_error(result, expected, inputs, name) -> float:
    """``|result - expected| / |expected|``, over BERT's real tokens only (its padding is masked)."""
    if name == "bert":  # padded positions are not compared
        keep = ~inputs[2]
        expected, result = expected[keep], result[keep]
    return ((result.float() - expected.float()).norm() / expected.float().norm()).item()


def host_profile(fn, device, calls=10, rows=30) -> str:
    """cProfile's table (by own time) of the Python host work of ``calls`` calls of ``fn``: where
    a model is host-bound, what of PIT's dispatch costs the time."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    profile.disable()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(rows)
    return stream.getvalue()


def plot(records, path):
    """Latency per model, eager against PIT, on a log scale (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    models = sorted({r["model"] for r in records})
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for offset, impl in ((-0.2, "eager"), (0.2, "pit")):
        values = [next((r["median_ms"] for r in records if r["model"] == m and r["impl"] == impl), math.nan) for m in models]
        ax.bar([i + offset for i in range(len(models))], values, 0.4, label=impl)
    ax.set_xticks(range(len(models)), models, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"eager vs pit.compile, {records[0]['dtype']}, {records[0]['gpu']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


CASES = {"opt": opt_case, "switch": switch_case, "bert": bert_case, "longformer": longformer_case}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="opt,switch,bert,longformer", help="comma list of " + ",".join(CASES))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--longformer-seq", type=int, default=4096)
    parser.add_argument("--opt-bias-shift", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print each implementation's top GPU kernels")
    parser.add_argument("--host-profile", action="store_true", help="print cProfile's table of PIT's host work")
    parser.add_argument("--compiler", default="eager", choices=["eager", "inductor"],
                        help="what runs pit.compile's rewritten graph (results go to models-<compiler>-<gpu>.json)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time both implementations replayed from a CUDA graph (results go to models-...-cudagraph-<gpu>.json)")
    args = parser.parse_args(argv)
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph needs a CUDA GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    gpu = device_name(device)
    records = []
    for name in args.cases.split(","):
        torch.manual_seed(0)
        case, model, inputs, sparsity = CASES[name](device, dtype, args)
        compiled = pit_longformer(model) if name == "longformer" else pit.compile(model, compiler=args.compiler)
        with torch.no_grad():
            expected = model(*inputs)
            for impl, fn in (("eager", model), ("pit", compiled)):
                if args.cuda_graph:
                    try:
                        fn = cuda_graphed(fn, inputs, device)
                    except Exception as error:  # e.g. a host read inside the model: not capturable
                        log.info("%-32s %-6s not captured in a CUDA graph: %s", case, impl, str(error).splitlines()[0])
                        torch.cuda.synchronize(device)
                        continue
                error = relative_error(fn(*inputs), expected, inputs, name)
                checked = error < 2e-2
                timing = time_ms(lambda: fn(*inputs), device, repeat=args.repeat)
                memory = peak_memory_mb(lambda: fn(*inputs), device)
                records.append({"gpu": gpu, "model": case, "dtype": args.dtype, "impl": impl, **timing,
                                "peak_memory_mib": memory, "checked": checked, "relative_error": error,
                                "sparsity": sparsity, "cuda_graph": args.cuda_graph,
                                **({"graph_compiler": args.compiler} if impl == "pit" else {})})
                log.info("%-32s %-6s %9.3f ms  peak %s MiB  checked=%s (rel. err %.1e)", case, impl,
                         timing["median_ms"], f"{memory:.0f}" if memory is not None else "-", checked, error)
                if args.profile and device.type == "cuda":
                    log.info("%s", kernel_table(lambda: fn(*inputs), device))
                if args.host_profile and impl == "pit" and device.type == "cuda":
                    log.info("%s", host_profile(lambda: fn(*inputs), device))
    name = "models" + ("" if args.compiler == "eager" else f"-{args.compiler}") + ("-cudagraph" if args.cuda_graph else "")
    plot(records, write_json(records, name, device).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
