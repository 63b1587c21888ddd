"""Throughput and peak memory of the ZeroS op against softmax attention and the naive prefix-sum form.

    python benchmarks/ops.py                 # full table (CPU: a few minutes)
    python benchmarks/ops.py --quick         # smaller lengths
    python benchmarks/ops.py --compile       # also torch.compile'd chunked ZeroS (GPU)

On CUDA the table also has the fused Triton kernels (mode="fused") and, when flash-linear-attention
is installed (a yardstick, not a dependency), its ``chunk_simple_gla`` at the same shape: a
scalar-gated linear attention, the floor that a ZeroS kernel can approach, twice: with a decay per head
(``g_gamma``, column "fla") and with a per-token gate (``g``, its gradient included, column "fla_g": the
fair match, as ZeroS has per-token logits and gates).

On CUDA every row holds B*T fixed (--tokens, default 32768: B = tokens / T), so that short sequences
are not launch-bound on one side only, and the time is taken with CUDA events on the device. On CPU B
is --batch (1) unless --tokens is given, and the time is wall clock.

H=8, d=64 by default (--heads, --head-dim), float32 (bfloat16 with --dtype bf16). Each CPU cell runs in a
fresh subprocess, so the peak-memory column is that run's own, taken on its first call: on CUDA
torch.cuda.max_memory_allocated (reset per cell), on CPU the growth of the process's peak resident set over
its state just before. Prints Markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from zeros_lm.ops import zeros_attention  # the installed package (scripts/setup.sh: pip install -e .)

BATCH, HEADS, HEAD_DIM = 1, 8, 64
CUDA_TOKENS = 32768  # B*T of every row on CUDA (--tokens)
NAIVE_MAX_T = 4096  # the naive form holds a (d, d) matrix per token: beyond this it does not fit usefully
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(T, device, dtype, requires_grad, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM):
    """q, k, v (B, T, H, d), s, g1, gh (B, T, H): unit-norm q and k, sigmoid gates."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q = F.normalize(rand(batch, T, heads, head_dim), dim=-1)
    k = F.normalize(rand(batch, T, heads, head_dim), dim=-1)
    v = rand(batch, T, heads, head_dim)
    s = rand(batch, T, heads)
    g1, gh = torch.sigmoid(rand(batch, T, heads)), torch.sigmoid(rand(batch, T, heads))
    return [x.requires_grad_(requires_grad) for x in (q, k, v, s, g1, gh)]


def naive_prefix_sum(q, k, v, s, g1, gh):
    """ZeroS through a (d, d) prefix sum per token: O(T d^2) memory. Only for comparison."""
    acc = torch.float32
    q, k, v = (x.to(acc).transpose(1, 2) for x in (q, k, v))             # (B, H, T, d)
    s, g1, gh = (x.to(acc).transpose(1, 2) for x in (s, g1, gh))         # (B, H, T)
    t = torch.arange(1, s.shape[-1] + 1, device=s.device, dtype=acc)
    e = torch.exp(s - s.detach().amax(-1, keepdim=True))                  # one global max: the naive way
    outer = k.unsqueeze(-1) * v.unsqueeze(-2)                             # (B, H, T, d, d)
    Fs = (e[..., None, None] * outer).cumsum(2)
    Gs = (s[..., None, None] * outer).cumsum(2)
    Hs = outer.cumsum(2)
    E, P = e.cumsum(-1), s.cumsum(-1)
    alpha, beta = gh / E, (g1 - gh) / t
    gamma = -(beta * P + gh) / t
    state = alpha[..., None, None] * Fs + beta[..., None, None] * Gs + gamma[..., None, None] * Hs
    return (q.unsqueeze(-2) @ state).squeeze(-2).transpose(1, 2)


FLA_HEAD_DECAYS = (2.0, 6.0)  # the yardstick's per-head decays: logsigmoid of these, spread over the heads


def fla_simple_gla(q, k, v, *_):
    """flash-linear-attention's chunked simple GLA at the same shape (the yardstick), with a decay per head
    (``g_gamma``). (fla refuses the backward of a per-token gate on Hopper with Triton < 3.7.1: it computes it
    wrong there; fla_simple_gla_gated is the per-token form.)"""
    from fla.ops.simple_gla import chunk_simple_gla
    gamma = F.logsigmoid(torch.linspace(*FLA_HEAD_DECAYS, q.shape[2], device=q.device))
    return chunk_simple_gla(q, k, v, g_gamma=gamma)[0]


