"""Counting a model's work: its training FLOPs per token, and the peak FLOP/s of known devices,
from which the model FLOPs utilisation (MFU) of a run is computed (logged by
:class:`zeros_lm.callbacks.ThroughputLogger`, shown by ``benchmarks/train.py``)."""

from __future__ import annotations

from typing import Optional

import torch

from .modeling_zeros import ZeroSForCausalLM

__all__ = ["PEAK_BF16_FLOPS", "peak_flops_of", "model_flops_per_token"]

# Dense bfloat16 tensor-core peak of one device, FLOP/s, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops_of(device: torch.device) -> Optional[float]:
    """The bf16 peak of a known CUDA device (by name), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def model_flops_per_token(model: ZeroSForCausalLM, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of ``model`` on sequences of ``seq_len``:
    6 per weight that multiplies activations (all but the input embedding; the LM head counts, tied or not),
    plus each layer's token mixing, per head:

    - softmax: causal Q K^T and (weights) V over T / 2 keys on average: 2 * 2 * (T / 2) * d;
    - ZeroS: the same two products over C / 2 keys in a chunk of C, plus the state readout and update
      (three d x d matrices each): 2 * 2 * (C / 2) * d + 2 * 2 * 3 * d * d;
    - linear: as ZeroS with one d x d state.
    """
    config = model.config
    H, d, C = config.num_attention_heads, config.head_dim, min(config.chunk_size, seq_len)
    mixing = {"softmax": 2 * seq_len * d, "zeros": 2 * C * d + 12 * d * d, "linear": 2 * C * d + 4 * d * d}
    forward = sum(H * mixing[kind] for kind in config.mixer_types)
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() for p in model.parameters() if p is not embedding)
    if config.tie_word_embeddings:
        weights += embedding.numel()  # the tied head still multiplies
    return 6 * weights + 3 * forward
