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
- ``recurrent``: generation, one token at a time through the same state.

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

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["zeros_attention", "ZeroSState", "MODES"]

MODES = ("chunked", "recurrent", "reference")

# Running maximum before any real token has been seen. Finite (so exp(m_old - m_new) is never
# exp(-inf + inf)), and far below any logit, so the first real token replaces it.
_NO_MAX = -1e30
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
              dtype: torch.dtype = torch.float32, device=None) -> "ZeroSState":
        """The state before any token: zero sums, no maximum yet."""
        scalars = lambda value: torch.full((batch_size, num_heads), value, dtype=dtype, device=device)  # noqa: E731
        kv = torch.zeros(batch_size, num_heads, 3, d_k, d_v, dtype=dtype, device=device)
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

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _running_stats(s: torch.Tensor, valid: torch.Tensor, state: ZeroSState):
    """Per-token running statistics, including the incoming state.

    s, valid: (B, H, T) with s in the accumulation dtype. Returns (n, m, sbar), each (B, H, T):
    the count of real tokens up to t, the running maximum (detached: the outputs do not depend on
    it) and the running mean of the logits. Padding carries the previous values forward. The sums
    behind the mean are taken in float64, so long float32 streams keep their precision.
    """
    w = valid.to(torch.float64)
    n = state.n.to(torch.float64).unsqueeze(-1) + w.cumsum(-1)
    total = (state.n * state.sbar).to(torch.float64).unsqueeze(-1) + (w * s.to(torch.float64)).cumsum(-1)
    sbar = (total / n.clamp(min=1.0)).to(s.dtype)
    masked = torch.where(valid, s.detach(), torch.full_like(s, _NO_MAX))
    m = torch.maximum(masked.cummax(-1).values, state.m.detach().unsqueeze(-1))
    return n.to(s.dtype), m, sbar


def _coefficients(g1, gh, g0, n):
    """b_t = (g1 - gh) / t and c_t = (g0 - gh) / t, all (B, H, T); t is clamped to 1 on padding."""
    inv_n = 1.0 / n.clamp(min=1.0)
    b = (g1 - gh) * inv_n
    c = ((g0 if g0 is not None else 0.0) - gh) * inv_n
    return b, c


def _augment(x: torch.Tensor, c0, c1, c2) -> torch.Tensor:
    """(..., d) -> (..., 3 d): [c0 x, c1 x, c2 x] with per-row scalars c (...,).

    As a key, it writes into the F, G, H slots of the state; as a query, it reads them.
    """
    return torch.cat([c0.unsqueeze(-1) * x, c1.unsqueeze(-1) * x, c2.unsqueeze(-1) * x], dim=-1)


def _move_reference(kv, E, decay, shift):
    """Re-express the state (kv (..., 3, d_k, d_v), E (...)) at a new reference point (m', sbar').

    decay = exp(m - m') <= 1 (the maximum only grows) and shift = sbar - sbar', both (...).
    """
    F_, G_, H_ = kv.unbind(-3)
    kv = torch.stack([decay[..., None, None] * F_, G_ + shift[..., None, None] * H_, H_], dim=-3)
    return kv, decay * E


def _readout(q, kv, a_decay, b, h_coef):
    """Query the state: q (..., L, d_k), kv (..., 3, d_k, d_v), coefficients (..., L) -> (..., L, d_v)."""
    d_k, d_v = kv.shape[-2:]
    return _augment(q, a_decay, b, h_coef) @ kv.reshape(*kv.shape[:-3], 3 * d_k, d_v)


