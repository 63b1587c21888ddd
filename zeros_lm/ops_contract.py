"""The chunk core's contract: what the chunked form hands a chunk core (PyTorch or Triton) per call.

    o, out_states = core(q, k, v, scalars, start_states, layout)

- q, k: (B, T, H, d_k) and v: (B, T, H, d_v), chunk-aligned (T = N C, C = ``layout.chunk_size``);
  padding tokens have k = v = 0.
- scalars: ``ChunkScalars``, the per-token and per-chunk scalars of docs/method.md (float32, or
  float64 in the PyTorch core).
- start_states: (S_in, H, 3, d_k, d_v), the F, G, H states that chunks load.
- layout: ``CoreLayout``, which chunk loads which state, which stores, the chunk size, packed sequences.

The math of one chunk j of a row, with start state (F, G, H) and tokens t, i of the chunk:

    o_t    = sum_{i<=t} (q_t . k_i) R[t, i] v_i + q_t^T (a_t exp(m0_j - m_t) F + b_t G + hc_t H)
    R[t,i] = a_t exp(min(s_i - m_t, 0)) + b_t (s_i - sb0_j) + hc_t
    F' = exp(m0_j - m1_j) F + sum_i exp(min(s_i - m1_j, 0)) k_i v_i^T
    G' = G + (sb0_j - sb1_j) H + sum_i (s_i - sb1_j) k_i v_i^T,   H' = H + sum_i k_i v_i^T

Returns o (B, T, H, d_v) (in ``layout.out_dtype``, or the accumulation dtype) and out_states
(num_out_states, H, 3, d_k, d_v) in the accumulation dtype (rows never stored: 0).

The flat form (``flatten`` / ``unflatten``) is the one ordering of these fields as positional tensors:
the ``torch.library`` custom op takes only plain tensors and ints, and the cores' flat entries
(``ops._chunk_core_torch``, ``ops_fused.chunk_core_fused``) keep that calling convention for callers
that hold plain tensors (tests, benchmarks). Nothing else spells the order out.

The chunk size has two rules, each written once here: a user's ``chunk_size`` is a positive integer
(``check_chunk_size``); the fused kernels tile a chunk of a power of two >= ``MIN_KERNEL_CHUNK``
(``is_kernel_chunk``, ``kernel_chunk_size``: the smallest tile holding min(chunk_size, longest sequence)).

This module imports only torch: ``ops.py`` and ``ops_fused.py`` both import it (no circle), and
``save_pretrained`` copies it next to them for trust_remote_code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["ChunkScalars", "CoreLayout", "check_chunk_size", "is_kernel_chunk", "kernel_chunk_size",
           "MIN_KERNEL_CHUNK", "NO_MAX", "flatten", "unflatten", "flat_entry"]

# tl.dot needs every dimension >= 16 on a GPU, tl.arange a power of two: the kernels' smallest chunk.
MIN_KERNEL_CHUNK = 16
# Running maximum before any real token has been seen (both cores and the kernels). Finite (so exp(m_old - m_new)
# is never exp(-inf + inf)), and far below any logit, so the first real token replaces it.
NO_MAX = -1e30


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int:
    """The one rule for a chunk size given by a user: a positive integer (tokens per chunk).

    ``name`` says whose field it is in the message (``"ZeroSConfig.chunk_size"``,
    ``"zeros_attention: chunk_size"``). Returns chunk_size; raises ValueError otherwise.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{name} must be a positive integer, got {chunk_size!r}")
    return chunk_size


def is_kernel_chunk(chunk_size) -> bool:
    """Whether the fused kernels can tile a chunk of this many tokens: a power of two >= MIN_KERNEL_CHUNK."""
    return (not isinstance(chunk_size, bool) and isinstance(chunk_size, int) and chunk_size >= MIN_KERNEL_CHUNK
            and chunk_size & (chunk_size - 1) == 0)