FLA_GATE_SHIFT = 4.0  # per-token log gates logsigmoid(FLA_GATE_SHIFT + s): decays in the range of FLA_HEAD_DECAYS


def fla_simple_gla_gated(q, k, v, s, *_):
    """The yardstick with a per-token log gate ``g`` (B, T, H) made from the logits s (so that, like ZeroS's
    logits, it has a gradient in the backward): the cost a per-token scalar gate adds."""
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla(q, k, v, g=F.logsigmoid(FLA_GATE_SHIFT + s.float()))[0]


def sdpa(q, k, v, *_):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def measure(method, T, backward, device, dtype, chunk_size, repeats, compile_op, shape=(BATCH, HEADS, HEAD_DIM)):
    """One cell (in a subprocess on CPU): tokens/s and peak bytes; shape = (B, H, d)."""
    torch.manual_seed(0)
    inputs = make_inputs(T, device, dtype, backward, *shape)
    if method in ("zeros", "fused"):
        mode = "chunked" if method == "zeros" else "fused"
        op = lambda *x: zeros_attention(*x, mode=mode, chunk_size=chunk_size)[0]  # noqa: E731
        if compile_op:
            op = torch.compile(op, dynamic=False)
    else:
        op = {"sdpa": sdpa, "naive": naive_prefix_sum, "fla": fla_simple_gla, "fla_g": fla_simple_gla_gated}[method]

    def run():
        with torch.set_grad_enabled(backward):
            out = op(*inputs)
            if backward:
                out.float().sum().backward()

    def step():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak memory of the first call (on CPU the resident-set peak only grows, so it is read before
    # any warm-up), then timing after it.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":  # the device's time: events around the launches, no host sync in between
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"tok_s": shape[0] * T / statistics.median(times), "peak": max(peak, 0), "batch": shape[0]}


def batch_for(args, T: int) -> int:
    """B of the rows of length T: tokens / T when B*T is held fixed (--tokens), else --batch."""
    return max(1, args.tokens // T) if args.tokens else args.batch


def recurrent_step_latency(device, dtype, repeats=200):
    """Median seconds for one decode step (T=1) from a state, no grad."""
    prompt = make_inputs(64, device, dtype, False)
    _, state = zeros_attention(*prompt, output_final_state=True)
    token = make_inputs(1, device, dtype, False)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 10):
            start = time.perf_counter()
            _, state = zeros_attention(*token, mode="recurrent", initial_state=state, output_final_state=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[10:]), state.nbytes


