"""ZeroS (zero-sum linear attention): the core op in three agreeing forms.

    o, state = zeros_attention(q, k, v, s, g1, gh, g0=None, *, mode="chunked", ...)

Per head, with t counting the real (non-padding) tokens up to and including the query:

    p_{t,i} = exp(s_i) / E_t,          E_t = sum_{j<=t} exp(s_j)
    l_{t,i} = s_i / t - P_t / t^2      P_t = sum_{j<=t} s_j            (first-order residual)
    h_{t,i} = p_{t,i} - 1/t - l_{t,i}                                  (higher-order residual)
    r_{t,i} = g1_t l_{t,i} + gh_t h_{t,i} (+ g0_t / t on the first layer)
    o_t     = sum_{i<=t} r_{t,i} (q_t . k_i) v_i

Forms:
- ``reference``: forms r and q.k as (T, T) matrices. The specification; slow.
- ``chunked``: training and prefill. Inside a chunk of C tokens the (C, C) weights are explicit;
  across chunks a state of three (d_k, d_v) matrices is carried (see ``ZeroSState``).
- ``fused``: the chunked form with the chunk work in Triton kernels (``ops_fused.py``, imported on
  first use); float32 / float16 / bfloat16 only. ``auto``: "fused" for CUDA tensors when Triton is
  there and the dtype is supported, else "chunked".
- ``recurrent``: generation, one token at a time through the same state.

Chunked and fused share everything but the chunk core: the per-token scalars below are prepared
once in PyTorch (cumulative ops, autograd through them), the tokens are laid out chunk by chunk
(``_ChunkLayout``), and the core (``chunk_core_torch`` or ``ops_fused.fused_chunk_core``, one
contract: ``ops_contract.py``) does the (C, C) blocks and the state recurrence. ``cu_seqlens`` packs several sequences
into one row (flash-linear-attention's convention), ``sequence_starts`` several into each row; every
form restarts at each sequence. Where a state per sequence goes in or out (and in the fused kernels)
each sequence gets chunks of its own; otherwise (training) sequences share chunks and the PyTorch
core keeps them apart inside the chunk.

Precision on GPU: the PyTorch core multiplies q.k and (weights) V in 16 bits on CUDA when the inputs
are float16/bfloat16 (or autocast asks for them), with the weights formed in float32; the state
readout and every sum stay float32 (the readout's three terms cancel). CPU and float64 are exact.

Chunked and recurrent rewrite r_{t,i} as per-query times per-key scalars (sbar_t = P_t / t):

    r_{t,i} = a_t exp(s_i - m_t) + b_t (s_i - sbar_t) + c_t
    a_t = gh_t / E~_t,  b_t = (g1_t - gh_t) / t,  c_t = (g0_t - gh_t) / t   (g0 = 0 off layer 0)

where m_t = max_{j<=t} s_j is a running maximum and E~_t = E_t exp(-m_t). The state keeps

    F = sum_i exp(s_i - m) k_i v_i^T    G = sum_i (s_i - sbar) k_i v_i^T    H = sum_i k_i v_i^T

G is centred on the running mean, so a large mean logit never makes b G + c H a difference of two
large sums. Every transition of the state is linear: moving the reference point from (m, sbar) to
(m', sbar') maps (F, G, H) -> (exp(m - m') F, G + (sbar - sbar') H, H), and new tokens add
sum_i k_i [exp(s_i - m') v_i, (s_i - sbar') v_i, v_i]. All accumulation is in float32 (float64 for
float64 inputs), whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from .ops_contract import NO_MAX, ChunkScalars, CoreLayout, call_flat, check_chunk_size, flat_entry, kernel_chunk_size

__all__ = ["zeros_attention", "ZeroSState", "ChunkLayouts", "MODES", "linear_attention_chunked",
           "linear_attention_packed"]

MODES = ("chunked", "recurrent", "reference", "fused", "auto")

_NO_MAX = NO_MAX  # (ops_contract.py: the running maximum before any real token)
# E~_t = sum_{j<=t} exp(s_j - m_t) >= 1 for a real token (the maximum's own term is exp(0) = 1). Flooring
# it there changes nothing for real tokens and keeps padding before the first real token finite.
_E_FLOOR = 1.0


@dataclass
class ZeroSState:
    """Everything needed to continue a ZeroS sequence; O(H d^2) numbers per row, whatever T is.

    Fields (B = batch, H = heads, d_k / d_v = key / value head dims):
        kv:   (B, H, 3, d_k, d_v)  the F, G, H matrices stacked (F scaled by exp(-m), G centred)
        E:    (B, H)  sum_i exp(s_i - m), the softmax denominator scaled by exp(-m)
        m:    (B, H)  running maximum of the logits (``_NO_MAX`` before the first real token)
        sbar: (B, H)  running mean of the logits, P / n
        n:    (B, H)  number of real tokens seen (padding does not count)

    All tensors are float32 (float64 when the op ran in float64).
    """

    kv: torch.Tensor
    E: torch.Tensor
    m: torch.Tensor
    sbar: torch.Tensor
    n: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, d_k: int, d_v: int, *,
              dtype: torch.dtype = torch.float32, device=None, read_only: bool = False) -> "ZeroSState":
        """The state before any token: zero sums, no maximum yet. read_only: the sums as a broadcast view of
        one zero (no memory written; for a caller that only reads them)."""
        scalars = lambda value: torch.full((batch_size, num_heads), value, dtype=dtype, device=device)  # noqa: E731
        shape = (batch_size, num_heads, 3, d_k, d_v)
        kv = torch.zeros((), dtype=dtype, device=device).expand(shape) if read_only else \
            torch.zeros(shape, dtype=dtype, device=device)
        return cls(kv=kv, E=scalars(0.0), m=scalars(_NO_MAX), sbar=scalars(0.0), n=scalars(0.0))

    def _map(self, fn) -> "ZeroSState":
        return ZeroSState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> "ZeroSState":
        """Like ``Tensor.to``; floating dtypes other than float32/float64 are refused (states stay float32)."""
        out = self._map(lambda x: x.to(*args, **kwargs))
        if out.kv.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ZeroSState must stay float32 or float64, not {out.kv.dtype}")
        return out

    def detach(self) -> "ZeroSState":
        return self._map(torch.Tensor.detach)

    def clone(self) -> "ZeroSState":
        return self._map(torch.Tensor.clone)

    def index_select(self, index: torch.Tensor) -> "ZeroSState":
        """Rows ``index`` of the batch, in that order (beam search reordering, selection)."""
        return self._map(lambda x: x.index_select(0, index.to(x.device)))

    def __getitem__(self, index) -> "ZeroSState":
        """Index the batch dimension (an int keeps the dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda x: x[index])

    def repeat_interleave(self, repeats: int) -> "ZeroSState":
        """Each row repeated ``repeats`` times in place (num_return_sequences, beam expansion)."""
        return self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(states: list["ZeroSState"]) -> "ZeroSState":
        """Concatenate states along the batch."""
        return ZeroSState(**{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields(ZeroSState)})

    @property
    def batch_size(self) -> int:
        return self.kv.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

SCAN_BLOCK = 64  # tokens per block of cumsum_tokens' two-level scan