def kernel_chunk_size(chunk_size: int, longest: int) -> int:
    """The fused kernels' chunk for a (valid) user chunk_size and the longest sequence of the call: the
    smallest kernel tile holding min(chunk_size, longest) tokens.

    A short call (a prompt of 5 tokens) simply gets one padded tile. A chunk_size that is no kernel
    tile itself (8, 48) is rounded up to one, with a warning (once per call site): the PyTorch form
    (mode="chunked") runs any chunk size as given.
    """
    if not is_kernel_chunk(chunk_size):
        warnings.warn(f"chunk_size = {chunk_size} is not a power of two >= {MIN_KERNEL_CHUNK}: the fused kernels "
                      f"run chunks of {max(MIN_KERNEL_CHUNK, 1 << (chunk_size - 1).bit_length())} tokens instead",
                      stacklevel=4)  # (the caller of zeros_attention)
    return max(MIN_KERNEL_CHUNK, 1 << (max(min(chunk_size, longest), 1) - 1).bit_length())


@dataclass(frozen=True)
class ChunkScalars:
    """The per-token and per-chunk scalars a chunk core reads (one dtype: float32, float64 in PyTorch).

    Per token, (B, H, T) in the chunk-aligned layout (padding: 0 coefficients):
        s:  the key logits.
        m:  the running maximum of the logits (no gradient flows through it).
        a, b, hc: the query coefficients a_t = gh_t / E~_t, b_t = (g1_t - gh_t) / n_t and
            hc_t = b_t (sb0_j - sbar_t) + (g0_t - gh_t) / n_t (the c_t of docs/method.md, re-centred).
    Per chunk, (B, H, N):
        m0, m1:   the running maximum at each chunk's start and end (no gradient).
        sb0, sb1: the running mean of the logits at each chunk's start and end.
    """

    s: torch.Tensor
    m: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    hc: torch.Tensor
    m0: torch.Tensor
    m1: torch.Tensor
    sb0: torch.Tensor
    sb1: torch.Tensor

    # The fields in order (plain tuples: torch.compile traces them, not dataclasses.fields of a class).
    PER_TOKEN = ("s", "m", "a", "b", "hc")
    PER_CHUNK = ("m0", "m1", "sb0", "sb1")
    NAMES = PER_TOKEN + PER_CHUNK
    NO_GRADIENT = ("m", "m0", "m1")

    def tensors(self) -> tuple:
        return tuple(getattr(self, n) for n in self.NAMES)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ChunkScalars":
        return ChunkScalars(*(fn(x) for x in self.tensors()))

    def detach_maxima(self) -> "ChunkScalars":
        """The maxima detached (they choose reference points; no gradient flows through them)."""
        return ChunkScalars(*(x.detach() if n in self.NO_GRADIENT else x for n, x in zip(self.NAMES, self.tensors())))

    def check(self, B: int, H: int, T: int, N: int, where: str) -> None:
        """Raise a ValueError naming the first field whose shape is not (B, H, T) / (B, H, N)."""
        for names, shape in ((self.PER_TOKEN, (B, H, T)), (self.PER_CHUNK, (B, H, N))):
            for n in names:
                if tuple(getattr(self, n).shape) != shape:
                    raise ValueError(f"{where}: {n} must have shape {shape}, got {tuple(getattr(self, n).shape)}")


