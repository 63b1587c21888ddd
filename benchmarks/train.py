#!/usr/bin/env python
"""Training throughput and peak memory: the ZeroS LM against the softmax baseline of the same parameters.

Each (attention, seq_len) point runs in a fresh subprocess so that its peak memory is its own:
forward + backward + AdamW step on random tokens, a few warm-up steps, then timed steps; the
loss is the one train.py uses. On CPU, memory is the process's peak resident set; on CUDA, the
peak of allocated tensor memory. Prints a Markdown table.

    python benchmarks/train.py                         # CPU, seq_len 512 and 2048
    python benchmarks/train.py --device cuda --precision bf16 --seq-lens 512 2048 8192
    python benchmarks/train.py --device cuda --precision bf16 --compile    # every block torch.compile'd

On CUDA the table also gives model FLOPs utilisation (MFU: zeros_lm.training.model_flops_per_token x
tokens/s over the card's bf16 peak, where the card is known), as the training log does.

Models of equal parameter count: ZeroS's u projection and gates make it larger than softmax at one config
(117M against 110M at 768 x 12), so every other attention gets the MLP width that matches ZeroS's count
(--match-params zeros, the default; MLP parameters are linear in the width, so two counts give it). The
table gives each row's parameters and MLP width; --match-params none keeps one config for all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def training_step(args):
    """(model, step, sync, batch) for one benchmark point: ``step()`` runs forward + backward + AdamW on
    random tokens (the loss train.py uses), ``sync()`` waits for the device. Shared with profile_step.py."""
    import torch
    import torch.nn.functional as F

    from zeros_lm import ZeroSConfig, ZeroSForCausalLM
    from zeros_lm.training import compile_blocks

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = ZeroSConfig(**model_fields(args, args.attention, getattr(args, "intermediate_size", None)))
    model = ZeroSForCausalLM(cfg).to(device).train()
    if args.compile:
        compile_blocks(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, args.tokens_per_step // args.seq_len)
    x = torch.randint(0, cfg.vocab_size, (batch, args.seq_len + 1), device=device)
    amp = args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, step, sync, batch


def run_point(args) -> dict:
    import resource

    import torch

    from zeros_lm.callbacks import peak_flops_of
    from zeros_lm.training import model_flops_per_token

    model, step, sync, batch = training_step(args)
    device = torch.device(args.device)
    flops_per_token = model_flops_per_token(model, args.seq_len)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "attention": args.attention,
        "seq_len": args.seq_len,
        "batch": batch,
        "tokens_per_s": batch * args.seq_len / dt,
        "step_s": dt,
        "peak_bytes": peak,
        "params": sum(p.numel() for p in model.parameters()),
        "intermediate_size": model.config.intermediate_size,
        "threads": torch.get_num_threads(),
        "mfu": (flops_per_token * batch * args.seq_len / dt / peak_flops) if (peak_flops := peak_flops_of(device))
        else None,
    }


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model-size options of the training benchmarks (this one and packed.py); defaults: the default run's model."""
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--attention-backend", choices=["auto", "torch"], default="auto",
                   help="ZeroS: auto = the fused Triton kernels on CUDA; torch = the PyTorch chunked form")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: the config's, 8/3 hidden)")


def add_step_options(p: argparse.ArgumentParser, steps: int) -> None:
    """How training_step runs (this benchmark and profile_step.py): device, precision, batch, compile,
    checkpointing, warm-up and timed steps."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokens-per-step", type=int, default=4096, help="batch = tokens_per_step // seq_len")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder block (as --model.compile)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=steps)


def model_fields(args, attention: str, intermediate_size: int | None = None) -> dict:
    """ZeroSConfig fields from the options of add_model_options (intermediate_size: overrides the option's)."""
    fields = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, chunk_size=args.chunk_size, attention_type=attention,
                  attention_backend=args.attention_backend)
    width = intermediate_size or getattr(args, "intermediate_size", None)
    if width:
        fields["intermediate_size"] = width
    return fields


MLP_WIDTH_STEP = 64  # the second width of the two-point solve (and ZeroSConfig's rounding of its default)
MLP_WIDTH_ALIGN = 8  # a matched width is rounded to this (tensor-core friendly) where that stays within tolerance
PARAM_TOLERANCE = 0.01  # matched parameter counts agree within this fraction


def parameter_count(fields: dict) -> int:
    """Parameters of the model of these ZeroSConfig fields (built on the meta device: no memory, no init)."""
    import torch

    from zeros_lm import ZeroSConfig, ZeroSForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in ZeroSForCausalLM(ZeroSConfig(**fields)).parameters())


