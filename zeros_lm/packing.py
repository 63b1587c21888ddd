"""Packed documents: several documents laid end to end in the rows of a batch, kept apart.

``PackedDocuments`` reads the document boundaries from ``position_ids`` (Hugging Face's
``DataCollatorWithFlattening`` convention: they restart at 0 where a document starts);
``packed_position_ids`` makes such position_ids for blocks packed with a separator token; the two
``*_over_documents`` functions run the recurrent ops with every document from an empty state.

``save_pretrained`` copies this file beside ``modeling_zeros.py`` (``trust_remote_code``), so it imports
nothing from the ``zeros_lm`` package except its flat siblings (here ``.ops``).

Shapes: B batch, T columns per row, H heads, d head dimension.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .ops import cumsum_tokens, linear_attention_packed, zeros_attention


@dataclasses.dataclass
class PackedDocuments:
    """Document boundaries inside the rows of a packed batch, so that no document sees another.

    Follows the Hugging Face convention of ``DataCollatorWithFlattening``: ``position_ids`` restart at 0
    where a document starts. Every row start and every document start begins a segment; the rows stay
    rows (``zeros_attention``'s ``sequence_starts``, so the chunked forms keep the rows in parallel).

    Fields:
        row_lengths: per row, the lengths of its segments (host lists, handed to every layer);
        segment (B, T) long: the segment of each token (numbered row by row);
        first (B T,) long: the flat position of each token's segment start;
        counts (B, T) long: the real tokens of the document up to and including each column (the t of
            docs/method.md; the RoPE position is counts - 1);
        position (B, T) long: each column's offset from its segment's start.
    """

    row_lengths: list
    segment: torch.Tensor
    first: torch.Tensor
    counts: torch.Tensor
    position: torch.Tensor

    @classmethod
    def from_position_ids(cls, position_ids, valid, B: int, T: int, device) -> "PackedDocuments | None":
        """None unless some ``position_ids`` restart at 0 after a real token of the same row (padding
        before a row's first token, as generate() numbers it, starts nothing). valid: (B, T) bool or None."""
        if position_ids is None:
            return None
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] < T:
            raise ValueError(f"position_ids must have shape (batch or 1, >= {T}), got {tuple(position_ids.shape)}")
        real = valid.long() if valid is not None else torch.ones(B, T, dtype=torch.long, device=device)
        starts = (position_ids[:, -T:].to(device) == 0).expand(B, T) & (real.cumsum(1) - real > 0)
        if not bool(starts.any()):
            return None
        starts[:, 0] = True
        flat = starts.flatten()
        begin = flat.nonzero().squeeze(1)                                           # (S,)
        segment = flat.long().cumsum(0) - 1                                         # (B T,)
        bounds = begin.tolist() + [B * T]
        row_lengths = [[] for _ in range(B)]
        for lo, hi in zip(bounds, bounds[1:]):
            row_lengths[lo // T].append(hi - lo)
        first = begin[segment]
        position = (torch.arange(B * T, device=device) - first).view(B, T)
        documents = cls(row_lengths=row_lengths, segment=segment.view(B, T), first=first,
                        counts=real, position=position)
        documents.counts = documents.running_sum(real)
        return documents

    def running_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Inclusive running sum of x (B, T, ...) over each document, in x's dtype: the row's running sum
        less its value before the document's start (the rounding of a sum over one row, as without
        documents)."""
        total = cumsum_tokens(x)
        before = F.pad(total[:, :-1], (0, 0) * (x.dim() - 2) + (1, 0)).flatten(0, 1)   # sums before each column
        return total - before.index_select(0, self.first).view(x.shape)


def packed_position_ids(input_ids: torch.Tensor, separator_id: int) -> torch.LongTensor:
    """position_ids (B, T) for blocks packed as ``doc SEP doc SEP ...``: they restart at 0 at every separator.

    Each separator then opens the next document (as a BOS would), so every next-token target stays
    inside its document: the separator predicts the document's first token, its last token predicts
    the separator. Pass them to the model's forward to keep the documents apart.
    """
    B, T = input_ids.shape
    columns = torch.arange(T, device=input_ids.device).expand(B, T)
    return columns - torch.where(input_ids == separator_id, columns, 0).cummax(dim=1).values  # since the last start


# The packed-documents paths plan on the host from the documents' lengths (PackedDocuments.row_lengths,
# Python lists): traced by torch.compile, every new batch layout would be a recompile (and past dynamo's
# recompile limit the block runs eagerly anyway). They run outside the compiled graph; the rest of a
# compiled block (projections, RoPE, gates, MLP) still compiles.
# (They take the PackedDocuments itself: a list handed over from traced code would be guarded on too.)
@torch.compiler.disable
def zeros_attention_over_documents(documents: PackedDocuments, *args, **kwargs):
    """``zeros_attention`` with every packed document from an empty state (its lengths, known on the host:
    no device read per layer)."""
    return zeros_attention(*args, sequence_starts=documents.row_lengths, **kwargs)


@torch.compiler.disable
def linear_attention_over_documents(q, k, v, documents: PackedDocuments, chunk_size: int) -> torch.Tensor:
    """``linear_attention_packed`` over the packed documents; q, k, v (B, H, T, d). Returns (B, H, T, d)."""
    return linear_attention_packed(q, k, v, documents.row_lengths, chunk_size)


__all__ = ["PackedDocuments", "linear_attention_over_documents", "packed_position_ids",
           "zeros_attention_over_documents"]