def cumsum_tokens(x: torch.Tensor, blocked: Optional[bool] = None) -> torch.Tensor:
    """Inclusive running sum over the tokens (dim 1) of x (B, T, ...), in x's dtype.

    On CUDA as a two-level scan (within blocks of SCAN_BLOCK tokens, then the blocks' totals): torch's
    scan along a middle dimension runs one thread per (B, feature) column over all T tokens, which on
    an H200 took 0.74 ms for the (8, 2048, 12, 64) running sum of u, a tenth of a layer's time.
    ``blocked`` forces the choice (tests); the two agree up to float rounding.
    """
    T = x.shape[1]
    if not (x.is_cuda if blocked is None else blocked) or T <= SCAN_BLOCK:
        return x.cumsum(1)
    N = -(-T // SCAN_BLOCK)
    padded = _pad_tokens(x, N * SCAN_BLOCK - T)
    within = padded.view(x.shape[0], N, SCAN_BLOCK, *x.shape[2:]).cumsum(2)     # (B, N, SCAN_BLOCK, ...)
    totals = within[:, :, -1]                                                   # (B, N, ...)
    before = totals.cumsum(1) - totals                                          # the blocks before each block
    return (within + before.unsqueeze(2)).flatten(1, 2)[:, :T]


def _pad_tokens(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """x (B, T, ...) with ``pad`` more tokens of ``value`` at the end; x itself (no copy) when pad is 0."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value) if pad else x


def named_range(name: str):
    """A named range in the profiler's trace (``benchmarks/profile_step.py`` reads them), or nothing when no
    profiler runs: entering a ``record_function`` costs about 6 us, paid per layer and token when decoding."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():  # (the check does not trace)
        return record_function(name)
    return contextlib.nullcontext()


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``; x itself, without dispatching a cast (about 1 us), when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coefficients(g1, gh, g0, n=None, *, inv_n=None):
    """b_t = (g1 - gh) / t and c_t = (g0 - gh) / t, all (B, H, T); t is clamped to 1 on padding. Give the
    counts n, or their reciprocals inv_n when the caller has them."""
    if inv_n is None:
        inv_n = n.clamp(min=1.0).reciprocal()
    b = (g1 - gh) * inv_n
    c = (g0 - gh) * inv_n if g0 is not None else -gh * inv_n
    return b, c


def _augment(x: torch.Tensor, c0, c1, c2) -> torch.Tensor:
    """(..., d) -> (..., 3 d): [c0 x, c1 x, c2 x] with per-row scalars c (...,); c2 = None means 1.

    As a key, it writes into the F, G, H slots of the state; as a query, it reads them.
    """
    third = x if c2 is None else c2.unsqueeze(-1) * x
    return torch.cat([c0.unsqueeze(-1) * x, c1.unsqueeze(-1) * x, third], dim=-1)


def _move_reference(kv, decay, shift):
    """Re-express the sums kv (..., 3, d_k, d_v) at a new reference point (m', sbar').

    decay = exp(m - m') <= 1 (the maximum only grows) and shift = sbar - sbar', both (...).
    (E, the denominator, scales by the same decay.)
    """
    F_, G_, H_ = kv.unbind(-3)
    return torch.stack([decay[..., None, None] * F_, G_ + shift[..., None, None] * H_, H_], dim=-3)


def _readout(q, kv, a_decay, b, h_coef):
    """Query the state: q (..., L, d_k), kv (..., 3, d_k, d_v), coefficients (..., L) -> (..., L, d_v)."""
    d_k, d_v = kv.shape[-2:]
    return _augment(q, a_decay, b, h_coef) @ kv.reshape(*kv.shape[:-3], 3 * d_k, d_v)


def _segment_lengths(cu_seqlens, B: int, T: int) -> list:
    """Validate ``cu_seqlens`` (fla's convention) and return the segment lengths, as the one row's list."""
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype == torch.bool
            or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex):
        got = f"{cu_seqlens.dtype} tensor of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
            else type(cu_seqlens).__name__
        raise ValueError("zeros_attention: cu_seqlens must be a 1-D integer tensor [0, l1, l1+l2, ..., T] "
                         f"(the offsets of the packed sequences), got a {got}")
    if B != 1:
        raise ValueError(f"zeros_attention: with cu_seqlens the sequences are packed into one row, so B must be 1, "
                         f"got B = {B}; flatten (B, T) to (1, B T) and put the row starts into cu_seqlens")
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
        shown = offsets if len(offsets) <= 12 else offsets[:6] + ["..."] + offsets[-6:]
        raise ValueError(f"zeros_attention: cu_seqlens must start at 0, never decrease and end at T = {T} "
                         f"(at least two entries), got {shown}")
    return [[b - a for a, b in zip(offsets, offsets[1:])]]


def _row_lengths_from_starts(sequence_starts, B: int, T: int) -> list:
    """Per row, the lengths of the sequences that ``sequence_starts`` (B, T) bool begins (or the lengths
    themselves, checked)."""
    if isinstance(sequence_starts, (list, tuple)):
        rows = [list(row) for row in sequence_starts] if all(isinstance(r, (list, tuple)) for r in sequence_starts) \
            else None
        if rows is None or len(rows) != B or any(not row or sum(row) != T or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in row) for row in rows):
            shown = sequence_starts if len(str(sequence_starts)) <= 200 else str(sequence_starts)[:200] + "..."
            raise ValueError(f"zeros_attention: sequence_starts as lengths must be B = {B} lists of positive ints, "
                             f"each summing to T = {T}, got {shown}")
        return rows
    if not isinstance(sequence_starts, torch.Tensor) or sequence_starts.shape != (B, T) \
            or sequence_starts.dtype != torch.bool:
        got = f"{sequence_starts.dtype} tensor of shape {tuple(sequence_starts.shape)}" \
            if isinstance(sequence_starts, torch.Tensor) else type(sequence_starts).__name__
        raise ValueError(f"zeros_attention: sequence_starts must be a (B, T) = {(B, T)} bool tensor, got a {got}")
    starts = sequence_starts.clone()
    starts[:, 0] = True
    rows, columns = starts.nonzero().cpu().T.tolist()
    bounds = [[] for _ in range(B)]
    for r, c in zip(rows, columns):
        bounds[r].append(c)
    return [[b - a for a, b in zip(row, row[1:] + [T])] for row in bounds]


