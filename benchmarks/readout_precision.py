#!/usr/bin/env python
"""How precise must the products of the state readout be? Each scheme emulated in float64 on CPU.

The inter-chunk readout of ZeroS, o_t = a_t q_t F + b_t q_t G + hc_t q_t H, cancels when the logits are
nearly uniform: its three terms are each far larger than their sum. This script builds float32 states from
random unit keys and values at a given logit spread, reads them with a chunk of queries by each product
scheme (operands rounded as the hardware would, products exact, float32-grade sums), and prints each
scheme's relative error against float64 (Frobenius norm over the chunk). docs/gpu.md quotes the table;
tests/test_fused_path.py asserts it.

    python benchmarks/readout_precision.py                 # spreads 2, 0.3, 0.01; T 2048, chunk 64, d 64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

EXACT = torch.float64
TF32_MANTISSA_DROP = 13  # float32 keeps 23 mantissa bits, TF32 10


def _as(x, dtype):
    return x.to(dtype).to(EXACT)


def _tf32(x):
    """x rounded to TF32 (10 mantissa bits, round to nearest), as float64."""
    bits = x.to(torch.float32).view(torch.int32)
    half = 1 << (TF32_MANTISSA_DROP - 1)
    bits = (bits + half) & ~((1 << TF32_MANTISSA_DROP) - 1)
    return bits.view(torch.float32).to(EXACT)


def _hi_lo(S, dtype, scaled=False):
    """S as the sum of a high and a low part in dtype (of S / max|S| when scaled), as float64."""
    scale = S.abs().max() if scaled else torch.ones((), dtype=EXACT)
    x = S / scale
    hi = _as(x, dtype)
    return (hi + _as(x - hi, dtype)) * scale


SCHEMES = {
    # name: (the query's dtype, readout(q, coefficients, states) -> o)
    "tf32x3 (float32-grade products)": (torch.bfloat16, lambda q, co, st: sum(
        _as(w[:, None] * q, torch.float32) @ S for w, S in zip(co, st))),
    "TF32, coefficients in q": (torch.bfloat16, lambda q, co, st: sum(
        _tf32(w[:, None] * q) @ _tf32(S) for w, S in zip(co, st))),
    "bf16 state, coefficients after": (torch.bfloat16, lambda q, co, st: sum(
        w[:, None] * _as(q @ _as(S, torch.bfloat16), torch.float32) for w, S in zip(co, st))),
    "bf16 high + low state, coefficients after": (torch.bfloat16, lambda q, co, st: sum(
        w[:, None] * _as(q @ _hi_lo(S, torch.bfloat16), torch.float32) for w, S in zip(co, st))),
    "fp16 high + low of state / max, coefficients after": (torch.float16, lambda q, co, st: sum(
        w[:, None] * _as(q @ _hi_lo(S, torch.float16, scaled=True), torch.float32) for w, S in zip(co, st))),
}


def readout_errors(spread: float, T: int = 2048, C: int = 64, d: int = 64, seed: int = 0) -> dict:
    """{scheme: relative error against float64} for a chunk of C queries reading the state after T tokens whose
    logits have standard deviation ``spread``; also "cancellation": sum of the terms' norms / the result's."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=EXACT)  # noqa: E731
    k, v = F.normalize(rand(T, d), dim=-1), rand(T, d)
    s = spread * rand(T)
    e, centred = torch.exp(s - s.max()), s - s.mean()
    # The kernels' float32 states (F scaled by the running maximum, G centred on the running mean).
    states = [_as(k.T @ (w[:, None] * v), torch.float32) for w in (e, centred, torch.ones(T, dtype=EXACT))]
    g1, gh = torch.rand(C, generator=g, dtype=EXACT), torch.rand(C, generator=g, dtype=EXACT)
    coefficients = (gh / e.sum(), (g1 - gh) / T, -gh / T)     # a, b, hc of queries at the chunk start
    q_exact = F.normalize(rand(C, d), dim=-1)
    out = {}
    for name, (dtype, readout) in SCHEMES.items():
        q = _as(q_exact, dtype)                                 # the model's 16-bit query, used as it is
        ref = sum(w[:, None] * (q @ S) for w, S in zip(coefficients, states))
        out[name] = ((readout(q, coefficients, states) - ref).norm() / ref.norm()).item()
    q = _as(q_exact, torch.bfloat16)
    terms = sum((w[:, None] * (q @ S)).norm() for w, S in zip(coefficients, states))
    out["cancellation"] = (terms / sum(w[:, None] * (q @ S) for w, S in zip(coefficients, states)).norm()).item()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spreads", type=float, nargs="+", default=[2.0, 0.3, 0.01])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    results = {x: readout_errors(x, args.tokens, args.chunk_size, args.head_dim) for x in args.spreads}
    print(f"# Readout q (a F + b G + hc H) after {args.tokens} tokens, chunk {args.chunk_size}, d {args.head_dim}: "
          "relative error against float64\n")
    print("| scheme | " + " | ".join(f"spread {x:g}" for x in args.spreads) + " |")
    print("|---|" + "---:|" * len(args.spreads))
    for name in list(SCHEMES) + ["cancellation"]:
        fmt = (lambda e: f"{e:.0f}x") if name == "cancellation" else (lambda e: f"{e:.1e}")
        print(f"| {name} | " + " | ".join(fmt(results[x][name]) for x in args.spreads) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
