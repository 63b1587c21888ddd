#!/usr/bin/env python
"""The cost of keeping packed documents apart: training tokens/s with ``document_resets`` on and off.

One process, the same model and batches for both settings: the training step of ``train.py``
(``ZeroSLitModule._loss``, backward, AdamW) on blocks packed as ``doc EOS doc EOS ...`` from random
documents of a given mean length. The two settings alternate, ``--repeats`` times ``--steps`` timed
steps each, and the median of each is compared (alternating keeps a noisy, shared machine fair to
both). Prints a Markdown table.

    python benchmarks/packed.py                                   # CPU, the default run's model
    python benchmarks/packed.py --device cuda --seq-lens 2048 8192 --attentions zeros softmax
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

try:  # benchmarks.packed (tests) or python benchmarks/packed.py (a script beside train.py)
    from .train import add_model_options, model_fields
except ImportError:
    from train import add_model_options, model_fields

EOS = 0


def packed_blocks(batch: int, seq_len: int, vocab_size: int, mean_document: int, generator):
    """(batch, seq_len + 1) random token ids; documents of exponentially distributed length (mean
    ``mean_document``) separated by EOS. Returns the blocks and the number of EOS inside them."""
    import torch

    blocks = torch.randint(EOS + 1, vocab_size, (batch, seq_len + 1), generator=generator)
    gaps = torch.empty(batch * (seq_len + 1)).exponential_(1.0 / mean_document, generator=generator)
    ends = (gaps.ceil().long().cumsum(0))
    ends = ends[ends < blocks.numel()]
    blocks.view(-1)[ends] = EOS
    return blocks, int(ends.numel())


def measure(args, attention: str, seq_len: int) -> dict:
    import torch

    from zeros_lm.training import ZeroSLitModule

    device = torch.device(args.device)
    batch = max(1, args.tokens_per_step // seq_len)
    g = torch.Generator().manual_seed(0)
    blocks = [packed_blocks(batch, seq_len, args.vocab_size, args.mean_document, g)[0].to(device) for _ in range(4)]
    fields = dict(model_fields(args, attention), eos_token_id=EOS)
    runs = {}
    for resets in (False, True):
        torch.manual_seed(0)
        module = ZeroSLitModule(document_resets=resets, **fields).to(device).train()
        runs[resets] = (module, torch.optim.AdamW(module.parameters(), lr=1e-4), [])
    amp = args.precision == "bf16"

    def step(module, optimizer, i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = module._loss(blocks[i % len(blocks)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for module, optimizer, _ in runs.values():
        for i in range(args.warmup):
            step(module, optimizer, i)
    for _ in range(args.repeats):
        for module, optimizer, times in runs.values():
            sync()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(module, optimizer, i)
            sync()
            times.append((time.perf_counter() - t0) / args.steps)
    tokens = batch * seq_len
    off, on = (tokens / statistics.median(runs[r][2]) for r in (False, True))
    documents = sum(int((b[:, 1:-1] == EOS).sum()) for b in blocks) / len(blocks) + batch
    return {"attention": attention, "seq_len": seq_len, "batch": batch, "documents_per_step": documents,
            "tokens_per_s_off": off, "tokens_per_s_on": on, "cost": 1 - on / off,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--attentions", nargs="+", default=["zeros", "softmax", "linear"])
    p.add_argument("--mean-document", type=int, default=200, help="mean document length in tokens")
    p.add_argument("--tokens-per-step", type=int, default=2048, help="batch = tokens_per_step // seq_len")
    add_model_options(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    results = []
    for seq_len in args.seq_lens:
        for attention in args.attentions:
            results.append(measure(args, attention, seq_len))
            r = results[-1]
            print(f"  {attention:8s} seq_len {seq_len:6d}: {r['tokens_per_s_off']:10.0f} -> {r['tokens_per_s_on']:10.0f} "
                  f"tok/s ({100 * r['cost']:+.1f}%)", file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {results[0]['threads']} torch threads)"
    print(f"\nPacked training, {args.layers} layers x {args.hidden_size}, {args.heads} heads, {args.tokens_per_step} "
          f"tokens per step, documents of {args.mean_document} tokens on average, {args.precision}, on {device}; "
          f"median of {args.repeats} x {args.steps} steps\n")
    print("| seq_len | attention | documents / step | tokens/s, resets off | tokens/s, resets on | cost |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['seq_len']} | {r['attention']} | {r['documents_per_step']:.0f} | {r['tokens_per_s_off']:,.0f} | "
              f"{r['tokens_per_s_on']:,.0f} | {100 * r['cost']:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