@dataclass(frozen=True)
class CoreLayout:
    """Where a chunk core's chunks start and end their states (the core's view of ops.py's chunk layout).

    chunk_load: (B, N) int, -1 = continue from the previous chunk of the row, else the row of
        start_states the chunk starts from (chunk_load[:, 0] >= 0).
    chunk_store: (B, N) int, -1, or the row of out_states that receives the state after the chunk.
    num_out_states: rows of out_states. chunk_size: C (T = N C).
    plan: (chunk_load, chunk_store) as host lists when the caller knows them (no device sync, and
        torch.compile traces one graph), else None (read from the tensors once).
    segments: (B, T) int, the sequence of each position when a chunk may hold several (the shared
        layout of training), else None. Then the weights are block-diagonal across sequences, only a
        chunk's first sequence reads its start state, only its last one writes the state after it,
        and a chunk in which a sequence starts drops the state it started from.
    out_dtype: the dtype of o, or None for the accumulation dtype (float32; the fused core writes the
        model's 16-bit dtype directly when asked, the PyTorch core ignores it).
    """

    chunk_load: torch.Tensor
    chunk_store: torch.Tensor
    num_out_states: int
    chunk_size: int
    plan: Optional[tuple] = None
    segments: Optional[torch.Tensor] = None
    out_dtype: Optional[torch.dtype] = None

    def host_plan(self) -> tuple:
        """(chunk_load, chunk_store) as lists of lists (from ``plan``, or read back from the device)."""
        return self.plan if self.plan is not None else (self.chunk_load.tolist(), self.chunk_store.tolist())

    @property
    def num_loads(self) -> int:
        """How many chunks load a start state."""
        if self.plan is not None:
            return sum(x >= 0 for row in self.plan[0] for x in row)
        return int((self.chunk_load >= 0).sum())


# The flat convention: q, k, v, the ChunkScalars fields in order, start_states, then these layout fields;
# plan and segments by keyword.
_LAYOUT_POSITIONAL = ("chunk_load", "chunk_store", "num_out_states", "chunk_size")
_NUM_SCALARS = len(ChunkScalars.NAMES)
NUM_FLAT = 3 + _NUM_SCALARS + 1 + len(_LAYOUT_POSITIONAL)


def flatten(q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout) -> tuple[tuple, dict]:
    """(args, kwargs) of the flat convention (out_dtype only when set)."""
    args = (q, k, v, *scalars.tensors(), start_states, *(getattr(layout, n) for n in _LAYOUT_POSITIONAL))
    kwargs = {"plan": layout.plan, "segments": layout.segments}
    if layout.out_dtype is not None:
        kwargs["out_dtype"] = layout.out_dtype
    return args, kwargs


def unflatten(args, plan=None, segments=None, out_dtype=None):
    """The inverse of ``flatten``: (q, k, v, scalars, start_states, layout)."""
    if len(args) != NUM_FLAT:
        raise TypeError(f"a chunk core takes {NUM_FLAT} positional arguments (q, k, v, "
                        f"{', '.join(ChunkScalars.NAMES)}, start_states, "
                        f"{', '.join(_LAYOUT_POSITIONAL)}), got {len(args)}")
    q, k, v = args[:3]
    scalars = ChunkScalars(*args[3:3 + _NUM_SCALARS])
    start_states = args[3 + _NUM_SCALARS]
    layout = CoreLayout(*args[4 + _NUM_SCALARS:], plan=plan, segments=segments, out_dtype=out_dtype)
    return q, k, v, scalars, start_states, layout


def flat_entry(core: Callable) -> Callable:
    """The flat-convention entry of a typed core ``core(q, k, v, scalars, start_states, layout)``."""

    def entry(*args, plan: Optional[tuple] = None, segments: Optional[torch.Tensor] = None,
              out_dtype: Optional[torch.dtype] = None):
        return core(*unflatten(args, plan, segments, out_dtype))

    entry.__name__, entry.__qualname__ = core.__name__ + "_flat", core.__qualname__ + "_flat"
    entry.__doc__ = (f"``{core.__name__}`` in the flat convention of ops_contract.py: (q, k, v, s, m, a, b, hc, m0, m1, "
                     "sb0, sb1, start_states, chunk_load, chunk_store, num_out_states, chunk_size, plan=None, "
                     "segments=None, out_dtype=None).")
    return entry


def call_flat(core: Callable, q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout):
    """Call a flat-convention core (a ``flat_entry``) with typed inputs."""
    args, kwargs = flatten(q, k, v, scalars, start_states, layout)
    return core(*args, **kwargs)