def matched_mlp_width(args, attention: str, reference: str) -> tuple[int, int, int]:
    """(MLP width, its parameter count, the reference's count): the width that gives ``attention`` the
    parameter count of ``reference`` at the same other fields (the MLP's parameters are linear in its width),
    a multiple of MLP_WIDTH_ALIGN where that stays within PARAM_TOLERANCE, else the nearest width."""
    from zeros_lm import ZeroSConfig

    target = parameter_count(model_fields(args, reference))
    width = ZeroSConfig(**model_fields(args, attention)).intermediate_size
    count = parameter_count(model_fields(args, attention, width))
    per_unit = (parameter_count(model_fields(args, attention, width + MLP_WIDTH_STEP)) - count) // MLP_WIDTH_STEP
    exact = max(1, width + round((target - count) / per_unit))
    aligned = max(MLP_WIDTH_ALIGN, MLP_WIDTH_ALIGN * round(exact / MLP_WIDTH_ALIGN))
    params_at = lambda w: count + per_unit * (w - width)  # noqa: E731  (linear in the width)
    if abs(params_at(aligned) - target) <= PARAM_TOLERANCE * target:
        exact = aligned
    return exact, params_at(exact), target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--attentions", nargs="+", default=["zeros", "softmax"])
    add_model_options(p)
    add_step_options(p, steps=4)
    p.add_argument("--match-params", choices=["zeros", "none"], default="zeros",
                   help="give the other attentions the MLP width that matches this one's parameters (default zeros)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attention", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.point:
        print(json.dumps(run_point(args)))
        return 0

    widths = {}  # attention -> MLP width matching the reference's parameters
    if args.match_params != "none":
        for attention in args.attentions:
            if attention != args.match_params:
                widths[attention], count, target = matched_mlp_width(args, attention, args.match_params)
                print(f"  {attention}: MLP width {widths[attention]} for {count / 1e6:.2f} M parameters "
                      f"({args.match_params}: {target / 1e6:.2f} M)", file=sys.stderr, flush=True)
    results = []
    for seq_len in args.seq_lens:
        for attention in args.attentions:
            cmd = [sys.executable, __file__, "--point", "--attention", attention, "--seq-len", str(seq_len)]
            for key in ("device", "precision", "tokens_per_step", "hidden_size", "layers", "heads", "vocab_size",
                        "chunk_size", "attention_backend", "warmup", "steps"):
                cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
            width = widths.get(attention, args.intermediate_size)
            if width:
                cmd += ["--intermediate-size", str(width)]
            cmd += [f"--{flag.replace('_', '-')}" for flag in ("gradient_checkpointing", "compile") if getattr(args, flag)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                results.append({"attention": attention, "seq_len": seq_len, "error": proc.stderr.strip().splitlines()[-1]})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"  {attention:8s} seq_len {seq_len:6d}: {r['tokens_per_s']:10.0f} tok/s, "
                  f"peak {r['peak_bytes'] / 2**20:8.0f} MiB", file=sys.stderr, flush=True)

    device = args.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    else:
        threads = next((r["threads"] for r in results if "threads" in r), None)
        device = f"CPU ({os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''})"
    matched = f"parameters matched to {args.match_params}'s by the MLP width" if widths else "one config"
    print(
        f"\nTraining throughput, {args.layers} layers x {args.hidden_size}, {args.heads} heads, vocab "
        f"{args.vocab_size} ({matched}), {args.tokens_per_step} tokens per step, "
        f"{args.precision}, AdamW, {'compiled blocks' if args.compile else 'eager'}, ZeroS backend "
        f"{args.attention_backend}, on {device}"
        + ("; memory = peak process RSS" if not args.device.startswith("cuda") else "; memory = peak allocated")
        + "\n"
    )
    mfu = any(r.get("mfu") for r in results)
    print("| seq_len | attention | parameters (M) | MLP width | batch | tokens/s | peak memory (MiB) | tokens/s vs softmax |"
          + (" MFU |" if mfu else ""))
    print("|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if mfu else ""))
    for seq_len in args.seq_lens:
        base = next((r for r in results if r["seq_len"] == seq_len and r["attention"] == "softmax" and "error" not in r), None)
        for r in (r for r in results if r["seq_len"] == seq_len):
            if "error" in r:
                print(f"| {seq_len} | {r['attention']} | | | | failed: {r['error']} | | |" + (" |" if mfu else ""))
                continue
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            print(f"| {seq_len} | {r['attention']} | {r['params'] / 1e6:.2f} | {r['intermediate_size']} | "
                  f"{r['batch']} | {r['tokens_per_s']:,.0f} | "
                  f"{r['peak_bytes'] / 2**20:,.0f} | {ratio} |" + (f" {100 * r['mfu']:.1f}% |" if mfu else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