def run_cell(args, method, T, backward, compile_op=False):
    shape = (batch_for(args, T), args.heads, args.head_dim)
    if args.device.startswith("cuda"):  # CUDA peak memory can be reset in-process
        try:
            return measure(method, T, backward, torch.device(args.device), DTYPES[args.dtype], args.chunk_size,
                           args.repeats, compile_op, shape)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"error": "OOM"}
        except Exception as e:  # one failing cell (e.g. the yardstick on this Triton) leaves the table standing
            traceback.print_exc()
            return {"error": f"{type(e).__name__}"}
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(
        {"method": method, "T": T, "backward": backward, "compile": compile_op, "batch": shape[0]})] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "OOM" if "memory" in err.lower() else err[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(device):
    """Max relative error of chunked and recurrent against the reference on this device."""
    lines = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        g = torch.Generator(device="cpu").manual_seed(1)
        T = 300
        x = [torch.randn(2, T, 4, 32, generator=g) for _ in range(3)] + [torch.randn(2, T, 4, generator=g) for _ in range(4)]
        q, k = F.normalize(x[0], dim=-1), F.normalize(x[1], dim=-1)
        args = [t.to(device=device, dtype=dtype) for t in (q, k, x[2], 3 * x[3], torch.sigmoid(x[4]),
                                                            torch.sigmoid(x[5]), torch.tanh(x[6]))]
        ref, _ = zeros_attention(*[a.double() for a in args], mode="reference")
        errs = []
        fused = device.type == "cuda" and dtype != torch.float64
        for mode in ("chunked", "recurrent") + (("fused",) if fused else ()):
            out, _ = zeros_attention(*args, mode=mode, chunk_size=64)
            errs.append(f"{mode} {((out.double() - ref).abs().max() / ref.abs().max()).item():.1e}")
        lines.append(f"{str(dtype).replace('torch.', '')}: " + ", ".join(errs))
    return "Agreement with the float64 reference (max relative error): " + "; ".join(lines)


def fmt(cell, key):
    if cell is None:
        return "-"
    if "error" in cell:
        return cell["error"]
    if key == "tok_s":
        return f"{cell['tok_s']:,.0f}"
    return f"{cell['peak'] / 2**20:,.0f} MiB"


def machine_line(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths 512 and 2048 only")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=BATCH, help="B of every row when --tokens is not given")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"hold B*T fixed at this (B = tokens / T; default {CUDA_TOKENS} on CUDA, off on CPU)")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd chunked ZeroS column")
    parser.add_argument("--methods", type=str, default=None,
                        help="comma-separated subset of the columns (zeros, zeros_compiled, fused, fla, fla_g, sdpa, naive)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cell", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens is None and device.type == "cuda":
        args.tokens = CUDA_TOKENS
    args.passthrough = ["--device", args.device, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
                        "--repeats", str(args.repeats), "--batch", str(args.batch), "--heads", str(args.heads),
                        "--head-dim", str(args.head_dim)] + (["--threads", str(args.threads)] if args.threads else [])

    if args.cell:
        cell = json.loads(args.cell)
        print(json.dumps(measure(cell["method"], cell["T"], cell["backward"], device, dtype,
                                 args.chunk_size, args.repeats, cell["compile"], (cell["batch"], args.heads,
                                                                                  args.head_dim))))
        return

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [512, 2048] if args.quick else [512, 2048, 8192, 16384])
    methods = ["zeros"] + (["zeros_compiled"] if args.compile else [])
    if device.type == "cuda":  # the Triton kernels, and the simple-GLA yardstick when fla is installed
        methods += ["fused"] + (["fla", "fla_g"] if importlib.util.find_spec("fla") else [])
    methods += ["sdpa"] + (["naive"] if device.type == "cpu" else [])  # naive: the memory contrast, CPU only
    if args.methods:
        wanted = args.methods.split(",")
        unknown = set(wanted) - {"zeros", "zeros_compiled", "fused", "fla", "fla_g", "sdpa", "naive"}
        if unknown:
            parser.error(f"--methods: unknown {', '.join(sorted(unknown))}")
        methods = [m for m in methods if m in wanted]
    rows = f"B*T={args.tokens} (B = {args.tokens} / T)" if args.tokens else f"B={args.batch}"
    clock = "CUDA events" if device.type == "cuda" else "wall clock"
    print(f"# ZeroS op benchmark: {rows}, H={args.heads}, d={args.head_dim}, {args.dtype}, "
          f"chunk {args.chunk_size}, median of {args.repeats} ({clock})")
    print(f"# {machine_line(device)}\n")
    for backward in (True, False):
        results = {}
        for T in lengths:
            for method in methods:
                if method == "naive" and T > NAIVE_MAX_T:
                    results[method, T] = None
                    continue
                results[method, T] = run_cell(args, method.replace("_compiled", ""), T, backward,
                                              compile_op=method.endswith("_compiled"))
                print(f"  measured {method} T={T}", file=sys.stderr, flush=True)
        title = "forward + backward" if backward else "forward only"
        ratios = [(m, "sdpa") for m in methods if m in ("zeros", "fused")] + (
            [("fused", "fla"), ("fused", "fla_g")] if "fla" in methods else [])
        header = (["T"] + (["B"] if args.tokens else []) + [f"{m} tok/s" for m in methods]
                  + [f"{a} / {b}" for a, b in ratios] + [f"{m} peak" for m in methods])
        print(f"## {title}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for T in lengths:
            row = [str(T)] + ([str(batch_for(args, T))] if args.tokens else []) + [
                fmt(results[m, T], "tok_s") for m in methods]
            for a, b in ratios:
                x, y = results[a, T], results[b, T]
                row.append(f"{x['tok_s'] / y['tok_s']:.2f}x" if x and y and "error" not in x and "error" not in y else "-")
            row += [fmt(results[m, T], "peak") for m in methods]
            print("| " + " | ".join(row) + " |")
        print()
    print(agreement(device) + "\n")
    latency, state_bytes = recurrent_step_latency(device, dtype)
    print(f"Recurrent single-token step (B=1, H=8, d=64): {latency * 1e6:,.0f} us, state {state_bytes:,} bytes "
          "whatever the context length.")


if __name__ == "__main__":
    main()
