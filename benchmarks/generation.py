#!/usr/bin/env python
"""Decode latency and cache size of ZeroS vs the softmax baseline, as the context grows.

One config (6 layers, hidden 384, 6 heads, vocab 8192, random weights, float32) built as a ZeroS
model and as the softmax-attention baseline. For each context length L the prompt is prefilled
(chunked, through the cache), then single-token decode steps are timed (model forward with the
cache + greedy pick); the table reports the median latency per token and the cache size.

    python benchmarks/generation.py            # contexts 128, 1024, 4096, 8192 (+ 32768 for ZeroS)
    python benchmarks/generation.py --quick    # contexts 128, 1024, 2048: a quick check
    python benchmarks/generation.py --threads 1 --steps 64

Targets (CPU): ZeroS latency at 8192 <= 1.1x its latency at 128; ZeroS cache <= 2 MiB at every
context; ZeroS faster per token than softmax at every context >= 1024.
"""

import argparse
import statistics
import sys
import time

import torch

from zeros_lm import ZeroSCache, ZeroSConfig, ZeroSForCausalLM  # the installed package (scripts/setup.sh)

FULL = {"zeros": [128, 1024, 4096, 8192, 32768], "softmax": [128, 1024, 4096, 8192]}
QUICK = {"zeros": [128, 1024, 2048], "softmax": [128, 1024, 2048]}


def build(attention_type: str, seed: int = 0) -> ZeroSForCausalLM:
    config = ZeroSConfig(
        vocab_size=8192,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        attention_type=attention_type,
    )
    torch.manual_seed(seed)
    return ZeroSForCausalLM(config).eval()


@torch.inference_mode()
def measure(models: dict, plan: dict, steps: int, warmup: int, prefill_chunk: int, seed: int = 0):
    """Yield (context, name, median ms/token, mean ms/token, cache bytes, prefill seconds).

    Each model keeps one cache that grows from one context to the next: a context is reached by
    prefilling only the missing tokens, so every measurement starts with exactly `context` tokens in
    the cache. At each context the models' decode steps are interleaved, so that a busy machine
    slows them alike.
    """
    gen = torch.Generator().manual_seed(seed)
    caches = {name: ZeroSCache(model.config) for name, model in models.items()}
    for cache in caches.values():  # decoding as generate.py and the server do (a ZeroS state updated in place)
        cache.in_place_updates = True
    for context in sorted({c for contexts in plan.values() for c in contexts}):
        active = [name for name in models if context in plan[name]]
        tokens, prefill_s = {}, {}
        for name in active:
            model, cache = models[name], caches[name]
            missing = context - cache.get_seq_length()
            start = time.perf_counter()
            while missing > 0:
                n = min(prefill_chunk, missing)
                ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
                logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits
                tokens[name] = logits[:, -1].argmax(-1, keepdim=True)
                missing -= n
            prefill_s[name] = time.perf_counter() - start
            assert cache.get_seq_length() == context, (cache.get_seq_length(), context)
        nbytes = {name: caches[name].nbytes for name in active}
        times = {name: [] for name in active}
        for i in range(warmup + steps):
            for name in active:
                t0 = time.perf_counter()
                logits = models[name](tokens[name], cache=caches[name], use_cache=True).logits
                tokens[name] = logits[:, -1].argmax(-1, keepdim=True)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        for name in active:
            ms = [t * 1e3 for t in times[name]]
            yield context, name, statistics.median(ms), statistics.mean(ms), nbytes[name], prefill_s[name]


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts 128, 1024, 2048 only")
    p.add_argument("--contexts", type=int, nargs="+", help="override the contexts (both models)")
    p.add_argument("--models", nargs="+", default=["zeros", "softmax"], choices=["zeros", "softmax", "linear"])
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context (default 32)")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (default 4)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    plan = QUICK if args.quick else FULL
    plan = {name: args.contexts or plan.get(name, plan["zeros"]) for name in args.models}
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1", file=sys.stderr)
    models = {name: build(name) for name in args.models}
    for context, name, median_ms, mean_ms, nbytes, prefill_s in measure(
        models, plan, args.steps, args.warmup, args.prefill_chunk
    ):
        results[name, context] = (median_ms, nbytes)
        print(
            f"{name:8s} context {context:6d}: {median_ms:7.2f} ms/token (mean {mean_ms:.2f}), "
            f"cache {fmt_bytes(nbytes)}, prefill {prefill_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    names = list(args.models)
    contexts = sorted({c for (_, c) in results})
    header = "| context | " + " | ".join(f"{n} ms/token | {n} cache" for n in names) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(names)))
    for c in contexts:
        cells = []
        for n in names:
            if (n, c) in results:
                ms, nbytes = results[n, c]
                cells += [f"{ms:.2f}", fmt_bytes(nbytes)]
            else:
                cells += ["—", "—"]
        print(f"| {c} | " + " | ".join(cells) + " |")

    if "zeros" in names:
        z = {c: results["zeros", c] for c in contexts if ("zeros", c) in results}
        lo, hi = min(z), max([c for c in z if c <= 8192] or z)
        print()
        print(f"- ZeroS latency at {hi} / at {lo}: {z[hi][0] / z[lo][0]:.2f}x (target <= 1.1x at 8192 / 128)")
        print(f"- ZeroS cache, largest: {fmt_bytes(max(b for _, b in z.values()))} (target <= 2 MiB)")
        if "softmax" in names:
            faster = [c for c in contexts if c >= 1024 and ("softmax", c) in results and c in z]
            wins = [c for c in faster if z[c][0] < results["softmax", c][0]]
            print(f"- ZeroS faster than softmax at {len(wins)}/{len(faster)} contexts >= 1024 (target: all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
