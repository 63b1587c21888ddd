"""Softmax attention's kernels: the SDPA mask for padding, a cache and packed documents, and the choice of
kernel over packed documents (torch's varlen flash attention on a GPU, one SDPA call per document or one
masked call on a CPU).

``save_pretrained`` copies this file beside ``modeling_zeros.py`` (``trust_remote_code``), so it imports
nothing from the ``zeros_lm`` package.

Shapes: B batch, H heads, T new tokens (queries), S cached keys, d head dimension.
"""

from __future__ import annotations

import functools
import inspect
import itertools

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .packing import PackedDocuments


# When one SDPA call per packed document beats one call with a block-diagonal mask, on a CPU:
# one SDPA call (forward and backward) costs about as much as this many more (query, key) pairs.
# Measured on a CPU (2-core Intel Xeon, 2026-11-28, head size 64, benchmarks/packed.py's batches of
# 200-token documents: one call per document gains in rows of 1024 tokens and more, loses in rows of 256;
# docs/benchmarks.md, packed documents). Re-measure with benchmarks/packed.py on other CPUs.
_SDPA_CALL_PAIRS = 256 * 256
# What torch's flash kernels (varlen_attn) accept: half-precision inputs, and head sizes of at most
# _FLASH_MAX_HEAD_DIM that are a multiple of _FLASH_HEAD_DIM_MULTIPLE.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
_FLASH_HEAD_DIM_MULTIPLE = 8
# The varlen call is causal through its window: any number of keys before the query, none after it.
_CAUSAL_WINDOW = (-1, 0)


@functools.lru_cache(maxsize=None)
def _varlen_causal_attention():
    """torch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``, CUDA only) as
    ``fn(q, k, v, cu_seqlens, max_len)`` with causal masking, q, k, v (N, H, d) for N tokens of flattened
    documents, cu_seqlens (D + 1,) int32; or None where this torch has none we use. Only its form with
    ``window_size`` (causal: (-1, 0)) is used: the first release's form (torch 2.10, ``is_causal``) is left
    alone, as a fix to its backward came after it (pytorch PR 170142) and no GPU here has run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None

    def attend(q, k, v, cu_seqlens, max_len):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=_CAUSAL_WINDOW)
    return attend


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an attention kernel computes x in: autocast's on x's device where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _packed_softmax_kernel(row_lengths: list, T: int, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """How softmax attends over packed documents (rows of T tokens, row_lengths: per row, its documents'
    lengths), computing in ``dtype``: "varlen" (on CUDA in half precision: torch's varlen flash attention,
    sum l^2 pairs in one call), "per_document" (on a CPU when the pairs saved outweigh the calls' overhead:
    one causal SDPA call per document), else "mask" (one SDPA call with a block-diagonal mask: all T^2
    pairs of each row; many small calls would starve a GPU)."""
    if (device.type == "cuda" and dtype in _FLASH_DTYPES and head_dim <= _FLASH_MAX_HEAD_DIM
            and head_dim % _FLASH_HEAD_DIM_MULTIPLE == 0 and _varlen_causal_attention() is not None):
        return "varlen"
    if device.type != "cpu":
        return "mask"
    per_document = sum(n * n + _SDPA_CALL_PAIRS for row in row_lengths for n in row)
    return "per_document" if per_document < len(row_lengths) * T * T else "mask"


@torch.compiler.disable  # planned from host lists (see packing.zeros_attention_over_documents)
def packed_softmax_attention(q, k, v, documents: PackedDocuments):
    """Causal attention over packed documents, q, k, v (B, H, T, d), by the way _packed_softmax_kernel
    picks: (B, H, T, d), or None where that is the block-diagonal mask (the caller's SDPA call)."""
    rows = documents.row_lengths
    kernel = _packed_softmax_kernel(rows, q.shape[2], q.device, _attention_dtype(q), q.shape[-1])
    if kernel == "mask":
        return None
    return (_attention_varlen if kernel == "varlen" else _attention_per_document)(q, k, v, rows)


def _attention_per_document(q, k, v, row_lengths: list) -> torch.Tensor:
    """Causal SDPA over packed documents, q, k, v (B, H, T, d), one call per document; row_lengths: per row,
    the lengths of its documents. Returns (B, H, T, d)."""
    rows = []
    for r, lengths in enumerate(row_lengths):
        bounds = [0, *itertools.accumulate(lengths)]
        rows.append(torch.cat([F.scaled_dot_product_attention(q[r:r + 1, :, lo:hi], k[r:r + 1, :, lo:hi],
                                                               v[r:r + 1, :, lo:hi], is_causal=True)
                               for lo, hi in zip(bounds, bounds[1:])], dim=2))
    return torch.cat(rows, dim=0)


def _attention_varlen(q, k, v, row_lengths: list) -> torch.Tensor:
    """Causal attention over packed documents in one varlen flash call: the rows' documents laid end to end,
    q, k, v (B, H, T, d), row_lengths as in _attention_per_document. Returns (B, H, T, d)."""
    B, H, T, d = q.shape
    dtype = _attention_dtype(q)
    lengths = [n for row in row_lengths for n in row]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(q.device, non_blocking=True)

    def tokens(x):  # (B, H, T, d) -> (B T, H, d)
        return x.transpose(1, 2).reshape(B * T, H, d).to(dtype)

    o = _varlen_causal_attention()(tokens(q), tokens(k), tokens(v), cu_seqlens, max(lengths))
    return o.view(B, T, H, d).transpose(1, 2)


def _own_key(T: int, S: int, device) -> torch.Tensor:
    """(T, S+T) boolean mask that is True where query i meets its own key S+i."""
    mask = torch.zeros(T, S + T, dtype=torch.bool, device=device)
    idx = torch.arange(T, device=device)
    mask[idx, S + idx] = True
    return mask[None]


def softmax_attention_mask(valid, past_valid, B: int, T: int, device,
                           documents: PackedDocuments | None = None) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, T, S+T), or None where plain causal attention is exact.

    valid (B, T) bool or None (all real): the new tokens that are real; past_valid (B, S) bool or None: the
    cached keys that are real. With packed ``documents`` (no cache) it is block-diagonal: a query sees the
    earlier keys of its document."""
    if documents is not None:
        keys = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=device)
        same = documents.segment[:, :, None] == documents.segment[:, None, :]
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] & same & keys[:, None, :]
        return (mask | _own_key(T, 0, device))[:, None]
    S = 0 if past_valid is None else past_valid.shape[1]
    past_all_valid = past_valid is None or bool(past_valid.all())
    if valid is None and past_all_valid and (S == 0 or T == 1):
        return None  # is_causal (S == 0) or attend to everything (one new token)
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    keys = valid if past_valid is None else torch.cat([past_valid.to(device), valid], dim=1)
    causal = torch.ones(T, S + T, dtype=torch.bool, device=device).tril(diagonal=S)
    mask = causal[None] & keys[:, None, :]
    # A padding query would otherwise see no key at all (SDPA gives NaN); let it see itself.
    mask |= _own_key(T, S, device)
    return mask[:, None]


__all__ = ["packed_softmax_attention", "softmax_attention_mask"]
