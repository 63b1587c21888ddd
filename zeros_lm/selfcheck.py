"""Check an installation: ``python -m zeros_lm.selfcheck`` imports the package (which checks the
torch floor, see ``_torch_floor.py``) and runs a tiny model of every attention type forward on the
CPU. The Docker image runs it as its build step."""

from __future__ import annotations

import sys

import torch

import zeros_lm
from zeros_lm import ZeroSConfig, ZeroSForCausalLM
from zeros_lm.configuration_zeros import ATTENTION_TYPES

__all__ = ["main"]


def main() -> int:
    """Import the package and run a forward pass of a tiny model of each attention type on the CPU;
    exit status 1 if any logit is not finite."""
    vocab = 300
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    for attention_type in ATTENTION_TYPES:
        config = ZeroSConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=8,
            attention_type=attention_type,
        )
        with torch.no_grad():
            logits = ZeroSForCausalLM(config).eval()(input_ids=ids).logits
        if not bool(torch.isfinite(logits).all()):
            print(f"error: the {attention_type} model's logits are not finite", file=sys.stderr)
            return 1
        print(f"{attention_type}: forward pass {tuple(ids.shape)} -> {tuple(logits.shape)}, finite")
    print(f"zeros-lm {zeros_lm.__version__} works with torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