def _to_heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, T, ...) in the accumulation dtype."""
    return x.to(dtype).transpose(1, 2)


def _check_inputs(q, k, v, s, g1, gh, g0, valid, initial_state, mode, chunk_size):
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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"zeros_attention: chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        B, _, H, d_k = q.shape
        expected = (B, H, 3, d_k, v.shape[-1])
        if tuple(initial_state.kv.shape) != expected:
            raise ValueError(f"zeros_attention: initial_state.kv has shape {tuple(initial_state.kv.shape)}, "
                             f"expected {expected} for these inputs")


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------

def zeros_attention(q, k, v, s, g1, gh, g0=None, *, mode: str = "chunked", chunk_size: int = 64,
                    valid: Optional[torch.Tensor] = None, initial_state: Optional[ZeroSState] = None,
                    output_final_state: bool = False):
    """Causal ZeroS attention.

    Args:
        q, k: (B, T, H, d_k), used as given (the layer L2-normalises them first). v: (B, T, H, d_v).
        s: (B, T, H) radial logits. g1, gh: (B, T, H) gates in (0, 1).
        g0: (B, T, H) zero-order gate in (-1, 1) on the first layer, else None.
        mode: "chunked" (training, prefill), "recurrent" (token by token) or "reference" (T x T).
        chunk_size: tokens per chunk in chunked mode.
        valid: (B, T) bool, False marks padding: it is not read, does not enter the state, does
            not advance t, and its output is exactly 0.
        initial_state: the ``ZeroSState`` after the preceding tokens (not in reference mode).
        output_final_state: also return the state after the last token.

    Returns:
        o: (B, T, H, d_v) in q's dtype; state: a ``ZeroSState`` or None.
    """
    _check_inputs(q, k, v, s, g1, gh, g0, valid, initial_state, mode, chunk_size)
    # Under autocast the products below would run in bfloat16/float16: the op accumulates in float32 itself.
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _dispatch(q, k, v, s, g1, gh, g0, mode, chunk_size, valid, initial_state, output_final_state)


def _dispatch(q, k, v, s, g1, gh, g0, mode, chunk_size, valid, initial_state, output_final_state):
    B, T, H, d_k = q.shape
    acc = _accumulation_dtype(q.dtype)
    if mode == "reference":
        if initial_state is not None:
            raise ValueError("zeros_attention: mode='reference' does not take initial_state; "
                             "use mode='chunked' or 'recurrent' to continue a sequence")
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid.to(q.device, torch.bool)
        o = _reference(q, k, v, s, g1, gh, g0, valid, acc)
        state = _reference_final_state(k, v, s, valid, acc) if output_final_state else None
        return o.to(q.dtype), state

    state = initial_state if initial_state is not None else ZeroSState.empty(B, H, d_k, v.shape[-1], dtype=acc, device=q.device)
    if state.kv.dtype != acc or state.kv.device != q.device:
        state = state.to(device=q.device, dtype=acc)
    if valid is not None:  # padding gets zero keys, values and logits: it adds nothing, whatever it held
        zero = torch.zeros((), dtype=acc, device=q.device)
        valid = valid.to(device=q.device, dtype=torch.bool)
        k, v = (torch.where(valid[:, :, None, None], x.to(acc), zero) for x in (k, v))
        s = torch.where(valid[:, :, None], s.to(acc), zero)
    if mode == "chunked":
        o, state = _chunked(q, k, v, s, g1, gh, g0, valid, state, chunk_size)
    else:
        o, state = _recurrent(q, k, v, s, g1, gh, g0, valid, state)
    if valid is not None:
        o = torch.where(valid[:, :, None, None], o, zero)
    return o.to(q.dtype), (state if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Reference: the specification, literally
# ----------------------------------------------------------------------------------------------

def _reference(q, k, v, s, g1, gh, g0, valid, acc):
    """ZEROS.md section 2 with explicit (T, T) weights. Returns (B, T, H, d_v)."""
    q, k, v = (x.to(acc).transpose(1, 2) for x in (q, k, v))            # (B, H, T, d)
    s, g1, gh = (x.to(acc).transpose(1, 2) for x in (s, g1, gh))        # (B, H, T)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    keep = causal & valid[:, None, None, :]                             # (B, 1, T_query, T_key)
    w = valid[:, None, :].to(acc)                                       # (B, 1, T)
    t = w.cumsum(-1).clamp(min=1.0)                                     # real tokens up to the query
    s = s * w
    P = s.cumsum(-1)
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


def _reference_final_state(k, v, s, valid, acc):
    """The state after the whole sequence, from its definition (sums over all real tokens)."""
    k, v = (x.to(acc).transpose(1, 2) for x in (k, v))                  # (B, H, T, d)
    s = s.to(acc).transpose(1, 2)
    w = valid[:, None, :].to(acc).expand_as(s)
    n = w.sum(-1)
    m = torch.where(w.bool(), s.detach(), torch.full_like(s, _NO_MAX)).amax(-1)
    sbar = (w * s).sum(-1) / n.clamp(min=1.0)
    e = w * torch.exp((s - m[..., None]).clamp(max=0.0))
    kv = torch.stack([torch.einsum("bht,bhtk,bhtv->bhkv", coef, k, v)
                      for coef in (e, w * (s - sbar[..., None]), w)], dim=2)
    return ZeroSState(kv=kv, E=e.sum(-1), m=m, sbar=sbar, n=n)


# ----------------------------------------------------------------------------------------------
# Chunked: (C, C) blocks inside a chunk, the state across chunks
# ----------------------------------------------------------------------------------------------

def _chunked(q, k, v, s, g1, gh, g0, valid, state, chunk_size):
    """Inputs as for ``zeros_attention`` (valid may be None). Returns o (B, T, H, d_v) and the final state."""
    B, T, H, d_k = q.shape
    acc = state.kv.dtype
    valid = torch.ones(B, H, T, dtype=torch.bool, device=q.device) if valid is None else valid.unsqueeze(1).expand(B, H, T)
    q, k, v, s, g1, gh = (_to_heads_first(x, acc) for x in (q, k, v, s, g1, gh))  # (B, H, T, ...)
    g0 = _to_heads_first(g0, acc) if g0 is not None else None
    n, m, sbar = _running_stats(s, valid, state)
    b, c = _coefficients(g1, gh, g0, n)
    d_v = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padding tokens at the end: zero keys, not valid, running stats carried forward
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        s, gh, b, c = (F.pad(x, (0, pad)) for x in (s, gh, b, c))
        n, m, sbar = (F.pad(x, (0, pad), mode="replicate") for x in (n, m, sbar))
        valid = F.pad(valid, (0, pad), value=False)
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))
    s, gh, b, c, n, m, sbar, valid = (x.reshape(B, H, N, C) for x in (s, gh, b, c, n, m, sbar, valid))

    # Reference point of each chunk's start: the running stats after the previous chunk.
    m_end, sbar_end = m[..., -1], sbar[..., -1]                                   # (B, H, N)
    m_start = torch.cat([state.m.detach().unsqueeze(-1), m_end[..., :-1]], dim=-1)
    sbar_start = torch.cat([state.sbar.unsqueeze(-1), sbar_end[..., :-1]], dim=-1)

    # What each chunk adds to the state, expressed at its own end point.
    w = valid.to(q.dtype)
    e_key = w * torch.exp((s - m_end.unsqueeze(-1)).clamp(max=0.0))
    key_aug = _augment(k, e_key, w * (s - sbar_end.unsqueeze(-1)), w)            # (B, H, N, C, 3 d_k)
    added_kv = (key_aug.transpose(-1, -2) @ v).reshape(B, H, N, 3, d_k, d_v)
    added_E = e_key.sum(-1)

    # Scan over chunks: the state at each chunk's start, O(N d^2), through the same transition as
    # the recurrent form (move the reference point to the chunk's end, then add the chunk). Per-chunk
    # slices are taken once with unbind: indexing inside the loop would make autograd materialise a
    # full-size gradient per slice. (A cumulative sum over the chunk axis is slower on CPU: strided.)
    steps = zip((m_start - m_end).exp().unbind(-1), (sbar_start - sbar_end).unbind(-1),
                added_kv.unbind(2), added_E.unbind(-1))
    kv, E = state.kv, state.E
    kv_starts, E_starts = [], []
    for decay, shift, added_kv_j, added_E_j in steps:
        kv_starts.append(kv)
        E_starts.append(E)
        kv, E = _move_reference(kv, E, decay, shift)
        kv, E = kv + added_kv_j, E + added_E_j
    kv_starts = torch.stack(kv_starts, dim=2)                                     # (B, H, N, 3, d_k, d_v)
    E_starts = torch.stack(E_starts, dim=-1)                                      # (B, H, N)
    final = ZeroSState(kv=kv, E=E, m=m_end[..., -1], sbar=sbar_end[..., -1], n=n[..., -1, -1])

    # Inside each chunk: explicit (C, C) weights r_{t,i} (q_t . k_i), causal and real keys only.
    # exp(s_i - m_t) <= 1 for i <= t; the masked upper triangle is exp(-inf) = 0.
    start_decay = torch.exp(m_start.unsqueeze(-1) - m)                           # (B, H, N, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    keep = causal & valid.unsqueeze(-2)                                           # (B, H, N, C, C)
    p_num = torch.exp((s.unsqueeze(-2) - m.unsqueeze(-1)).masked_fill(~keep, float("-inf")))
    E_t = start_decay * E_starts.unsqueeze(-1) + p_num.sum(-1)
    a = gh / E_t.clamp(min=_E_FLOOR)
    # Centre the key logits on the chunk's start mean: (s_i - sbar_t) = (s_i - sbar_s) + (sbar_s - sbar_t).
    h_coef = b * (sbar_start.unsqueeze(-1) - sbar) + c
    s_centred = s - sbar_start.unsqueeze(-1)
    weights = torch.addcmul(h_coef.unsqueeze(-1), b.unsqueeze(-1), s_centred.unsqueeze(-2))
    weights = torch.addcmul(weights, a.unsqueeze(-1), p_num)
    o = (weights * (q @ k.transpose(-1, -2)).masked_fill(~keep, 0.0)) @ v
    # Everything before the chunk, through the state at its start.
    o = o + _readout(q, kv_starts, a * start_decay, b, h_coef)
    return o.reshape(B, H, N * C, d_v)[:, :, :T].transpose(1, 2), final


# ----------------------------------------------------------------------------------------------
# Recurrent: one token at a time (generation)
# ----------------------------------------------------------------------------------------------

def _recurrent(q, k, v, s, g1, gh, g0, valid, state):
    """Token by token through the state; inputs as for ``zeros_attention``. Returns o (B, T, H, d_v)."""
    outputs = []
    for t in range(q.shape[1]):
        w = None if valid is None else valid[:, t, None].to(state.kv.dtype)   # (B, 1)
        o_t, state = _step(state, q[:, t], k[:, t], v[:, t], s[:, t], g1[:, t], gh[:, t],
                           None if g0 is None else g0[:, t], w)
        outputs.append(o_t)
    return (outputs[0].unsqueeze(1) if len(outputs) == 1 else torch.stack(outputs, dim=1)), state


def _step(state, q, k, v, s, g1, gh, g0, w):
    """One token: q, k (B, H, d_k), v (B, H, d_v), s and gates (B, H); w (B, 1) is 1 for a real
    token and 0 for padding, or None when every row is real. Returns o (B, H, d_v) and the new state."""
    acc = state.kv.dtype
    q, k, v, s, g1, gh = (x.to(acc) for x in (q, k, v, s, g1, gh))
    g0 = g0.to(acc) if g0 is not None else None
    if w is None:
        n = state.n + 1.0
        m = torch.maximum(state.m, s.detach())
        sbar = state.sbar + (s - state.sbar) / n
    else:
        n = state.n + w
        m = torch.where(w > 0, torch.maximum(state.m, s.detach()), state.m)
        sbar = state.sbar + w * (s - state.sbar) / n.clamp(min=1.0)
    kv, E = _move_reference(state.kv, state.E, torch.exp(state.m - m), state.sbar - sbar)
    e = torch.exp((s - m).clamp(max=0.0))
    key_coef = torch.stack([e, s - sbar, torch.ones_like(s)], dim=-1)               # (B, H, 3)
    if w is not None:
        key_coef = key_coef * w.unsqueeze(-1)
    kv = kv.addcmul(key_coef[..., None, None], (k.unsqueeze(-1) * v.unsqueeze(-2)).unsqueeze(-3))
    E = E + key_coef[..., 0]
    b, c = _coefficients(g1, gh, g0, n)
    a = gh / E.clamp(min=_E_FLOOR)
    o = _readout(q.unsqueeze(-2), kv, a.unsqueeze(-1), b.unsqueeze(-1), c.unsqueeze(-1)).squeeze(-2)
    return o, ZeroSState(kv=kv, E=E, m=m, sbar=sbar, n=n)
