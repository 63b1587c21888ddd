"""Join per-stream caches into one batch and take rows back out (continuous batching).

A :class:`~zeros_lm.ZeroSCache` holds, per layer, one slot whose elements have the batch first (see its
docstring): recurrent layers (``"zeros"``, ``"linear"``) hold fixed-size tensors and a ``ZeroSState``;
softmax layers hold ``(keys, values, keys_valid)`` of shapes (B, H, S, d), (B, H, S, d), (B, S). Rows of
different streams have different S: :func:`stack_caches` left-pads the shorter ones with keys that are
not valid (masked, so they change nothing), :func:`take_rows` drops the columns no kept row needs.

These work through the cache's public attributes (``layer_kinds``, ``layer_states``, ``num_tokens``,
``seen_tokens``) and never modify their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeros_lm.modeling_zeros import ZeroSCache
from zeros_lm.ops import ZeroSState

SOFTMAX = "softmax"
_KEYS, _VALUES, _KEYS_VALID = 0, 1, 2  # the elements of a softmax layer's slot
_SEQ_DIM = 2  # of keys and values (B, H, S, d)


def _cat(parts: list):
    """Concatenate one slot element of several caches along the batch (tensor, ZeroSState or None)."""
    if all(x is None for x in parts):
        return None
    if any(x is None for x in parts):
        raise ValueError("cannot join caches whose layers hold different kinds of state")
    if isinstance(parts[0], ZeroSState):
        return ZeroSState.cat(parts)
    return torch.cat(parts, dim=0)


def _rows(x, index: torch.Tensor):
    if x is None:
        return None
    if isinstance(x, ZeroSState):
        return x.index_select(index)
    return x.index_select(0, index.to(x.device))


def _left_pad_kv(slot: tuple, width: int) -> tuple:
    """A softmax slot with ``width`` key columns: the missing ones in front, not valid."""
    keys, values, valid = slot
    missing = width - keys.shape[_SEQ_DIM]
    if missing == 0:
        return slot
    return (F.pad(keys, (0, 0, missing, 0)), F.pad(values, (0, 0, missing, 0)), F.pad(valid, (missing, 0), value=False))


def _kv_width(cache: ZeroSCache) -> int | None:
    """Key columns of the cache's softmax layers (all the same), or None without softmax layers."""
    for kind, slot in zip(cache.layer_kinds, cache.layer_states):
        if kind == SOFTMAX and slot is not None:
            return slot[_KEYS].shape[_SEQ_DIM]
    return None


def _empty_like(cache: ZeroSCache) -> ZeroSCache:
    out = ZeroSCache.__new__(ZeroSCache)
    out.__dict__.update(cache.__dict__)  # kinds, config fields, metadata: shared, read-only
    out.layer_states = [None] * cache.num_layers
    out.metadata = dict(cache.metadata)
    return out


def stack_caches(caches: list[ZeroSCache]) -> ZeroSCache:
    """One cache whose rows are the rows of ``caches`` in order (each must have read at least one token)."""
    if not caches:
        raise ValueError("stack_caches: no cache to join")
    if any(c.num_tokens is None for c in caches):
        raise ValueError("stack_caches: a cache has read no token yet")
    if len(caches) == 1:
        return caches[0]
    out = _empty_like(caches[0])
    widths = [w for w in (_kv_width(c) for c in caches) if w is not None]
    width = max(widths) if widths else None
    for i, kind in enumerate(out.layer_kinds):
        slots = [c.layer_states[i] for c in caches]
        if kind == SOFTMAX:
            slots = [_left_pad_kv(s, width) for s in slots]
        out.layer_states[i] = tuple(_cat(list(parts)) for parts in zip(*slots))
    out.num_tokens = torch.cat([c.num_tokens for c in caches])
    out.seen_tokens = width if width is not None else max(c.seen_tokens for c in caches)
    return out


def take_rows(cache: ZeroSCache, rows: list[int]) -> ZeroSCache:
    """A new cache of the given rows (in that order), without the leading key columns none of them uses."""
    index = torch.tensor(rows, dtype=torch.long, device=cache.num_tokens.device)
    out = _empty_like(cache)
    out.layer_states = [None if s is None else tuple(_rows(x, index) for x in s) for s in cache.layer_states]
    out.num_tokens = cache.num_tokens.index_select(0, index)
    width = _kv_width(out)
    if width is None:
        out.seen_tokens = int(out.num_tokens.max())
        return out
    first_softmax = out.layer_kinds.index(SOFTMAX)
    used = out.layer_states[first_softmax][_KEYS_VALID].any(dim=0)  # (S,) every softmax layer has the same
    unused = int(used.long().argmax()) if bool(used.any()) else width
    if unused:
        for i, kind in enumerate(out.layer_kinds):
            if kind == SOFTMAX:
                keys, values, valid = out.layer_states[i]
                out.layer_states[i] = (keys[:, :, unused:].contiguous(), values[:, :, unused:].contiguous(),
                                          valid[:, unused:].contiguous())
    out.seen_tokens = width - unused
    return out