def _check_inputs(q, k, v, s, g1, gh, g0, valid, initial_state, mode, chunk_size, num_sequences):
    if mode not in MODES:
        raise ValueError(f"zeros_attention: unknown mode {mode!r}; use one of {MODES}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "zeros_attention: q and k must be (B, T, H, d) of one shape and v (B, T, H, d_v); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, x in (("s", s), ("g1", g1), ("gh", gh), ("g0", g0)):
        if x is not None and x.shape != q.shape[:3]:
            raise ValueError(f"zeros_attention: {name} must be (B, T, H) = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
    if valid is not None and valid.shape != q.shape[:2]:
        raise ValueError(f"zeros_attention: valid must be (B, T) = {tuple(q.shape[:2])}, got {tuple(valid.shape)}")
    check_chunk_size(chunk_size, "zeros_attention: chunk_size")
    if initial_state is not None:
        H, d_k = q.shape[2:]
        expected = (num_sequences, H, 3, d_k, v.shape[-1])
        if tuple(initial_state.kv.shape) != expected:
            raise ValueError(f"zeros_attention: initial_state.kv has shape {tuple(initial_state.kv.shape)}, "
                             f"expected {expected} for these inputs (one row per sequence: per row of the "
                             "batch, or per segment of cu_seqlens)")


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------

def zeros_attention(q, k, v, s, g1, gh, g0=None, *, mode: str = "chunked", chunk_size: int = 64,
                    valid: Optional[torch.Tensor] = None, initial_state: Optional[ZeroSState] = None,
                    output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                    sequence_starts: Optional[torch.Tensor | list] = None,
                    chunk_layouts: Optional["ChunkLayouts"] = None, in_place: bool = False):
    """Causal ZeroS attention.

    Args:
        q, k: (B, T, H, d_k), used as given (the layer L2-normalises them first). v: (B, T, H, d_v).
        s: (B, T, H) radial logits. g1, gh: (B, T, H) gates in (0, 1).
        g0: (B, T, H) zero-order gate in (-1, 1) on the first layer, else None.
        mode: "chunked" (training, prefill), "recurrent" (token by token), "reference" (T x T),
            "fused" (the chunked form in Triton kernels; not float64) or "auto" ("fused" for CUDA
            tensors when Triton is installed, else "chunked").
        chunk_size: tokens per chunk in chunked mode, a positive integer (at most the longest sequence
            is used). The fused kernels tile powers of two >= 16: they run the smallest such chunk that
            holds min(chunk_size, longest sequence), and warn when chunk_size itself is no such tile
            (``ops_contract.kernel_chunk_size``).
        valid: (B, T) bool, False marks padding: it is not read, does not enter the state, does
            not advance t, and its output is exactly 0.
        initial_state: the ``ZeroSState`` after the preceding tokens (not in reference mode), one row
            per sequence.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: (S + 1,) int, packed sequences (flash-linear-attention's convention, B = 1): the
            offsets [0, l_1, l_1 + l_2, ..., T] of S segments that share nothing. Each starts from an
            empty state (or from row i of ``initial_state``, which then has S rows), and the final
            state has one row per segment: the outputs equal S separate calls. May be combined with
            ``valid``.
        sequence_starts: (B, T) bool, the same per row: True where a new sequence begins (column 0
            always begins one). Sequences are numbered row by row, in order, for ``initial_state`` and
            the final state. Unlike ``cu_seqlens`` the rows stay parallel rows of the chunked form.
            Or, when the caller knows them on the host, per row the lengths of its sequences (B lists
            of positive ints, each summing to T): the same, without reading the tensor back from the
            device at every call (a model passes its layers the lengths it found once).
        chunk_layouts: a ``ChunkLayouts`` in which the chunked forms keep the chunk layouts they build (the
            chunk tables, the map of real positions), so that calls on one batch (the layers of one forward
            pass: same B, T, valid tensor, sequences) build each only once. The model passes one per forward
            pass (``MixerContext.chunk_layouts``); None builds the layout for this call alone.
        in_place: recurrent mode without autograd may write the final state into ``initial_state``'s
            (B, H, 3, d_k, d_v) sums instead of a new tensor: one pass less over the state per token (a
            decoded token's step is bound by those passes at serving batch sizes). Only for a caller that
            gives ``initial_state`` up (a cache that nothing else reads: ``ZeroSCache.in_place_updates``);
            the other modes ignore it.

    Returns:
        o: (B, T, H, d_v) in q's dtype; state: a ``ZeroSState`` (one row per sequence) or None.
    """
    B, T = q.shape[:2]
    if cu_seqlens is not None and sequence_starts is not None:
        raise ValueError("zeros_attention: give cu_seqlens or sequence_starts, not both")
    lengths = _segment_lengths(cu_seqlens, B, T) if cu_seqlens is not None else \
        _row_lengths_from_starts(sequence_starts, B, T) if sequence_starts is not None else None
    _check_inputs(q, k, v, s, g1, gh, g0, valid, initial_state, mode, chunk_size,
                  B if lengths is None else sum(len(row) for row in lengths))
    if mode == "auto":
        mode = "fused" if fused_applies(q, v) else "chunked"
    # Under autocast the products below would run in bfloat16/float16: the op accumulates in float32
    # itself, and only the chunk core's q.k and (weights) V products take autocast's 16-bit dtype (CUDA).
    low = _autocast_product_dtype(q)
    autocast_off = torch.autocast(device_type=q.device.type, enabled=False) \
        if torch.is_autocast_enabled(q.device.type) else contextlib.nullcontext()
    with autocast_off:
        return _dispatch(q, k, v, s, g1, gh, g0, mode, chunk_size, valid, initial_state, output_final_state, lengths,
                         low, chunk_layouts, in_place)


def _load_fused_core():
    """The fused chunk core (``ops_fused.py``, Triton kernels) and its limits, imported on first
    use so that CPU installs need no Triton; None when it or Triton is missing. (A ``from .ops_fused``
    import, so that ``save_pretrained`` copies the kernels next to ops.py for trust_remote_code.)"""
    try:
        from .ops_fused import HAS_TRITON, MAX_HEAD_DIM, zeros_chunk_fused
    except ImportError:
        return None
    if not HAS_TRITON:
        return None
    return SimpleNamespace(zeros_chunk_fused=zeros_chunk_fused, MAX_HEAD_DIM=MAX_HEAD_DIM)


def fused_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """mode="auto": the fused kernels for CUDA tensors of a supported dtype and head size, when Triton is there."""
    if q.device.type != "cuda" or q.dtype not in _FUSED_DTYPES:
        return False
    fused = _load_fused_core()
    return fused is not None and max(q.shape[-1], v.shape[-1]) <= fused.MAX_HEAD_DIM


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_product_dtype(q: torch.Tensor) -> Optional[torch.dtype]:
    """The 16-bit dtype that autocast asks for on CUDA, else None."""
    if q.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if dtype in _TENSOR_CORE_DTYPES else None


def _chunked_core(mode: str, dtype: torch.dtype):
    """(core, fused) for mode "chunked" / "fused" (fused: see _load_fused_core, None for chunked); clear
    errors when the fused kernels cannot run."""
    if mode == "chunked":
        return _chunk_core_torch, None
    if dtype not in _FUSED_DTYPES:
        raise ValueError(f"zeros_attention: mode='fused' takes float32, float16 or bfloat16 inputs, got {dtype} "
                         "(Triton computes float64 wrong without an error); use mode='chunked' or 'reference'")
    fused = _load_fused_core()
    if fused is None:
        raise RuntimeError("zeros_attention: mode='fused' needs Triton (pip install triton; Linux) and ops_fused.py "
                           "next to ops.py; use mode='chunked' (or 'auto', which falls back to it) without them")
    return fused.zeros_chunk_fused, fused


def _dispatch(q, k, v, s, g1, gh, g0, mode, chunk_size, valid, initial_state, output_final_state, lengths,
              low=None, chunk_layouts=None, in_place=False):
    """lengths: None (one sequence per row) or, per row, the lengths of its sequences."""
    B, T, H, d_k = q.shape
    acc = accumulation_dtype(q.dtype)
    flat_lengths = None if lengths is None else [n for row in lengths for n in row]
    num_sequences = B if lengths is None else len(flat_lengths)
    if mode == "reference":
        if initial_state is not None:
            raise ValueError("zeros_attention: mode='reference' does not take initial_state; "
                             "use mode='chunked' or 'recurrent' to continue a sequence")
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid.to(q.device, torch.bool)
        if lengths is None:  # every row is its own sequence
            segments = torch.arange(B, device=q.device)[:, None].expand(B, T)
        else:
            segments = torch.arange(num_sequences, device=q.device).repeat_interleave(
                torch.tensor(flat_lengths, device=q.device)).view(B, T)
        o = _reference(q, k, v, s, g1, gh, g0, valid, segments, acc)
        state = _reference_final_state(k, v, s, valid, segments, num_sequences, acc) if output_final_state else None
        return o.to(q.dtype), state

    state = initial_state
    if state is None and mode != "fused":  # (the kernels start empty sequences from zero states themselves)
        # the chunked form never writes the incoming sums (its core skips zero start states): no memory for them
        state = ZeroSState.empty(num_sequences, H, d_k, v.shape[-1], dtype=acc, device=q.device,
                                 read_only=mode == "chunked")
    if state is not None and (state.kv.dtype != acc or state.kv.device != q.device):
        state = state.to(device=q.device, dtype=acc)
    if valid is not None:  # padding gets zero queries, keys, values and logits: it adds nothing, whatever it held
        valid = valid.to(device=q.device, dtype=torch.bool)
        q, k, v = (x.masked_fill(~valid[:, :, None, None], 0.0) for x in (q, k, v))
        s = s.masked_fill(~valid[:, :, None], 0.0)
    if mode in ("chunked", "fused"):
        core, fused = _chunked_core(mode, q.dtype)
        # Packed sequences share chunks (no alignment padding) where nothing needs a state per sequence.
        shared = lengths is not None and initial_state is None and not output_final_state
        if fused is not None:  # the kernels take one 16-bit or float32 dtype and a chunk they can tile
            longest = T if lengths is None or shared else max(max(flat_lengths), 1)
            chunk_size = kernel_chunk_size(chunk_size, longest)
            low = low or q.dtype
        if low is not None:
            q, k, v = (x.to(low) for x in (q, k, v))
        # The fused kernels write o in the inputs' 16-bit dtype (no float32 copy to cast afterwards).
        out_dtype = q.dtype if fused is not None and q.dtype != acc else None
        if fused is not None:
            o, state = _chunked_fused(core, q, k, v, s, g1, gh, g0, valid, state, chunk_size, lengths, shared,
                                      out_dtype, output_final_state, chunk_layouts)
        else:
            o, state = _chunked(q, k, v, s, g1, gh, g0, valid, state, chunk_size, lengths, core, shared=shared,
                                zero_start=initial_state is None,
                                chunk_layouts=chunk_layouts)
    elif lengths is None:
        # (a state that had to move to the accumulation dtype or device is a copy already)
        o, state = _recurrent(q, k, v, s, g1, gh, g0, valid, state, in_place=in_place and state is initial_state)
    else:  # one sequence after the other, each from its own state
        pieces, i = [], 0
        for r, row in enumerate(lengths):
            for lo, hi in zip([0] + list(itertools.accumulate(row))[:-1], itertools.accumulate(row)):
                pieces.append((r, _recurrent(*(x[r:r + 1, lo:hi] if x is not None else None
                                               for x in (q, k, v, s, g1, gh, g0, valid)), state[i])))
                i += 1
        o = torch.stack([torch.cat([o_i for r_i, (o_i, _) in pieces if r_i == r], dim=1)[0] for r in range(B)])
        state = ZeroSState.cat([st for _, (_, st) in pieces])
    if valid is not None:
        o = o.masked_fill(~valid[:, :, None, None], 0.0)
    return as_dtype(o, q.dtype), (state if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Reference: the specification, literally
# ----------------------------------------------------------------------------------------------

def _reference(q, k, v, s, g1, gh, g0, valid, segments, acc):
    """docs/method.md section 2 with explicit (T, T) weights; a query sees the real keys of its own
    sequence (segments (B, T) long) up to itself. Returns (B, T, H, d_v)."""
    q, k, v = (x.to(acc).transpose(1, 2) for x in (q, k, v))            # (B, H, T, d)
    s, g1, gh = (x.to(acc).transpose(1, 2) for x in (s, g1, gh))        # (B, H, T)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    same = segments[:, :, None] == segments[:, None, :]                 # (B, T_query, T_key)
    keep = (causal & same & valid[:, None, :]).unsqueeze(1)             # (B, 1, T_query, T_key)
    t = keep.to(acc).sum(-1).clamp(min=1.0)                             # real tokens up to the query: (B, 1, T)
    s = s * valid[:, None, :].to(acc)
    P = (keep * s[..., None, :]).sum(-1)                                # (B, H, T)
    p = torch.softmax(s[..., None, :].masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    l = s[..., None, :] / t[..., None] - (P / t**2)[..., None]          # (B, H, T, T)
    h = p - 1.0 / t[..., None] - l
    r = g1[..., None] * l + gh[..., None] * h
    if g0 is not None:
        r = r + (g0.to(acc).transpose(1, 2) / t)[..., None]
    r = r * keep
    o = (r * (q @ k.transpose(-1, -2))) @ v
    o = o * valid[:, None, :, None]
    return o.transpose(1, 2)


def _reference_final_state(k, v, s, valid, segments, num_sequences, acc):
    """The state after each sequence, from its definition (sums over all its real tokens)."""
    k, v = (x.to(acc).transpose(1, 2) for x in (k, v))                  # (B, H, T, d)
    s = s.to(acc).transpose(1, 2)                                       # (B, H, T)
    ids = torch.arange(num_sequences, device=s.device)[:, None, None, None]
    member = (segments[None, :, None, :] == ids) & valid[None, :, None, :]  # (S, B, 1, T)
    w = member.to(acc).expand(-1, -1, s.shape[1], -1)                   # (S, B, H, T)
    n = w.sum((1, 3))                                                   # (S, H)
    m = torch.where(member, s.detach(), torch.full_like(s, _NO_MAX)).amax((1, 3))
    sbar = (w * s).sum((1, 3)) / n.clamp(min=1.0)
    e = w * torch.exp((s - m[:, None, :, None]).clamp(max=0.0))
    kv = torch.stack([torch.einsum("sbht,bhtk,bhtv->shkv", coef, k, v)
                      for coef in (e, w * (s - sbar[:, None, :, None]), w)], dim=2)
    return ZeroSState(kv=kv, E=e.sum((1, 3)), m=m, sbar=sbar, n=n)


# ----------------------------------------------------------------------------------------------
# Chunked: the chunk-aligned layout, the per-token scalars, and the chunk core
# ----------------------------------------------------------------------------------------------

# The chunk tables' integer type: what the kernels read (no conversion per call).
_TABLE_DTYPE = torch.int32


@dataclass
class _ChunkLayout:
    """Where the tokens sit in the chunk-aligned layout (B', N C) that the chunk core works on.

    Without segments the sequences are the B rows, each padded at its end to whole chunks of C tokens.
    With segments (per row, the lengths of the sequences packed into it, from ``cu_seqlens`` or
    ``sequence_starts``) there are two layouts; the rows stay parallel rows (B' = B) in both:

    - aligned (the default): every sequence is padded at its end to whole chunks (at least one), so no
      chunk holds tokens of two sequences, and a row's sequences follow each other in that row (rows
      filled up with padding chunks to the longest). Each sequence's state is loaded at its first
      chunk and stored after its last: any ``initial_state`` and a final state per sequence.
    - shared: the row as it is (padding only at its end), so one chunk may hold the end of one sequence
      and the start of the next; the core then keeps them apart inside the chunk (``segments``) and
      starts each sequence from an empty state. No alignment padding (a document of 200 tokens costs
      200 tokens, not 256 at C = 64), but no initial state and no per-sequence final state: the
      training path. Both cores (PyTorch and fused) take both layouts.

    Padding is not valid: it has zero q, k, v, logit and coefficients and carries the running
    statistics forward.

    rows, num_chunks: B', N. num_sequences: S, the rows of the states (row by row).
    core: the chunk core's view (``ops_contract.CoreLayout``: chunk size C, the state each chunk
    loads / stores as (B', N) tensors and as host lists, the sequence of each position when shared),
    built here once; ``chunk_size`` and ``chunk_load`` read it.
    valid: (B', N, C) bool, real tokens.
    last: (S,) long, the flat position (row * N C + t) of each sequence's last aligned position.
    shared: which layout.
    Segments only (else None): dest (B T,) long, the flat aligned position of each token (None in the
    shared layout: the row as it is); segment (B', N, C) long, the sequence of each position (padding:
    the sequence it follows); first (B', N C) long, the position in its row where that sequence's first
    token sits; reach: 1 + the largest distance of a position from its sequence's first, a host int.
    """

    rows: int
    num_chunks: int
    num_sequences: int
    tokens: int
    valid: torch.Tensor
    core: CoreLayout
    last: torch.Tensor
    shared: bool = False
    dest: Optional[torch.Tensor] = None
    segment: Optional[torch.Tensor] = None
    first: Optional[torch.Tensor] = None
    reach: int = 0

    @classmethod
    def build(cls, B: int, T: int, valid: Optional[torch.Tensor], row_lengths: Optional[list], C: int,
              device, shared: bool = False) -> "_ChunkLayout":
        """row_lengths: None (each row one sequence) or, per row, the lengths of its sequences (sum T);
        shared: chunks may hold several sequences (see the class)."""
        if row_lengths is None or shared:
            N = -(-T // C)
            valid = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid
            valid = _pad_tokens(valid, N * C - T, value=False).view(B, N, C)
        if row_lengths is None:
            rows = torch.arange(B, device=device)
            chunk_load = torch.full((B, N), -1, dtype=_TABLE_DTYPE, device=device)
            chunk_store = torch.full((B, N), -1, dtype=_TABLE_DTYPE, device=device)
            chunk_load[:, 0] = rows
            chunk_store[:, -1] = rows
            plan = ([[r] + [-1] * (N - 1) for r in range(B)], [[-1] * (N - 1) + [r] for r in range(B)])
            return cls(rows=B, num_chunks=N, num_sequences=B, tokens=T, valid=valid,
                       core=CoreLayout(chunk_load, chunk_store, B, C, plan), last=rows * (N * C) + N * C - 1)
        # Host-side index arithmetic over the S sequences (listed row by row), then one copy to the device.
        lengths = torch.tensor([n for row in row_lengths for n in row], dtype=torch.long)            # (S,)
        per_row = torch.tensor([len(r) for r in row_lengths])                                        # (B,)
        row = torch.repeat_interleave(torch.arange(B), per_row)                                      # (S,)
        S = len(lengths)
        sequences = torch.arange(S)
        row_last = per_row.cumsum(0) - 1                                            # (B,) each row's last sequence
        # Tokens are row-major, so the sequences' tokens follow each other in the order listed.
        token_seq = sequences.repeat_interleave(lengths)                            # (B T,)
        starts = lengths.cumsum(0) - lengths                                        # flat start of each sequence
        if shared:
            L = N * C
            start_in_row = starts - row * T                                         # (S,)
            segment = torch.cat([token_seq.view(B, T), row_last[:, None].expand(B, L - T)], dim=1)   # (B, L)
            first = start_in_row[segment]
            chunk_load = torch.full((B, N), -1, dtype=torch.long)
            begins = (start_in_row % C == 0) & (start_in_row < L) & (lengths > 0)   # sequences opening a chunk
            chunk_load[row[begins], start_in_row[begins] // C] = sequences[begins]
            chunk_load[:, 0] = segment[:, 0]
            chunk_store = torch.full((B, N), -1, dtype=torch.long)                  # no per-sequence final states
            last = row * L + (start_in_row + lengths - 1).clamp(min=0, max=L - 1)
            dest = None
        else:
            chunks = torch.clamp(-(-lengths // C), min=1)                           # (S,) chunks per sequence
            row_chunks = torch.zeros(B, dtype=torch.long).index_add_(0, row, chunks)   # (B,)
            N = int(row_chunks.max())
            L = N * C
            # First chunk of each sequence in its row: chunks of the sequences before it, less the earlier rows'.
            first_chunk = chunks.cumsum(0) - chunks - (row_chunks.cumsum(0) - row_chunks)[row]
            dest = (row * N + first_chunk)[token_seq] * C + torch.arange(B * T) - starts[token_seq]
            # Chunks: each sequence's own, then a row's padding chunks continue its last sequence.
            chunk_segment = row_last.repeat_interleave(N)                          # (B N,)
            chunk_seq = sequences.repeat_interleave(chunks)
            within = torch.arange(len(chunk_seq)) - (chunks.cumsum(0) - chunks)[chunk_seq]
            chunk_segment[(row * N + first_chunk)[chunk_seq] + within] = chunk_seq
            segment = chunk_segment.view(B, N, 1).expand(B, N, C).reshape(B, L)
            first = (first_chunk * C)[segment]
            chunk_load = torch.full((B * N,), -1, dtype=torch.long)
            chunk_store = torch.full((B * N,), -1, dtype=torch.long)
            chunk_load[row * N + first_chunk] = sequences
            chunk_store[row * N + first_chunk + chunks - 1] = sequences
            chunk_load, chunk_store = chunk_load.view(B, N), chunk_store.view(B, N)
            last = (row * N + first_chunk + chunks) * C - 1
            valid_flat = torch.zeros(B * L, dtype=torch.bool, device=device)
            valid_flat[dest.to(device)] = True if valid is None else valid.flatten()
            valid = valid_flat.view(B, N, C)
        reach = int((torch.arange(L) - first).max()) + 1
        to = lambda x: None if x is None else x.to(device)  # noqa: E731
        segment = to(segment.view(B, N, C))
        tables = (chunk_load.to(device, _TABLE_DTYPE), chunk_store.to(device, _TABLE_DTYPE))
        core = CoreLayout(*tables, S, C, (chunk_load.tolist(), chunk_store.tolist()),
                          segment.flatten(1) if shared else None)
        return cls(rows=B, num_chunks=N, num_sequences=S, tokens=T, valid=valid, core=core, last=to(last),
                   shared=shared, dest=to(dest), segment=segment, first=to(first), reach=reach)

    @property
    def chunk_size(self) -> int:
        return self.core.chunk_size

    @property
    def chunk_load(self) -> torch.Tensor:
        return self.core.chunk_load

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (B', N C, ...), zeros on alignment padding."""
        if self.dest is None:
            return _pad_tokens(x, self.num_chunks * self.chunk_size - self.tokens)
        aligned = x.new_zeros((self.rows * self.num_chunks * self.chunk_size,) + tuple(x.shape[2:]))
        return aligned.index_copy(0, self.dest, x.flatten(0, 1)).view(self.rows, -1, *x.shape[2:])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B', N C, ...) -> (B, T, ...)."""
        if self.dest is None:
            return x[:, :self.tokens]
        return x.flatten(0, 1).index_select(0, self.dest).view(-1, self.tokens, *x.shape[2:])

    def per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """A per-sequence value (S, H) as a (B', H, N, C)-broadcastable tensor."""
        if self.segment is None:
            return x[:, :, None, None]
        return x[self.segment].permute(0, 3, 1, 2)

    def at_chunk_starts(self, ends: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
        """The value at each chunk's start (B', H, N): the previous chunk's end value ``ends`` (B', H, N),
        or where a chunk opens a sequence the incoming state's value ``loaded`` (S, H)."""
        before = F.pad(ends[..., :-1], (1, 0))
        loaded = loaded[self.chunk_load.clamp(min=0)].transpose(1, 2)               # (B', H, N)
        return torch.where((self.chunk_load >= 0).unsqueeze(1), loaded, before)

    def at_ends(self, x: torch.Tensor) -> torch.Tensor:
        """(B', H, N, C) -> (S, H): the value at each sequence's last aligned position."""
        return x.flatten(2).transpose(1, 2).flatten(0, 1)[self.last]

    def running(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """Inclusive running sum / max / log-sum-exp of x (B', H or 1, N, C) over each sequence.

        Over the whole row when it is one sequence: a scan inside each chunk, then over the chunks'
        totals (``_chunk_scan``), so a rounding error grows with C + N, not with T (float32 suffices for
        the centred inputs the callers give). Else the sum is a difference of such prefix sums and max /
        log-sum-exp a log-step (Hillis-Steele) scan that stops at each sequence's first position.
        """
        flat = x.flatten(2)                                                         # (B', H, L)
        if self.first is None:
            out = _chunk_scan(x, op)
        elif op == "sum":
            total = _chunk_scan(x, "sum").flatten(2)
            before = F.pad(total, (1, 0))[..., :-1]                                 # sums before each position
            out = total - before.gather(-1, self.first.unsqueeze(1).expand_as(flat))
        else:
            combine = torch.maximum if op == "max" else torch.logaddexp
            back = (torch.arange(flat.shape[-1], device=x.device) - self.first).unsqueeze(1)  # (B', 1, L)
            out, shift = flat, 1
            while shift < self.reach:
                earlier = F.pad(out[..., :-shift], (shift, 0), value=_NO_MAX)
                out = torch.where(back >= shift, combine(out, earlier), out)
                shift *= 2
        return out.view(x.shape)


_SCANS = {"sum": (lambda x: x.cumsum(-1), torch.add, 0.0),
          "max": (lambda x: x.cummax(-1).values, torch.maximum, _NO_MAX),
          "lse": (lambda x: x.logcumsumexp(-1), torch.logaddexp, _NO_MAX)}


def _chunk_scan(x: torch.Tensor, op: str) -> torch.Tensor:
    """Inclusive running sum / max / log-sum-exp of x (..., N, C) along the row (N C): inside each chunk,
    then the chunks' totals (exclusive), combined. Returns (..., N, C)."""
    within_chunk, combine, empty = _SCANS[op]
    within = within_chunk(x)                                                        # (..., N, C)
    if x.shape[-2] == 1:
        return within
    totals = within_chunk(within[..., -1])                                          # (..., N) through each chunk
    before = F.pad(totals[..., :-1], (1, 0), value=empty)                           # before each chunk
    return combine(within, before.unsqueeze(-1))


def _first_real_logits(s: torch.Tensor, layout: "_ChunkLayout") -> torch.Tensor:
    """The logit of each sequence's first real token, (S, H) (0 for a sequence without one); s (B', H, N, C)."""
    rows, H = s.shape[:2]
    flat = s.flatten(2)                                                             # (B', H, L)
    valid = layout.valid.flatten(1)                                                 # (B', L)
    if layout.segment is None:  # one sequence per row
        first = valid.to(torch.uint8).argmax(-1)                                    # (B',)
        c = flat.gather(-1, first.view(rows, 1, 1).expand(rows, H, 1)).squeeze(-1)
        return torch.where(valid.any(-1, keepdim=True), c, 0.0)
    L = flat.shape[-1]
    position = torch.arange(rows * L, device=s.device).view(rows, L)               # flat (row, position)
    none = rows * L
    first = torch.full((layout.num_sequences,), none, dtype=torch.long, device=s.device).scatter_reduce(
        0, layout.segment.flatten(), torch.where(valid, position, none).flatten(), "amin")
    c = flat.transpose(1, 2).reshape(none, H)[first.clamp(max=none - 1)]           # (S, H)
    return torch.where((first < none).unsqueeze(-1), c, 0.0)


def _chunk_scalars(s, g1, gh, g0, state, layout):
    """The per-token scalars of the chunked form, O(T) and differentiable.

    s, g1, gh, g0: (B', H, N, C) in the chunk-aligned layout (accumulation dtype). Returns the
    ``ChunkScalars`` of the chunk core (per token (B', H, N C): s, m, a, b, hc; per chunk (B', H, N):
    the reference points m0, m1, sb0, sb1) and the final statistics (E, m, sbar, n), each (S, H):

        n_t, sbar_t, m_t        count, mean and maximum of the real logits (incoming state included)
        E~_t = E_t exp(-m_t)    from a log-cum-sum-exp, the incoming E included
        a_t = gh_t / E~_t,  b_t = (g1_t - gh_t) / n_t,  hc_t = b_t (sb0_j - sbar_t) + (g0_t - gh_t) / n_t

    with (m0_j, sb0_j) / (m1_j, sb1_j) the maximum and mean at the start / end of chunk j. Padding gets
    zero coefficients.

    Everything is in the accumulation dtype (float32 unless the inputs are float64; no float64 op on a
    GPU): counts are exact integers in float32 (up to 2^24 tokens), and the sums and the log-sum-exp run
    over logits centred on a per-sequence constant c (its first real logit, detached: the values do not
    depend on it, and causal: a later token never changes an earlier output)
    through chunk-then-carry scans, so a stream of 10^5 tokens with a large mean logit keeps float64's
    answer to ~1e-5 (tests/test_ops.py: test_long_float32_stream_stays_close_to_float64).
    """
    acc = s.dtype
    valid = layout.valid.unsqueeze(1)                                               # (B', 1, N, C)
    count = valid.to(acc)
    c = layout.per_sequence(_first_real_logits(s.detach(), layout))                # the centre, per sequence
    centred = torch.where(valid, s - c, 0.0)
    n_in = layout.per_sequence(state.n)
    n = layout.running(count, "sum") + n_in
    total = layout.running(centred, "sum") + n_in * (layout.per_sequence(state.sbar) - c)  # sum of (s - c)
    sbar = torch.where(n > 0, c + total / n.clamp(min=1.0), 0.0)                   # (no token yet: 0)
    m_state = state.m.detach()
    m = torch.maximum(layout.running(s.detach().masked_fill(~valid, _NO_MAX), "max"), layout.per_sequence(m_state))
    # log E_t - c = log(E_state exp(m_state - c) + sum_{i<=t} exp(s_i - c)), then E~_t = exp(log E_t - m_t) <= n_t.
    log_E_in = torch.where(state.E > 0, state.E.clamp(min=torch.finfo(acc).tiny).log() + m_state, _NO_MAX)
    log_E_in = layout.per_sequence(log_E_in)
    log_E = torch.logaddexp(layout.running(centred.masked_fill(~valid, _NO_MAX), "lse"),
                            torch.where(log_E_in > _NO_MAX, log_E_in - c, _NO_MAX))
    E = torch.where(n > 0, torch.exp(log_E - (m - c)), 0.0)

    m1, sb1 = m[..., -1], sbar[..., -1]                                             # (B', H, N)
    m0, sb0 = layout.at_chunk_starts(m1, m_state), layout.at_chunk_starts(sb1, state.sbar)
    b, c = _coefficients(g1, gh, g0, n)
    a = gh / E.clamp(min=_E_FLOOR)
    # Centre on the chunk's start mean: (s_i - sbar_t) = (s_i - sb0) + (sb0 - sbar_t).
    hc = b * (sb0.unsqueeze(-1) - sbar) + c
    a, b, hc = (x.masked_fill(~valid, 0.0) for x in (a, b, hc))
    final = tuple(layout.at_ends(x) for x in (E, m, sbar, n))
    s, m, a, b, hc = (x.flatten(2) for x in (s, m, a, b, hc))                       # (B', H, N C)
    return ChunkScalars(s=s, m=m, a=a, b=b, hc=hc, m0=m0, m1=m1, sb0=sb0, sb1=sb1), final


class ChunkLayouts:
    """The chunk layouts of one batch, built once and shared by the calls on it (``zeros_attention``'s
    ``chunk_layouts``; the model keeps one per forward pass in its ``MixerContext``).

    A layout depends on B, T, the chunk size, the packing, the sequences' lengths and the valid tensor
    (held by identity: the layers of a forward pass share the model's). An object of its own rather than
    a dict, so that torch.compile guards on its type only, not on what it holds.
    """

    __slots__ = ("_held",)

    def __init__(self):
        self._held = {}

    def get(self, B: int, T: int, valid, lengths, C: int, device, shared: bool) -> "_ChunkLayout":
        key = (B, T, C, shared, str(device), None if lengths is None else tuple(map(tuple, lengths)),
               None if valid is None else id(valid))
        held = self._held.get(key)
        if held is None or held[0] is not valid:
            held = self._held[key] = (valid, _ChunkLayout.build(B, T, valid, lengths, C, device, shared=shared))
        return held[1]

    def __len__(self) -> int:
        return len(self._held)


def _chunk_layout(B: int, T: int, valid, lengths, C: int, device, shared: bool,
                  chunk_layouts: Optional[ChunkLayouts]):
    """``_ChunkLayout.build``, through ``chunk_layouts`` when given (not while torch.compile traces: a compiled
    graph builds its layout itself)."""
    if chunk_layouts is None or torch.compiler.is_compiling():
        return _ChunkLayout.build(B, T, valid, lengths, C, device, shared=shared)
    return chunk_layouts.get(B, T, valid, lengths, C, device, shared)


def _chunked(q, k, v, s, g1, gh, g0, valid, state, chunk_size, lengths, core, shared=False, chunk_layouts=None,
             zero_start=False):
    """The chunked form in PyTorch: the per-token scalars (``_chunk_scalars``), then ``core`` (the PyTorch chunk
    core, or any core of the contract in ops_contract.py).

    Inputs as for ``zeros_attention`` (valid may be None; padding already zeroed); lengths: None or,
    per row, the lengths of its sequences; shared: sequences may share a chunk (``_ChunkLayout``;
    empty initial state, no final state). The chunk is chunk_size tokens, or the longest sequence (the
    row, when shared) when that is shorter. Returns o (B, T, H, d_v) and the final state (one row per
    sequence; None when shared). zero_start: every sequence starts from the empty state; the PyTorch core is then
    given no start states to load (None: it skips them), any other core the zeros.
    """
    B, T, H, _ = q.shape
    acc = state.kv.dtype
    longest = T if lengths is None or shared else max(max(n for row in lengths for n in row), 1)
    layout = _chunk_layout(B, T, valid, lengths, min(chunk_size, longest), q.device, shared, chunk_layouts)
    N, C = layout.num_chunks, layout.chunk_size

    def aligned(x):  # (B, T, H) -> (B', H, N, C) in the accumulation dtype
        return layout.pack(x.to(acc)).transpose(1, 2).reshape(layout.rows, H, N, C)

    with named_range("zeros_lm.scalars"):  # (named ranges for benchmarks/profile_step.py)
        scalars, (E, m_end, sbar_end, n_end) = _chunk_scalars(
            aligned(s), aligned(g1), aligned(gh), aligned(g0) if g0 is not None else None, state, layout)
    with named_range("zeros_lm.core"):
        start = None if zero_start and core is _chunk_core_torch else \
            state.kv if state.kv.is_contiguous() else state.kv.contiguous()
        o, kv = call_flat(core, layout.pack(q), layout.pack(k), layout.pack(v), scalars, start, layout.core)
    return layout.unpack(o), (None if shared else ZeroSState(kv=kv, E=E, m=m_end, sbar=sbar_end, n=n_end))


def _chunked_fused(entry, q, k, v, s, g1, gh, g0, valid, state, chunk_size, lengths, shared, out_dtype,
                   final_state=True, chunk_layouts=None):
    """The chunked form in the fused kernels, per-token scalars included (``ops_fused.zeros_chunk_fused``, here
    ``entry``): the chunk layout of ``_chunked`` (chunk_size is already a kernel tile), the logits and gates
    read where they are. state: the incoming ``ZeroSState`` or None (empty). Returns o (B, T, H, d_v) and the
    final state (None when shared or not final_state: then the kernels store none)."""
    B, T, H, _ = q.shape
    layout = _chunk_layout(B, T, valid, lengths, chunk_size, q.device, shared, chunk_layouts)
    per_token = (s, g1, gh, g0)
    if layout.dest is not None:  # sequences padded to whole chunks: the scalars move with their tokens
        per_token = tuple(None if x is None else layout.pack(x) for x in per_token)
    real = layout.valid.flatten(1) if valid is not None or layout.dest is not None else None
    stats_in = kv_in = None
    if state is not None:
        stats_in = torch.stack([state.E, state.m, state.sbar, state.n]).to(torch.float32)
        kv_in = state.kv
    final_state = final_state and not shared
    core = dataclasses.replace(layout.core, out_dtype=out_dtype,
                               num_out_states=layout.core.num_out_states if final_state else 0)
    with named_range("zeros_lm.core"):
        o, kv, stats = entry(layout.pack(q), layout.pack(k), layout.pack(v), *per_token, real, stats_in, kv_in, core)
    final = ZeroSState(kv=kv, E=stats[0], m=stats[1], sbar=stats[2], n=stats[3]) if final_state else None
    return layout.unpack(o), final


def chunk_core_torch(q, k, v, scalars: ChunkScalars, start_states: Optional[torch.Tensor], layout: CoreLayout):
    """The chunk core in PyTorch (the contract and its math: ``ops_contract.py``; the fused core is
    ``ops_fused.fused_chunk_core``). Outputs in the scalars' dtype (the accumulation dtype).

    Per chunk, a float64-exact loop over the chunks carries the state; inside a chunk the (C, C) weights
    are explicit. ``_chunk_core_torch`` is this core in the flat convention (what ``_chunked`` calls).

    start_states may also be None: every state a chunk loads is zero (sequences that start empty, as in
    training and a fresh prompt's prefill). Nothing is then loaded, moved or read for them: a short
    prompt's prefill would otherwise write and read its (B, H, 3, d_k, d_v) zero states several times over.
    """
    B, T, H, d_k = q.shape
    d_v, C = v.shape[-1], layout.chunk_size
    s, m, a, b, hc, m0, m1, sb0, sb1 = scalars.tensors()
    segments = layout.segments
    N = T // C
    acc = s.dtype
    prod = q.dtype if _tensor_core_products(q) else acc
    heads_first = lambda x, dtype: x.to(dtype).transpose(1, 2).reshape(B, H, N, C, -1)  # noqa: E731
    q_acc, k_acc, v_acc = (heads_first(x, acc) for x in (q, k, v))                  # (B, H, N, C, d)
    s, m, a, b, hc = (x.reshape(B, H, N, C) for x in (s, m, a, b, hc))
    decay_exponent = m0 - m1                                                        # (B, H, N), <= 0
    readout_exponent = m0.unsqueeze(-1) - m                                         # (B, H, N, C), <= 0
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()               # causal
    writers, readout_coefficients, carry = k_acc, (a, b, hc), None
    if segments is not None:
        seg = segments.view(B, 1, N, C)
        readers = seg == seg[..., :1]                       # (B, 1, N, C): the chunk's first sequence
        carry = readers[..., -1]                            # (B, 1, N): the chunk is one sequence
        writers = k_acc * (seg == seg[..., -1:]).unsqueeze(-1)  # the keys of the chunk's last sequence
        # Masked before exp (where the exponent would compare two sequences' maxima) so that no
        # gradient meets an inf.
        decay_exponent = decay_exponent.masked_fill(~carry, 0.0)
        readout_exponent = readout_exponent.masked_fill(~readers, 0.0)
        readout_coefficients = tuple(x * readers for x in (a, b, hc))
        mask = mask & (seg.unsqueeze(-1) == seg.unsqueeze(-2))  # (B, 1, N, C, C): block-diagonal
        carry = carry.to(acc).squeeze(1)                    # (B, N)

    # What each chunk adds to the state, expressed at its own end point.
    key_aug = _augment(writers, torch.exp((s - m1.unsqueeze(-1)).clamp(max=0.0)), s - sb1.unsqueeze(-1), None)
    added_kv = (key_aug.transpose(-1, -2) @ v_acc).reshape(B, H, N, 3, d_k, d_v)

    # Scan over chunks: the state at each chunk's start, O(N d^2), through the same transition as the
    # recurrent form. Per-chunk slices are taken once with unbind: indexing inside the loop would make
    # autograd materialise a full-size gradient per slice. Loads and stores are planned on the host.
    load, store = layout.host_plan()
    steps = zip(decay_exponent.exp().unbind(-1), (sb0 - sb1).unbind(-1), added_kv.unbind(2),
                carry.unbind(-1) if carry is not None else itertools.repeat(None))
    kv, kv_starts, stored = None, [], []  # kv None: every row's state is zero (start_states None)
    for j, (decay, shift, added, kept) in enumerate(steps):
        rows = [r for r in range(B) if load[r][j] >= 0]
        if rows and start_states is None:  # the rows start from zero states
            kv = None if len(rows) == B or kv is None else kv.index_fill(0, torch.tensor(rows, device=q.device), 0.0)
        elif rows:
            loaded = start_states.index_select(0, torch.tensor([load[r][j] for r in rows], device=q.device))
            kv = loaded if len(rows) == B else kv.index_copy(0, torch.tensor(rows, device=q.device), loaded)
        kv_starts.append(kv)
        if kv is None:
            kv = added
        else:
            moved = _move_reference(kv, decay, shift)
            kv = (moved if kept is None else moved * kept[:, None, None, None, None]) + added
        stored += [(store[r][j], r, j, kv) for r in range(B) if store[r][j] >= 0]
    out_states = _stored_states(stored, layout.num_out_states, (H, 3, d_k, d_v), added_kv)

    # Inside each chunk: explicit (C, C) weights R[t, i] formed in the accumulation dtype, times q.k,
    # causal (and block-diagonal across sequences). Padding keys have k = 0; exp(min(., 0)) <= 1 keeps
    # every weight finite.
    p = torch.exp((s.unsqueeze(-2) - m.unsqueeze(-1)).clamp(max=0.0))              # (B, H, N, C, C)
    weights = torch.addcmul(hc.unsqueeze(-1), b.unsqueeze(-1), (s - sb0.unsqueeze(-1)).unsqueeze(-2))
    weights = torch.addcmul(weights, a.unsqueeze(-1), p)
    if prod == acc:
        scores = q_acc @ k_acc.transpose(-1, -2)
        o = (weights * scores.masked_fill(~mask, 0.0)) @ v_acc
    else:  # tensor cores: q.k and (weights) V in 16 bits, the weights themselves formed in float32
        scores = (heads_first(q, prod) @ heads_first(k, prod).transpose(-1, -2)).to(acc)
        weighted = weights * scores.masked_fill(~mask, 0.0)
        # Each row scaled to max |w| = 1 before rounding: a relative error per weight, and no float16
        # underflow of the small weights (~1/t) of a long context.
        scale = weighted.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(acc).tiny)
        o = ((weighted / scale).to(prod) @ heads_first(v, prod)).to(acc) * scale
    # Everything before the chunk, through the state at its start (kept in the accumulation dtype:
    # the three terms of the readout cancel).
    if any(x is not None for x in kv_starts):  # (no chunk starts from a state that is not zero: nothing to read)
        zeros = next(x for x in kv_starts if x is not None).new_zeros(()).expand(B, H, 3, d_k, d_v)
        kv_starts = torch.stack([zeros if x is None else x for x in kv_starts], dim=2)  # (B, H, N, 3, d_k, d_v)
        ra, rb, rhc = readout_coefficients
        o = o + _readout(q_acc, kv_starts, ra * torch.exp(readout_exponent), rb, rhc)
    return o.reshape(B, H, T, d_v).transpose(1, 2), out_states


def _stored_states(stored: list, num_out_states: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The core's out_states (num_out_states, *shape) from ``stored``: (out row, batch row, chunk, the (B, *shape)
    states after that chunk) per store; rows never stored are 0. When every batch row stores after one chunk
    into the out row of its own index, that chunk's states are the answer as they are (no copy)."""
    if stored and len(stored) == num_out_states and all(i == r and x is stored[0][3] for i, r, _, x in stored) \
            and stored[0][3].shape[0] == num_out_states:
        return stored[0][3].contiguous()
    out_states = like.new_zeros(num_out_states, *shape)
    if stored:
        index = torch.tensor([i for i, _, _, _ in stored], device=like.device)
        out_states = out_states.index_copy(0, index, torch.stack([x[r] for _, r, _, x in stored]))
    return out_states


_chunk_core_torch = flat_entry(chunk_core_torch)

# 16-bit dtypes whose products may run on tensor cores (docs/gpu.md: safe for q.k and for (weights) V when the
# weights are formed in float32; not for the state readout, which cancels).
_TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def _tensor_core_products(x: torch.Tensor) -> bool:
    """Whether the chunk core multiplies q.k and (weights) V in x's own 16-bit dtype (CUDA only)."""
    return x.device.type == "cuda" and x.dtype in _TENSOR_CORE_DTYPES


# ----------------------------------------------------------------------------------------------
# Recurrent: one token at a time (generation)
# ----------------------------------------------------------------------------------------------

def _recurrent(q, k, v, s, g1, gh, g0, valid, state, in_place=False):
    """Token by token through the state; inputs as for ``zeros_attention`` (in_place: ``state``'s sums may be
    overwritten). Returns o (B, T, H, d_v) and the final state."""
    if q.shape[1] == 0:  # an empty segment of cu_seqlens
        return q.new_zeros(*q.shape[:3], v.shape[-1], dtype=state.kv.dtype), state
    if q.shape[1] == 1:  # a decoded token: (B, 1, ...) -> (B, ...) as views, no loop
        w = None if valid is None else valid.to(state.kv.dtype)   # (B, 1)
        o, state = _step(state, *(x.squeeze(1) for x in (q, k, v, s, g1, gh)),
                         None if g0 is None else g0.squeeze(1), w, in_place=in_place)
        return o.unsqueeze(1), state
    outputs = []
    for t in range(q.shape[1]):
        w = None if valid is None else valid[:, t, None].to(state.kv.dtype)   # (B, 1)
        o_t, state = _step(state, q[:, t], k[:, t], v[:, t], s[:, t], g1[:, t], gh[:, t],
                           None if g0 is None else g0[:, t], w, in_place=in_place or t > 0)
        outputs.append(o_t)
    return (outputs[0].unsqueeze(1) if len(outputs) == 1 else torch.stack(outputs, dim=1)), state


def _step_update(kv, decay, shift, key, v, in_place=False):
    """The state after one token: kv (B, H, 3, d_k, d_v) moved to the new reference point (``_move_reference``:
    decay, shift (B, H)) plus the token's rank-1 terms key[:, :, j] v^T, key = [e k, (s - sbar) k, w k]
    (B, H, 3, d_k), v (B, H, d_v). The input state is left as it is, unless ``in_place`` (no autograd):
    then the new state is written over it.

    The step is memory-bound at serving batch sizes: its cost is the passes over the (B, H, 3, d_k, d_v) state,
    and at batch 1 the count of its operations (a few microseconds each). Without autograd each third is
    written once and the rank-1 term added there (F' = decay F + e k v^T, G' = G + shift H + (s - sbar) k v^T,
    H' = H + w k v^T): about 2 passes instead of the 6 of moving into temporaries, stacking them and adding (at
    B = 32, H = 6, d = 64 on a 2-core CPU, 0.4 instead of 1.4 ms a layer). In place, F and G are moved where
    they are and one broadcast product adds the three slots' terms (3 operations). With autograd the same
    sums are built from differentiable ops.
    """
    B, H, _, d_k, d_v = kv.shape
    if torch.is_grad_enabled() and any(x.requires_grad for x in (kv, decay, shift, key, v)):
        moved = _move_reference(kv, decay, shift).view(B * H, 3 * d_k, d_v)
        return torch.baddbmm(moved, key.reshape(B * H, 3 * d_k, 1), v.reshape(B * H, 1, d_v)).view(kv.shape)
    if in_place and kv.is_contiguous():  # move F and G where they are, then one product adds every slot's term
        F_, G_, H_ = kv.unbind(-3)
        F_.mul_(decay.view(B, H, 1, 1))
        G_.addcmul_(H_, shift.view(B, H, 1, 1))  # (G reads H before the rank-1 terms change it)
        return kv.addcmul_(key.unsqueeze(-1), v.view(B, H, 1, 1, d_v))
    new = torch.empty_like(kv, memory_format=torch.contiguous_format)
    (F_, G_, H_), (F_new, G_new, H_new) = kv.unbind(-3), new.unbind(-3)
    k_F, k_G, k_H = key.unsqueeze(-1).unbind(2)                         # (B, H, d_k, 1) each
    v_row = v.unsqueeze(-2)                                               # (B, H, 1, d_v)
    torch.mul(F_, decay.view(B, H, 1, 1), out=F_new).addcmul_(k_F, v_row)
    torch.addcmul(G_, H_, shift.view(B, H, 1, 1), out=G_new).addcmul_(k_G, v_row)
    torch.addcmul(H_, k_H, v_row, out=H_new)
    return new


def _step(state, q, k, v, s, g1, gh, g0, w, in_place=False):
    """One token: q, k (B, H, d_k), v (B, H, d_v), s and gates (B, H); w (B, 1) is 1 for a real
    token and 0 for padding, or None when every row is real. Returns o (B, H, d_v) and the new state
    (in_place: its sums written over ``state``'s, see ``_step_update``).

    Generation runs this once per token and layer, so it is written in few tensor operations (each costs a
    few microseconds of dispatch at batch 1): the three slots' coefficients are stacked (B, H, 3) and
    scale k (the token's terms) and q (the readout) in one product each.
    """
    acc = state.kv.dtype
    B, H, _, d_k, d_v = state.kv.shape
    q, k, v, s, g1, gh = (as_dtype(x, acc) for x in (q, k, v, s, g1, gh))
    g0 = as_dtype(g0, acc) if g0 is not None else None
    s_max = s.detach() if s.requires_grad else s  # (the maximum is a constant of the formula)
    if w is None:
        n = state.n + 1.0
        inv_n = n.reciprocal()
        m = torch.maximum(state.m, s_max)
        sbar = torch.lerp(state.sbar, s, inv_n)  # sbar + (s - sbar) / n
        e = torch.exp(s - m)  # <= 1: m includes s
        third = torch.ones_like(e)
    else:
        n = state.n + w
        inv_n = n.clamp(min=1.0).reciprocal()  # (1 where no real token came yet)
        m = torch.where(w > 0, torch.maximum(state.m, s_max), state.m)
        sbar = state.sbar + w * (s - state.sbar) * inv_n
        e = torch.exp((s - m).clamp(max=0.0)) * w  # (a padding column's s may exceed m)
        third = w.expand_as(e)
    decay = torch.exp(state.m - m)
    # what the token writes into the F, G, H slots: [e, s - sbar, 1] k (times w: padding writes nothing)
    writes = torch.stack([e, s - sbar if w is None else (s - sbar) * w, third], dim=-1)
    kv = _step_update(state.kv, decay, state.sbar - sbar, writes[..., None] * k[:, :, None], v, in_place)
    E = torch.addcmul(e, decay, state.E)
    # the readout [gh / E, b, c] q against the F, G, H slots (docs/method.md), as one (1, 3 d_k) x (3 d_k, d_v);
    # E >= 1 once a real token came (_E_FLOOR)
    b, c = _coefficients(g1, gh, g0, inv_n=inv_n)
    reads = torch.stack([gh / (E if w is None else E.clamp(min=_E_FLOOR)), b, c], dim=-1)
    query = (reads[..., None] * q[:, :, None]).view(B * H, 1, 3 * d_k)
    o = torch.bmm(query, kv.view(B * H, 3 * d_k, d_v)).view(B, H, d_v)
    return o, ZeroSState(kv=kv, E=E, m=m, sbar=sbar, n=n)


# ----------------------------------------------------------------------------------------------
# The linear-attention baseline's op (normalised causal linear attention), on the same chunk layout
# ----------------------------------------------------------------------------------------------

LINEAR_ATTENTION_EPS = 1e-6  # denominator floor of the linear-attention baseline


def linear_attention_chunked(q, k, v, S0, z0, chunk_size: int, segments: torch.Tensor | None = None):
    """Causal normalised linear attention on feature-mapped q, k (B, H, T, d) and v (B, H, T, dv).

    Inside a chunk of C tokens the C x C block is formed explicitly; across chunks the running sums
    S (d x dv) and z (d) are carried (prefix sums over chunks). Returns o, S_T, z_T.

    segments: (B, N, C) long, packed documents (``_ChunkLayout``'s shared layout): the document of each
    position, T padded to N C. The sums restart at every document: inside a chunk the block is
    block-diagonal, only a chunk's first document reads the sums before it, only its last one adds to
    the sums after it, and a chunk where a document starts drops the sums it started from.
    """
    B, H, T, d = q.shape
    dv = v.shape[-1]
    C = max(1, min(check_chunk_size(chunk_size, "linear_attention_chunked: chunk_size"), T))  # (T = 0: one empty chunk)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # zero keys add nothing to the sums
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)).tril()  # (B, H, N, C, C), includes the diagonal
    readers, writers = q, k
    if segments is not None:
        seg = segments.view(B, 1, N, C)
        scores = scores.masked_fill(seg.unsqueeze(-1) != seg.unsqueeze(-2), 0.0)
        readers = q * (seg == seg[..., :1]).unsqueeze(-1)
        writers = k * (seg == seg[..., -1:]).unsqueeze(-1)
    kv = writers.transpose(-1, -2) @ v  # per-chunk sums (B, H, N, d, dv)
    ks = writers.sum(dim=-2)  # (B, H, N, d)
    if segments is None:
        S_before = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2).cumsum(dim=2) + S0[:, :, None]
        z_before = torch.cat([torch.zeros_like(ks[:, :, :1]), ks[:, :, :-1]], dim=2).cumsum(dim=2) + z0[:, :, None]
    else:  # a scan over the chunks (N steps) that restarts with the documents
        # carry[j]: chunk j's sums reach chunk j + 1 (one document through chunk j, going on in chunk j + 1)
        one_document = seg[..., 0] == seg[..., -1]                                          # (B, 1, N)
        goes_on = F.pad(seg[..., 1:, 0] == seg[..., :-1, -1], (0, 1), value=True)
        carry = (one_document & goes_on).to(q.dtype).unbind(-1)
        # added[j] reaches chunk j + 1 unless a document starts at its first position
        reach = goes_on.to(q.dtype).unbind(-1)
        S_starts, z_starts, S, z = [], [], S0, z0
        for j, (S_j, z_j) in enumerate(zip(kv.unbind(2), ks.unbind(2))):
            S_starts.append(S)
            z_starts.append(z)
            S = S * carry[j][..., None, None] + S_j * reach[j][..., None, None]
            z = z * carry[j][..., None] + z_j * reach[j][..., None]
        S_before, z_before = torch.stack(S_starts, dim=2), torch.stack(z_starts, dim=2)
    num = scores @ v + readers @ S_before
    den = scores.sum(-1) + (readers * z_before[:, :, :, None, :]).sum(-1)
    o = num / den.clamp_min(LINEAR_ATTENTION_EPS)[..., None]
    o = o.reshape(B, H, N * C, dv)[:, :, :T]
    return o, S_before[:, :, -1] + kv[:, :, -1], z_before[:, :, -1] + ks[:, :, -1]


def linear_attention_packed(q, k, v, row_lengths: list, chunk_size: int):
    """linear_attention_chunked over packed documents, q, k (B, H, T, d), v (B, H, T, dv); row_lengths: per row,
    the lengths of its documents. The rows as they are, chunks shared by documents (``_ChunkLayout``'s shared
    layout), every document's sums starting empty. Returns o (B, H, T, dv)."""
    B, H, T, _ = q.shape
    C = max(1, min(check_chunk_size(chunk_size, "linear_attention_packed: chunk_size"), T))
    layout = _ChunkLayout.build(B, T, None, row_lengths, C, q.device, shared=True)
    zeros = q.new_zeros(B, H, q.shape[-1], v.shape[-1]), q.new_zeros(B, H, q.shape[-1])
    o, _, _ = linear_attention_chunked(q, k, v, *zeros, layout.chunk_size, segments=layout.segment)
    return o
