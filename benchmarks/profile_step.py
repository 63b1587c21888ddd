#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over a few steps of benchmarks/train.py's step.

Prints the wall time per step, the device's busy time (the sum of its kernels) against it, the
ranges the ZeroS layer marks (``zeros_lm.*``: the per-token scalars, the chunk core), and the top
operators and kernels by self device time and by self CPU time (all per step).

    python benchmarks/profile_step.py                                      # CPU, the default run's model
    python benchmarks/profile_step.py --device cuda --precision bf16 --seq-len 2048 \\
        --hidden-size 768 --layers 12 --heads 12 --vocab-size 32000 --tokens-per-step 16384
"""

from __future__ import annotations

import argparse
import time

try:  # benchmarks.profile_step (tests) or python benchmarks/profile_step.py (a script beside train.py)
    from .train import add_model_options, add_step_options, training_step
except ImportError:
    from train import add_model_options, add_step_options, training_step


def _self_device_us(event) -> float:
    """Self time on the accelerator (µs) of a profiler average, across torch versions' attribute names."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def _device_us(event) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", default="zeros")
    p.add_argument("--seq-len", type=int, default=512)
    add_model_options(p)
    add_step_options(p, steps=3)
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    args = p.parse_args()

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, step, sync, batch = training_step(args)
    for _ in range(args.warmup):
        step()
    sync()
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    averages = prof.key_averages()
    # Kernels: device-side events whose name is no CPU-side event's (a named range has one of each side).
    cpu_side = {e.key: e for e in averages if e.device_type == DeviceType.CPU}
    gpu_side = {e.key: e for e in averages if e.device_type != DeviceType.CPU}
    busy = sum(_self_device_us(e) for k, e in gpu_side.items() if k not in cpu_side) / args.steps / 1e3  # ms / step

    print(f"# Profile: {args.attention}, {args.layers} layers x {args.hidden_size}, {args.heads} heads, seq_len "
          f"{args.seq_len}, batch {batch}, {args.precision}, {'compiled' if args.compile else 'eager'}, "
          f"ZeroS backend {args.attention_backend}, on "
          f"{torch.cuda.get_device_name(0) if cuda else 'CPU'} ({args.steps} profiled steps)\n")
    print(f"wall {wall * 1e3:.1f} ms per step (profiler on)"
          + (f"; device busy {busy:.1f} ms per step ({100 * busy / (wall * 1e3):.0f}%)" if cuda else ""))
    marked = sorted(k for k in cpu_side if k.startswith("zeros_lm."))
    if marked:
        # kernels: the device time of the kernels launched inside the range; span: the range's extent on
        # the device's timeline (longer than its kernels where the device waits for the host to launch).
        print("\n| range | calls per step | CPU ms | kernels ms | device span ms |\n|---|---:|---:|---:|---:|")
        for k in marked:
            e, span = cpu_side[k], gpu_side.get(k)
            span_ms = f"{_device_us(span) / args.steps / 1e3:.2f}" if span else "-"
            print(f"| {k} | {e.count // args.steps} | {e.cpu_time_total / args.steps / 1e3:.2f} | "
                  f"{_device_us(e) / args.steps / 1e3:.2f} | {span_ms} |")
    sort_keys = (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]
    for key in sort_keys:
        print(f"\n## by {key.replace('_total', '').replace('_', ' ')}\n")
        print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
