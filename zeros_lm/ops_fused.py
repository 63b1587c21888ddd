"""Fused Triton kernels for the chunk core of ZeroS (the work ``zeros_attention(mode="fused")`` does per chunk).

    o, out_states = fused_chunk_core(q, k, v, scalars, start_states, layout)

The contract (``ChunkScalars``, ``CoreLayout``) and its math are in ``ops_contract.py``; the caller
(``ops.py``) prepares the per-token scalars in PyTorch and lays the tokens out chunk by chunk (T = N C,
padding with k = v = 0). ``chunk_core_fused`` is the same core in the flat convention of the contract.
The arguments become plain tensors only at the ``torch.library`` custom ops below.

Kernels (one program per (batch row x head) or per (chunk, batch row x head)):
- ``_states_fwd_kernel``: sequential over the chunks of a row; records the float32 state at each
  chunk start (for the output kernel; the backward recomputes it rather than keep it alive).
- ``_output_fwd_kernel``: parallel over chunks; Q K^T in the input dtype (float32 accumulation),
  the (C, C) weights R formed in float32 and multiplied in, times V; plus the readout of the chunk's
  start state with float32 products (its a/b/hc combination cancels when the logits are nearly uniform).
- ``_states_bwd_kernel``: the reverse recurrence of the state gradients (``out_states`` gradients
  enter where a chunk stores, loaded chunks hand theirs to ``start_states``).
- ``_chunk_bwd_q_kernel`` then ``_chunk_bwd_kv_kernel``: parallel over chunks; the query side (dq, da, db,
  dhc, dsb0) and the key / value side (dk, dv), each adding its share of ds and dsb1.

Precision: products of two input-dtype tensors (Q K^T) use tensor cores; a float32 weight matrix
(the (C, C) weights, formed in float32) times an input-dtype tensor is rounded, row-scaled, to the
input dtype: a relative error of each weight, never a difference of rounded sums. Every product that
touches a state, a gradient of the output or a cancelling combination is float32-grade
(``FLOAT32_DOT``), and so is every product for float32 inputs.

Triton is optional: this module imports without it (``HAS_TRITON`` is then False and the entry
raises). With TRITON_INTERPRET=1 in the environment before Triton is first imported (transformers
imports it early, through torch._dynamo), the kernels run in Triton's interpreter on CPU tensors
(slow; for tests without a GPU); bfloat16 is computed in float32 there (the interpreter gets it wrong).
"""

import dataclasses
import re
from typing import Optional

import torch

from .ops_contract import MIN_KERNEL_CHUNK, NO_MAX, ChunkScalars, CoreLayout, flat_entry, is_kernel_chunk

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU installs without Triton: the other modes of ops.py keep working
    triton = tl = None
    HAS_TRITON = False

__all__ = ["chunk_core_fused", "fused_chunk_core", "zeros_chunk_fused", "fused_scalars", "rope_normalize_fused",
           "deviation_logits_fused", "HAS_TRITON", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "MIN_CHUNK_SIZE"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The output and backward kernels hold a whole (C, d_k) tile (Q K^T sums over d_k).
MAX_HEAD_DIM = 128
# tl.dot needs every dimension >= 16 on a GPU; tl.arange needs powers of two (ops_contract.is_kernel_chunk).
MIN_CHUNK_SIZE = MIN_KERNEL_CHUNK
_MIN_BLOCK = 16
# Tiles, as flash-linear-attention's chunk kernels: at d = 64 the states kernels hold one 64 x 64 tile
# per head (d_k and d_v blocks of STATE_TILE) and the output kernel forms Q K^T once per chunk (a whole
# d_k, d_v blocks of STATE_TILE); the per-chunk backward kernels hold a whole d_k and loop over d_v in
# blocks of CHUNK_BWD_BLOCK_V. Chosen without a GPU to time them, from compiling for sm_90 (Triton's
# ahead-of-time compiler, benchmarks/kernel_stats.py): no register spills at d = 64, C = 64, bf16, within
# A100's shared memory. On a GPU the states and output kernels autotune their d_v block and warps among
# AUTOTUNE_BLOCK_V x AUTOTUNE_WARPS (Triton autotunes only with a driver: the interpreter runs the
# defaults below).
STATE_TILE = 64
CHUNK_BWD_BLOCK_V = 16
_STATES_LAUNCH = dict(num_warps=8, num_stages=2)
_OUTPUT_LAUNCH = dict(num_warps=8, num_stages=2)
# The per-chunk backward: 8 warps, no software pipelining of its d_v loop (that would multiply its
# shared memory).
_CHUNK_BWD_LAUNCH = dict(num_warps=8, num_stages=1)
# The scalars kernels: 8 warps (4 spill with packed sequences, valid maps and incoming states).
_SCALARS_LAUNCH = dict(num_warps=8)
AUTOTUNE_BLOCK_V = (32, 64)
AUTOTUNE_WARPS = (4, 8)
AUTOTUNE_STAGES = 2
# The products that must be float32-grade (states, readouts, output gradients): tl.dot's
# input_precision. "tf32x3" (three TF32 tensor-core products, about float32's accuracy) or "ieee"
# (CUDA-core FMAs). The interpreter computes both in float32.
FLOAT32_DOT = "tf32x3"
# The kernels' integer (not pointer, not constexpr) arguments, by name (benchmarks/kernel_stats.py builds
# their signatures from it).
INT_ARGS = frozenset(("T", "H", "N", "u_sb", "u_st", "u_sh", "T_in", "L", "S_in", "S_out", "R", "x_sb", "x_st", "x_sj", "x_sh", "c_sb", "c_st",
                      "s_sb", "s_st") + tuple(f"{x}_{s}" for x in ("s", "g1", "gh", "g0") for s in ("sb", "st", "sh")))
# Rows of d channels per program of the RoPE + L2 norm kernels.
ROPE_ROWS = 16


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors) rather than compiled (CUDA)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_output_fwd_kernel, InterpretedFunction)


def _interpreter_consistent() -> bool:
    """False when Triton was imported before TRITON_INTERPRET=1 was set: its own helpers (tl.zeros)
    are then compiled functions that the interpreter cannot call."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction) == _interpreting()


if HAS_TRITON:

    _NO_MAX_K = tl.constexpr(NO_MAX)
    _NORM_EPS_K = tl.constexpr(1e-12)  # F.normalize's default floor of the norm (the PyTorch path's)

    @triton.jit
    def _weights_dot(w, x, LOWP: tl.constexpr, F32: tl.constexpr):
        """w (M, L) float32 weights times x (L, N): float32 (M, N).

        With LOWP (16-bit x) each row of w is scaled to max |w| = 1 and rounded to x's dtype (tensor
        cores): a relative error of each weight. Unscaled, the small weights of nearly uniform logits
        (~0.01 / t) would fall into fp16's subnormals within a few hundred tokens.
        """
        if LOWP and x.dtype != tl.float32:  # (a float32 x: do of a float32 o, say)
            scale = tl.max(tl.abs(w), axis=1)
            scale = tl.where(scale > 0, scale, 1.0)
            return tl.dot((w / scale[:, None]).to(x.dtype), x) * scale[:, None]
        else:
            return tl.dot(w, x.to(tl.float32), input_precision=F32)

    @triton.jit
    def _state_dot(x, S, LOWP: tl.constexpr, F32: tl.constexpr):
        """x (M, K) in the inputs' dtype times a float32 state tile S (K, N): (M, N) float32, float32-grade.

        The readout's products: the coefficients (a, b, hc) multiply the result afterwards, in float32, so
        that its cancelling combination never meets a rounded product of a scaled query. With LOWP (16-bit
        x, used exactly) S is split into a high and a low part in x's dtype, S = hi + lo + O(2^-16 S) for
        bfloat16: two tensor-core products instead of tf32x3's three (which also splits x, holding both
        halves of both operands in registers). For float16, whose range is narrow, the split is of S
        divided by its largest magnitude (multiplied back after the products). Float32 x: tl.dot at F32.
        """
        if LOWP and x.dtype != tl.float32:  # (a float32 x: do of a float32 o, say)
            if x.dtype == tl.float16:
                scale = tl.max(tl.max(tl.abs(S), axis=1), axis=0)
                scale = tl.where(scale > 0, scale, 1.0)
                S = S / scale
            hi = S.to(x.dtype)
            lo = (S - hi.to(tl.float32)).to(x.dtype)
            out = tl.dot(x, lo, tl.dot(x, hi))
            if x.dtype == tl.float16:
                out = out * scale
            return out
        else:
            return tl.dot(x.to(tl.float32), S, input_precision=F32)

    @triton.jit
    def _exact_dot(x, y, LOWP: tl.constexpr, F32: tl.constexpr):
        """x (M, K) times y (K, N), both in the inputs' dtype: float32 (M, N). 16-bit operands multiply
        exactly on tensor cores (float32 sums), so nothing is split; float32 operands get F32 products (as
        when one of them is float32: do of a float32 o, say)."""
        if LOWP and x.dtype == y.dtype and x.dtype != tl.float32:
            return tl.dot(x, y)
        else:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=F32)

    @triton.jit
    def _chunk_segments(seg, i_b, j, T, C: tl.constexpr):
        """Packed sequences sharing chunk j of row i_b (seg (B, T) int32, each position's sequence):
        writers (C,) the positions of the chunk's last sequence (the only ones the state after the chunk
        holds), kept (int32 0 / 1) whether the whole chunk is one sequence (else the state it started
        from is dropped: the sequences after the first start empty)."""
        row = seg + i_b * T + j * C
        last = tl.load(row + C - 1)
        return tl.load(row + tl.arange(0, C)) == last, (tl.load(row) == last).to(tl.int32)

    @triton.jit
    def _chunk_mask(seg, i_b, j, T, C: tl.constexpr, o_c, HAS_SEG: tl.constexpr):
        """Chunk j's (C, C) mask of the weights: causal; with packed sequences also block-diagonal."""
        inside = o_c[:, None] >= o_c[None, :]
        if HAS_SEG:
            seg_c = tl.load(seg + i_b * T + j * C + o_c)
            inside = inside & (seg_c[:, None] == seg_c[None, :])
        return inside

    @triton.jit
    def _chunk_readout(seg, i_b, j, T, C: tl.constexpr, o_c, m0_j, m_c, HAS_SEG: tl.constexpr):
        """How chunk j's queries read its start state: decay (C,) exp(m0 - m) and reader (C,) 1.0, both 0
        for the queries of any sequence but the chunk's first (the exponent masked before exp too)."""
        if HAS_SEG:
            readers = tl.load(seg + i_b * T + j * C + o_c) == tl.load(seg + i_b * T + j * C)
            decay = tl.where(readers, tl.exp(tl.where(readers, m0_j - m_c, 0.0)), 0.0)
            reader = readers.to(tl.float32)
        else:
            decay = tl.exp(m0_j - m_c)
            reader = tl.full([C], 1.0, tl.float32)
        return decay, reader

    @triton.jit
    def _states_fwd_kernel(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, kv_starts,
                           out_states, seg, T, H, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, STORE_OUT: tl.constexpr, F32: tl.constexpr,
                           HAS_SEG: tl.constexpr, HAS_START: tl.constexpr = True, LOWP: tl.constexpr = False):
        """Grid (d_k blocks, d_v blocks, B H). Writes the state at each chunk start to kv_starts (B, H, N, 3, K, V).
        Without HAS_START every loading chunk starts from zero states (start_states is not read)."""
        i_k = tl.program_id(0)
        i_v = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, C)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k = o_k < K
        mask_v = o_v < V
        mask_kv = mask_k[:, None] & mask_v[None, :]
        kv_off = o_k[:, None] * V + o_v[None, :]
        zero_kv = tl.zeros([BK, BV], dtype=tl.int32)
        KV = K * V
        F = tl.zeros([BK, BV], dtype=tl.float32)
        G = tl.zeros([BK, BV], dtype=tl.float32)
        Hs = tl.zeros([BK, BV], dtype=tl.float32)
        for j in range(N):
            ld = tl.load(chunk_load + i_b * N + j)
            loads = (zero_kv + ld) >= 0      # a block, not a scalar: the interpreter wants block masks
            if HAS_START:
                src = start_states + (tl.maximum(ld, 0).to(tl.int64) * H + i_h) * 3 * KV + kv_off
                F = tl.where(loads, tl.load(src, mask=mask_kv & loads, other=0.0), F)
                G = tl.where(loads, tl.load(src + KV, mask=mask_kv & loads, other=0.0), G)
                Hs = tl.where(loads, tl.load(src + 2 * KV, mask=mask_kv & loads, other=0.0), Hs)
            else:
                F = tl.where(loads, 0.0, F)
                G = tl.where(loads, 0.0, G)
                Hs = tl.where(loads, 0.0, Hs)
            dst = kv_starts + (i_bh * N + j) * 3 * KV + kv_off
            tl.store(dst, F, mask=mask_kv)
            tl.store(dst + KV, G, mask=mask_kv)
            tl.store(dst + 2 * KV, Hs, mask=mask_kv)

            t = j * C + o_c
            k_c = tl.load(k + ((i_b * T + t[:, None]) * H + i_h) * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
            v_c = tl.load(v + ((i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], mask=mask_v[None, :], other=0.0)
            v_f = v_c.to(tl.float32)
            s_c = tl.load(s + i_bh * T + t)
            p = i_bh * N + j
            m0_j = tl.load(m0 + p)
            m1_j = tl.load(m1 + p)
            sb0_j = tl.load(sb0 + p)
            sb1_j = tl.load(sb1 + p)
            if HAS_SEG:  # only the chunk's last sequence writes; a sequence start drops the carried state
                writers, kept = _chunk_segments(seg, i_b, j, T, C)
                keep = (zero_kv + kept) > 0
                k_c = tl.where(writers[:, None], k_c, 0.0)
                F = tl.where(keep, tl.exp(tl.where(keep, m0_j - m1_j, 0.0)) * F, 0.0)
                G = tl.where(keep, G + (sb0_j - sb1_j) * Hs, 0.0)
                Hs = tl.where(keep, Hs, 0.0)
            else:
                F = tl.exp(m0_j - m1_j) * F
                G = G + (sb0_j - sb1_j) * Hs
            # k as it is times the float32 (weight x v), split (see _state_dot); K^T V exactly.
            k_t = tl.trans(k_c)
            F += _state_dot(k_t, v_f * tl.exp(tl.minimum(s_c - m1_j, 0.0))[:, None], LOWP, F32)
            G += _state_dot(k_t, v_f * (s_c - sb1_j)[:, None], LOWP, F32)
            Hs += _exact_dot(k_t, v_c, LOWP, F32)
            if STORE_OUT:
                st = tl.load(chunk_store + i_b * N + j)
                stores = (zero_kv + st) >= 0
                dst = out_states + (tl.maximum(st, 0).to(tl.int64) * H + i_h) * 3 * KV + kv_off
                tl.store(dst, F, mask=mask_kv & stores)
                tl.store(dst + KV, G, mask=mask_kv & stores)
                tl.store(dst + 2 * KV, Hs, mask=mask_kv & stores)

    @triton.jit
    def _output_fwd_kernel(q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, o, seg, T, H, N, K: tl.constexpr,
                           V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           DOT_PREC: tl.constexpr, LOWP: tl.constexpr, F32: tl.constexpr, HAS_SEG: tl.constexpr):
        """Grid (d_v blocks, N, B H). o (B, T, H, V) float32."""
        i_v = tl.program_id(0)
        i_n = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, C)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k = o_k < K
        mask_v = o_v < V
        mask_kv = mask_k[:, None] & mask_v[None, :]
        KV = K * V
        t = i_n * C + o_c
        row = (i_b * T + t[:, None]) * H + i_h
        q_c = tl.load(q + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
        k_c = tl.load(k + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
        v_c = tl.load(v + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0)
        tok = i_bh * T + t
        s_c = tl.load(s + tok)
        m_c = tl.load(m + tok)
        a_c = tl.load(a + tok)
        b_c = tl.load(b + tok)
        hc_c = tl.load(hc + tok)
        m0_j = tl.load(m0 + i_bh * N + i_n)
        sb0_j = tl.load(sb0 + i_bh * N + i_n)

        # Inside the chunk: ((Q K^T) * R) V with R in float32, causal.
        qk = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PREC)
        r = (a_c[:, None] * tl.exp(tl.minimum(s_c[None, :] - m_c[:, None], 0.0))
             + b_c[:, None] * (s_c - sb0_j)[None, :] + hc_c[:, None])
        decay, reader = _chunk_readout(seg, i_b, i_n, T, C, o_c, m0_j, m_c, HAS_SEG)
        alpha, b_r, hc_r = a_c * decay, b_c * reader, hc_c * reader
        w = tl.where(_chunk_mask(seg, i_b, i_n, T, C, o_c, HAS_SEG), qk * r, 0.0)
        acc = _weights_dot(w, v_c, LOWP, F32)

        # Before the chunk: the start state, read with float32-grade products, the coefficients applied after
        # them (a F + b G + hc H cancels for nearly uniform logits).
        src = kv_starts + (i_bh * N + i_n) * 3 * KV + o_k[:, None] * V + o_v[None, :]
        acc += alpha[:, None] * _state_dot(q_c, tl.load(src, mask=mask_kv, other=0.0), LOWP, F32)
        acc += b_r[:, None] * _state_dot(q_c, tl.load(src + KV, mask=mask_kv, other=0.0), LOWP, F32)
        acc += hc_r[:, None] * _state_dot(q_c, tl.load(src + 2 * KV, mask=mask_kv, other=0.0), LOWP, F32)
        tl.store(o + row * V + o_v[None, :], acc, mask=mask_v[None, :])

    @triton.jit
    def _states_bwd_kernel(q, do, m, a, b, hc, m0, m1, sb0, sb1, chunk_load, chunk_store, load_slot, d_out,
                           dkv_ends, d_starts, seg, T, H, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr, HAS_SEG: tl.constexpr,
                           HAS_START: tl.constexpr = True, LOAD_DOUT: tl.constexpr = True,
                           LOWP: tl.constexpr = False):
        """Grid (d_k blocks, d_v blocks, B H). Writes the gradient of the state after each chunk to
        dkv_ends (B, H, N, 3, K, V) and that of each loaded start state to d_starts (loads, H, 3, K, V)."""
        i_k = tl.program_id(0)
        i_v = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, C)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k = o_k < K
        mask_v = o_v < V
        mask_kv = mask_k[:, None] & mask_v[None, :]
        kv_off = o_k[:, None] * V + o_v[None, :]
        zero_kv = tl.zeros([BK, BV], dtype=tl.int32)
        KV = K * V
        # Gradient of the state at the start of the next chunk, if that chunk continues this one.
        dF = tl.zeros([BK, BV], dtype=tl.float32)
        dG = tl.zeros([BK, BV], dtype=tl.float32)
        dH = tl.zeros([BK, BV], dtype=tl.float32)
        for jj in range(N):
            j = N - 1 - jj
            if LOAD_DOUT:  # (else no stored state has a gradient)
                st = tl.load(chunk_store + i_b * N + j)
                stores = (zero_kv + st) >= 0
                src = d_out + (tl.maximum(st, 0).to(tl.int64) * H + i_h) * 3 * KV + kv_off
                dF += tl.load(src, mask=mask_kv & stores, other=0.0)
                dG += tl.load(src + KV, mask=mask_kv & stores, other=0.0)
                dH += tl.load(src + 2 * KV, mask=mask_kv & stores, other=0.0)
            dst = dkv_ends + (i_bh * N + j) * 3 * KV + kv_off
            tl.store(dst, dF, mask=mask_kv)
            tl.store(dst + KV, dG, mask=mask_kv)
            tl.store(dst + 2 * KV, dH, mask=mask_kv)

            t = j * C + o_c
            row = (i_b * T + t[:, None]) * H + i_h
            q_c = tl.load(q + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
            do_c = tl.load(do + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
            tok = i_bh * T + t
            m_c = tl.load(m + tok)
            p = i_bh * N + j
            m0_j = tl.load(m0 + p)
            m1_j = tl.load(m1 + p)
            decay, reader = _chunk_readout(seg, i_b, j, T, C, o_c, m0_j, m_c, HAS_SEG)
            alpha, b_r, hc_r = tl.load(a + tok) * decay, tl.load(b + tok) * reader, tl.load(hc + tok) * reader
            # Transposed transition (none where a sequence starts in the chunk), then what the chunk's own
            # readout of its start state adds.
            if HAS_SEG:
                _, kept = _chunk_segments(seg, i_b, j, T, C)
                keep = (zero_kv + kept) > 0
                dH = tl.where(keep, dH + (tl.load(sb0 + p) - tl.load(sb1 + p)) * dG, 0.0)
                dF = tl.where(keep, tl.exp(tl.where(keep, m0_j - m1_j, 0.0)) * dF, 0.0)
                dG = tl.where(keep, dG, 0.0)
            else:
                dH += (tl.load(sb0 + p) - tl.load(sb1 + p)) * dG
                dF = tl.exp(m0_j - m1_j) * dF
            q_t = tl.trans(q_c)   # (as it is, times the float32 (coefficient x do), split: see _state_dot)
            dF += _state_dot(q_t, do_c * alpha[:, None], LOWP, F32)
            dG += _state_dot(q_t, do_c * b_r[:, None], LOWP, F32)
            dH += _state_dot(q_t, do_c * hc_r[:, None], LOWP, F32)

            ld = tl.load(chunk_load + i_b * N + j)
            loads = (zero_kv + ld) >= 0
            if HAS_START:  # (without start states, nothing receives their gradient)
                dst = d_starts + (tl.maximum(tl.load(load_slot + i_b * N + j), 0).to(tl.int64) * H + i_h) * 3 * KV \
                    + kv_off
                tl.store(dst, dF, mask=mask_kv & loads)
                tl.store(dst + KV, dG, mask=mask_kv & loads)
                tl.store(dst + 2 * KV, dH, mask=mask_kv & loads)
            dF = tl.where(loads, 0.0, dF)
            dG = tl.where(loads, 0.0, dG)
            dH = tl.where(loads, 0.0, dH)

    @triton.jit
    def _chunk_operands(q, k, s, m, a, b, hc, T, H, N, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
        """The per-chunk backward kernels' common operands, grid (N, B H): the chunk's offsets (o_c, o_k,
        mask_k; row (C, 1) and tok (C,) index the (B, T, H, d) and (B, H, T) tensors, p the (B, H, N) ones),
        its q and k tiles (C, BK) in their dtype and its per-token scalars (C,); first the chunk i_n and row
        i_b it works on."""
        i_n = tl.program_id(0)
        i_bh = tl.program_id(1).to(tl.int64)
        o_c = tl.arange(0, C)
        o_k = tl.arange(0, BK)
        mask_k = o_k < K
        t = i_n * C + o_c
        row = ((i_bh // H) * T + t[:, None]) * H + i_bh % H
        q_c = tl.load(q + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
        k_c = tl.load(k + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
        tok = i_bh * T + t
        return (i_n, i_bh // H, o_c, o_k, mask_k, row, tok, i_bh * N + i_n, q_c, k_c, tl.load(s + tok), tl.load(m + tok),
                tl.load(a + tok), tl.load(b + tok), tl.load(hc + tok))

    @triton.jit
    def _value_block(v, do, row, v0, mask_k, V: tl.constexpr, BV: tl.constexpr):
        """The d_v block [v0, v0 + BV) of the per-chunk backward kernels' loop: its offsets o_v and mask
        (BV,), the (d_k, BV) mask of state tiles, the chunk's v and do tiles (C, BV) in their dtype."""
        o_v = v0 + tl.arange(0, BV)
        mask_v = o_v < V
        v_raw = tl.load(v + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0)
        do_raw = tl.load(do + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0)
        return o_v, mask_v, mask_k[:, None] & mask_v[None, :], v_raw, do_raw

    @triton.jit
    def _chunk_bwd_q_kernel(q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, dkv_ends, do, dq, da, db, dhc, ds, dsb0,
                            dsb1, seg, T, H, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, DOT_PREC: tl.constexpr, LOWP: tl.constexpr, F32: tl.constexpr,
                            HAS_SEG: tl.constexpr):
        """Grid (N, B H), the query side of the per-chunk backward: dq, the gradients of a, b, hc, the part
        of ds that comes through the chunk's own weights, and the transition's share of dsb0 / dsb1.
        The whole d_k per program, d_v in blocks of BV (a loop). Gradients in float32."""
        i_n, i_b, o_c, o_k, mask_k, row, tok, p, q_c, k_c, s_c, m_c, a_c, b_c, hc_c = _chunk_operands(
            q, k, s, m, a, b, hc, T, H, N, K, C, BK)
        KV = K * V
        q_f = q_c.to(tl.float32)
        m0_j = tl.load(m0 + p)
        sb0_j = tl.load(sb0 + p)
        inside = _chunk_mask(seg, i_b, i_n, T, C, o_c, HAS_SEG)
        decay, reader = _chunk_readout(seg, i_b, i_n, T, C, o_c, m0_j, m_c, HAS_SEG)

        # Sums over d_v, block by block: do v^T, and the readout of the start state (float32).
        dov = tl.zeros([C, C], dtype=tl.float32)
        dq_c = tl.zeros([C, BK], dtype=tl.float32)
        read_F = tl.zeros([C], dtype=tl.float32)     # q_t^T F do_t, and likewise for G and H
        read_G = tl.zeros([C], dtype=tl.float32)
        read_H = tl.zeros([C], dtype=tl.float32)
        shift_k = tl.zeros([BK], dtype=tl.float32)   # <dG', H> row sums: the gradient of sb0 - sb1
        for v0 in range(0, V, BV):
            o_v, mask_v, mask_kv, v_raw, do_raw = _value_block(v, do, row, v0, mask_k, V, BV)
            do_c = do_raw.to(tl.float32)
            kv_off = o_k[:, None] * V + o_v[None, :]
            start = kv_starts + p * 3 * KV + kv_off
            F0 = tl.load(start, mask=mask_kv, other=0.0)
            G0 = tl.load(start + KV, mask=mask_kv, other=0.0)
            H0 = tl.load(start + 2 * KV, mask=mask_kv, other=0.0)
            dG = tl.load(dkv_ends + p * 3 * KV + KV + kv_off, mask=mask_kv, other=0.0)
            dov += _exact_dot(do_raw, tl.trans(v_raw), LOWP, F32)
            # The readout's gradients cancel as the readout does: state products first, coefficients after.
            dq_c += (a_c * decay)[:, None] * _state_dot(do_raw, tl.trans(F0), LOWP, F32)
            dq_c += (b_c * reader)[:, None] * _state_dot(do_raw, tl.trans(G0), LOWP, F32)
            dq_c += (hc_c * reader)[:, None] * _state_dot(do_raw, tl.trans(H0), LOWP, F32)
            read_F += tl.sum(_state_dot(q_c, F0, LOWP, F32) * do_c, axis=1)
            read_G += tl.sum(_state_dot(q_c, G0, LOWP, F32) * do_c, axis=1)
            read_H += tl.sum(_state_dot(q_c, H0, LOWP, F32) * do_c, axis=1)
            shift_k += tl.sum(dG * H0, axis=1)

        # With D[t, i] = (q_t . k_i)(do_t . v_i), the gradient of R[t, i] (Q K^T formed only now: one (C, C)
        # tile fewer alive through the loop).
        qk = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PREC)
        centred = s_c - sb0_j
        diff = s_c[None, :] - m_c[:, None]
        e = tl.exp(tl.minimum(diff, 0.0))
        r = a_c[:, None] * e + b_c[:, None] * centred[None, :] + hc_c[:, None]
        D = tl.where(inside, qk * dov, 0.0)
        rdov = tl.where(inside, r * dov, 0.0)
        dq_c += _weights_dot(rdov, k_c, LOWP, F32)
        tl.store(dq + row * K + o_k[None, :], dq_c, mask=mask_k[None, :])

        # Scalar gradients. min(x, 0) passes the gradient where x <= 0 (as torch.clamp does).
        tl.store(da + tok, tl.sum(D * e, axis=1) + decay * read_F)
        tl.store(db + tok, tl.sum(D * centred[None, :], axis=1) + reader * read_G)
        tl.store(dhc + tok, tl.sum(D, axis=1) + reader * read_H)
        tl.store(ds + tok, tl.sum(D * tl.where(diff <= 0.0, a_c[:, None] * e, 0.0), axis=0)
                 + tl.sum(D * b_c[:, None], axis=0))
        shift = tl.sum(shift_k, axis=0)
        if HAS_SEG:  # no transition (so no shift) where a sequence starts in the chunk
            shift = shift * _chunk_segments(seg, i_b, i_n, T, C)[1]
        tl.store(dsb0 + p, shift - tl.sum(tl.sum(D * b_c[:, None], axis=1), axis=0))
        tl.store(dsb1 + p, -shift)

    @triton.jit
    def _chunk_bwd_kv_kernel(q, k, v, s, m, a, b, hc, m1, sb0, sb1, dkv_ends, do, dk, dv, ds, dsb1, seg, T, H, N,
                             K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             DOT_PREC: tl.constexpr, LOWP: tl.constexpr, F32: tl.constexpr, HAS_SEG: tl.constexpr):
        """Grid (N, B H), the key / value side of the per-chunk backward: dk, dv, and what the keys receive
        through the state after the chunk, added to the ds and dsb1 that _chunk_bwd_q_kernel wrote (it
        runs first). Split from the query side so that neither holds both sides' tiles in registers."""
        i_n, i_b, o_c, o_k, mask_k, row, tok, p, q_c, k_c, s_c, m_c, a_c, b_c, hc_c = _chunk_operands(
            q, k, s, m, a, b, hc, T, H, N, K, C, BK)
        KV = K * V
        m1_j = tl.load(m1 + p)
        sb0_j = tl.load(sb0 + p)
        sb1_j = tl.load(sb1 + p)
        inside = _chunk_mask(seg, i_b, i_n, T, C, o_c, HAS_SEG)
        if HAS_SEG:  # only the keys of the chunk's last sequence are in the state after it
            writers = _chunk_segments(seg, i_b, i_n, T, C)[0]
            k_w = tl.where(writers[:, None], k_c, 0.0).to(k_c.dtype)
        else:
            writers = o_c >= 0
            k_w = k_c

        # W = (Q K^T) * R, as in the forward (R is formed again after the loop below, rather than kept
        # alive through it: fewer (C, C) tiles in registers).
        centred = s_c - sb0_j
        w = (a_c[:, None] * tl.exp(tl.minimum(s_c[None, :] - m_c[:, None], 0.0)) + b_c[:, None] * centred[None, :]
             + hc_c[:, None])
        w = tl.where(inside, w * tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PREC), 0.0)
        e1 = tl.exp(tl.minimum(s_c - m1_j, 0.0))   # the keys' weights in the state after the chunk
        centred1 = s_c - sb1_j

        # Sums over d_v, block by block: do v^T, and what the chunk's keys receive from the gradient of
        # the state after it.
        dov = tl.zeros([C, C], dtype=tl.float32)
        dk_c = tl.zeros([C, BK], dtype=tl.float32)
        key_F = tl.zeros([C], dtype=tl.float32)      # k_i^T dF' v_i, and likewise for G
        key_G = tl.zeros([C], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v, mask_v, mask_kv, v_raw, do_raw = _value_block(v, do, row, v0, mask_k, V, BV)
            v_f = v_raw.to(tl.float32)
            end = dkv_ends + p * 3 * KV + o_k[:, None] * V + o_v[None, :]
            dF = tl.load(end, mask=mask_kv, other=0.0)
            dG = tl.load(end + KV, mask=mask_kv, other=0.0)
            dH = tl.load(end + 2 * KV, mask=mask_kv, other=0.0)
            dov += _exact_dot(do_raw, tl.trans(v_raw), LOWP, F32)
            # v and k as they are times the float32 state gradients (split), the key weights applied after.
            v_w = tl.where(writers[:, None], v_raw, 0.0).to(v_raw.dtype)
            dk_c += e1[:, None] * _state_dot(v_w, tl.trans(dF), LOWP, F32)
            dk_c += centred1[:, None] * _state_dot(v_w, tl.trans(dG), LOWP, F32)
            dk_c += _state_dot(v_w, tl.trans(dH), LOWP, F32)
            kdF = _state_dot(k_w, dF, LOWP, F32)
            kdG = _state_dot(k_w, dG, LOWP, F32)
            dv_c = _weights_dot(tl.trans(w), do_raw, LOWP, F32)
            dv_c += e1[:, None] * kdF + centred1[:, None] * kdG + _state_dot(k_w, dH, LOWP, F32)
            tl.store(dv + row * V + o_v[None, :], dv_c, mask=mask_v[None, :])
            key_F += tl.sum(kdF * v_f, axis=1)
            key_G += tl.sum(kdG * v_f, axis=1)

        r = a_c[:, None] * tl.exp(tl.minimum(s_c[None, :] - m_c[:, None], 0.0)) + b_c[:, None] * centred[None, :] \
            + hc_c[:, None]
        rdov = tl.where(inside, r * dov, 0.0)
        dk_c += _weights_dot(tl.trans(rdov), q_c, LOWP, F32)
        tl.store(dk + row * K + o_k[None, :], dk_c, mask=mask_k[None, :])
        tl.store(ds + tok, tl.load(ds + tok) + tl.where(s_c - m1_j <= 0.0, e1 * key_F, 0.0) + key_G)
        tl.store(dsb1 + p, tl.load(dsb1 + p) - tl.sum(key_G, axis=0))



    # ------------------------------------------------------------------------------------------
    # The per-token scalars (docs/method.md): chunk-local scans with a per-chunk carry
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _chunk_tokens(s, g1, gh, g0, valid, seg, i_b, i_h, j, T_in, L, s_sb, s_st, s_sh, g1_sb, g1_st, g1_sh,
                      gh_sb, gh_st, gh_sh, g0_sb, g0_st, g0_sh, C: tl.constexpr, HAS_G0: tl.constexpr,
                      HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr):
        """Chunk j of row i_b, head i_h: the logits and gates (C,) float32 (0 past T_in), which positions are
        real (val), which belong to the chunk's first sequence (head: they continue the carry), and incl
        (C, C) [t, i]: key i is real, i <= t, same sequence. The inputs are (B', T_in, H) with strides
        *_sb, *_st, *_sh = (batch, token, head)."""
        o_c = tl.arange(0, C)
        t = j * C + o_c
        inb = t < T_in
        s_c = tl.load(s + i_b * s_sb + t * s_st + i_h * s_sh, mask=inb, other=0.0).to(tl.float32)
        g1_c = tl.load(g1 + i_b * g1_sb + t * g1_st + i_h * g1_sh, mask=inb, other=0.0).to(tl.float32)
        gh_c = tl.load(gh + i_b * gh_sb + t * gh_st + i_h * gh_sh, mask=inb, other=0.0).to(tl.float32)
        if HAS_G0:
            g0_c = tl.load(g0 + i_b * g0_sb + t * g0_st + i_h * g0_sh, mask=inb, other=0.0).to(tl.float32)
        else:
            g0_c = tl.zeros([C], dtype=tl.float32)
        if HAS_VALID:
            val = inb & (tl.load(valid + i_b * L + t, mask=t < L, other=0) != 0)
        else:
            val = inb
        incl = (o_c[None, :] <= o_c[:, None]) & val[None, :]
        if HAS_SEG:
            seg_c = tl.load(seg + i_b * L + t)
            incl = incl & (seg_c[:, None] == seg_c[None, :])
            head = seg_c == tl.load(seg + i_b * L + j * C)
        else:
            head = o_c >= 0
        return o_c, t, inb, s_c, g1_c, gh_c, g0_c, val, incl, head

    @triton.jit
    def _scalars_fwd_kernel(s, g1, gh, g0, valid, seg, stats_in, chunk_load, chunk_store, tok, chunk, stats_out,
                            T_in, L, H, N, S_in, S_out, s_sb, s_st, s_sh, g1_sb, g1_st, g1_sh, gh_sb, gh_st, gh_sh,
                            g0_sb, g0_st, g0_sh, C: tl.constexpr, HAS_G0: tl.constexpr, HAS_VALID: tl.constexpr,
                            HAS_SEG: tl.constexpr, HAS_STATE: tl.constexpr, STORE_OUT: tl.constexpr):
        """Grid (B' H,): one program per row and head, sequential over its N chunks, a scan inside each chunk
        (as (C, C) masked sums: no sequential rounding inside a chunk) and a carry (n, sbar, m, E~) between
        them. Writes tok (8, B', H, L) = [s, m, a, b, hc, E~, sbar, n] and chunk (4, B', H, N) = [m0, m1,
        sb0, sb1]; stats_out (4, S_out, H) = [E~, m, sbar, n] after each stored sequence.

        sbar is centred on the carried mean (or on the sequence's first logit): the sums are of deviations.
        E~_t = E~_c exp(m_c - m_t) + sum_i exp(s_i - m_t): every exponent <= 0.
        """
        i_bh = tl.program_id(0).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        TOK = tl.num_programs(0).to(tl.int64) * L    # B' H L: one slot of tok
        CH = tl.num_programs(0).to(tl.int64) * N              # B' H N: one slot of chunk
        row_t = i_bh * L
        row_n = i_bh * N
        n_c = tl.zeros([], dtype=tl.float32)
        sb_c = tl.zeros([], dtype=tl.float32)
        m_c = tl.full([], _NO_MAX_K, tl.float32)
        E_c = tl.zeros([], dtype=tl.float32)
        for j in range(N):
            o_c, t, inb, s_c, g1_c, gh_c, g0_c, val, incl, head = _chunk_tokens(
                s, g1, gh, g0, valid, seg, i_b, i_h, j, T_in, L, s_sb, s_st, s_sh, g1_sb, g1_st, g1_sh,
                gh_sb, gh_st, gh_sh, g0_sb, g0_st, g0_sh, C, HAS_G0, HAS_VALID, HAS_SEG)
            ld = tl.load(chunk_load + i_b * N + j)
            loads = ld >= 0
            if HAS_STATE:
                src = stats_in + tl.maximum(ld, 0).to(tl.int64) * H + i_h
                SIN = S_in * H
                E_c = tl.where(loads, tl.load(src), E_c)
                m_c = tl.where(loads, tl.load(src + SIN), m_c)
                sb_c = tl.where(loads, tl.load(src + 2 * SIN), sb_c)
                n_c = tl.where(loads, tl.load(src + 3 * SIN), n_c)
            else:
                E_c = tl.where(loads, 0.0, E_c)
                m_c = tl.where(loads, _NO_MAX_K, m_c)
                sb_c = tl.where(loads, 0.0, sb_c)
                n_c = tl.where(loads, 0.0, n_c)
            n_t = tl.sum(incl.to(tl.float32), axis=1) + tl.where(head, n_c, 0.0)
            # The centre: the carried mean where there is one, else the sequence's first real logit here.
            first = tl.min(tl.where(incl, o_c[None, :], C), axis=1)
            first_s = tl.sum(tl.where(o_c[None, :] == first[:, None], s_c[None, :], 0.0), axis=1)
            centre = tl.where(head & ((tl.zeros([C], dtype=tl.float32) + n_c) > 0), sb_c, first_s)  # (a block mask)
            dev = tl.sum(tl.where(incl, s_c[None, :] - centre[:, None], 0.0), axis=1)
            sbar_t = tl.where(n_t > 0, centre + dev / tl.maximum(n_t, 1.0), 0.0)
            m_t = tl.max(tl.where(incl, s_c[None, :], _NO_MAX_K), axis=1)
            m_t = tl.where(head, tl.maximum(m_t, m_c), m_t)
            e = tl.where(incl, tl.exp(tl.where(incl, s_c[None, :] - m_t[:, None], 0.0)), 0.0)
            E_t = tl.sum(e, axis=1) + tl.where(head, E_c * tl.exp(tl.where(head, m_c - m_t, 0.0)), 0.0)
            last = o_c == C - 1
            m1 = tl.sum(tl.where(last, m_t, 0.0), axis=0)
            sb1 = tl.sum(tl.where(last, sbar_t, 0.0), axis=0)
            n1 = tl.sum(tl.where(last, n_t, 0.0), axis=0)
            E1 = tl.sum(tl.where(last, E_t, 0.0), axis=0)
            inv_n = 1.0 / tl.maximum(n_t, 1.0)
            b_t = tl.where(val, (g1_c - gh_c) * inv_n, 0.0)
            a_t = tl.where(val, gh_c / tl.maximum(E_t, 1.0), 0.0)
            hc_t = tl.where(val, b_t * (sb_c - sbar_t) + (g0_c - gh_c) * inv_n, 0.0)
            dst = tok + row_t + t
            tl.store(dst, s_c)
            tl.store(dst + TOK, m_t)
            tl.store(dst + 2 * TOK, a_t)
            tl.store(dst + 3 * TOK, b_t)
            tl.store(dst + 4 * TOK, hc_t)
            tl.store(dst + 5 * TOK, E_t)
            tl.store(dst + 6 * TOK, sbar_t)
            tl.store(dst + 7 * TOK, n_t)
            first_lane = o_c == 0
            dst = chunk + row_n + j + o_c * 0
            tl.store(dst, tl.where(first_lane, m_c, 0.0), mask=first_lane)
            tl.store(dst + CH, tl.where(first_lane, m1, 0.0), mask=first_lane)
            tl.store(dst + 2 * CH, tl.where(first_lane, sb_c, 0.0), mask=first_lane)
            tl.store(dst + 3 * CH, tl.where(first_lane, sb1, 0.0), mask=first_lane)
            if STORE_OUT:
                st = tl.load(chunk_store + i_b * N + j)
                put = first_lane & ((o_c * 0 + st) >= 0)  # (block masks for the interpreter)
                dst = stats_out + tl.maximum(st, 0).to(tl.int64) * H + i_h + o_c * 0
                SOUT = S_out * H
                tl.store(dst, tl.where(put, E1, 0.0), mask=put)
                tl.store(dst + SOUT, tl.where(put, m1, 0.0), mask=put)
                tl.store(dst + 2 * SOUT, tl.where(put, sb1, 0.0), mask=put)
                tl.store(dst + 3 * SOUT, tl.where(put, n1, 0.0), mask=put)
            n_c, sb_c, m_c, E_c = n1, sb1, m1, E1

    @triton.jit
    def _scalars_bwd_kernel(s, g1, gh, g0, valid, seg, tok, chunk, dtok, dchunk, d_stats_out, chunk_load,
                            chunk_store, ds, dg1, dgh, dg0, d_stats_in, T_in, L, H, N, S_in, S_out,
                            s_sb, s_st, s_sh, g1_sb, g1_st, g1_sh, gh_sb, gh_st, gh_sh, g0_sb, g0_st, g0_sh,
                            C: tl.constexpr, HAS_G0: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr,
                            HAS_STATE: tl.constexpr, HAS_DOUT: tl.constexpr):
        """Grid (B' H,): the reverse sweep of _scalars_fwd_kernel. dtok (4, B', H, L) = the chunk kernels'
        [ds, da, db, dhc], dchunk (2, B', H, N) = [dsb0, dsb1], d_stats_out (4, S_out, H) the gradient of
        the stored statistics (E~ and sbar slots read). Writes ds, dg1, dgh, dg0 (B', T_in, H) contiguous and
        the E~ / sbar slots of d_stats_in (4, S_in, H) at each loading chunk. The carry between chunks is the
        gradient of the carried (E~, sbar): every factor exp(m_c - m_t) <= 1 and n_c / n_t <= 1.
        """
        i_bh = tl.program_id(0).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        TOK = tl.num_programs(0).to(tl.int64) * L
        CH = tl.num_programs(0).to(tl.int64) * N
        row_t = i_bh * L
        row_n = i_bh * N
        dE_c = tl.zeros([], dtype=tl.float32)
        dsb_c = tl.zeros([], dtype=tl.float32)
        for jj in range(N):
            j = N - 1 - jj
            o_c, t, inb, s_c, g1_c, gh_c, g0_c, val, incl, head = _chunk_tokens(
                s, g1, gh, g0, valid, seg, i_b, i_h, j, T_in, L, s_sb, s_st, s_sh, g1_sb, g1_st, g1_sh,
                gh_sb, gh_st, gh_sh, g0_sb, g0_st, g0_sh, C, HAS_G0, HAS_VALID, HAS_SEG)
            src = tok + row_t + t
            m_t = tl.load(src + TOK)
            a_t = tl.load(src + 2 * TOK)
            b_t = tl.load(src + 3 * TOK)
            E_t = tl.load(src + 5 * TOK)
            sbar_t = tl.load(src + 6 * TOK)
            n_t = tl.load(src + 7 * TOK)
            m0 = tl.load(chunk + row_n + j)
            sb0 = tl.load(chunk + 2 * CH + row_n + j)
            dsrc = dtok + row_t + t
            ds_core = tl.load(dsrc)
            da = tl.load(dsrc + TOK)
            db = tl.load(dsrc + 2 * TOK)
            dhc = tl.load(dsrc + 3 * TOK)
            dsb0 = tl.load(dchunk + row_n + j)
            dsb1 = tl.load(dchunk + CH + row_n + j)
            vf = val.to(tl.float32)
            inv_n = 1.0 / tl.maximum(n_t, 1.0)
            E_cl = tl.maximum(E_t, 1.0)
            last = o_c == C - 1
            dE_last = dE_c
            dsb_last = dsb_c + dsb1
            if HAS_DOUT:
                st = tl.load(chunk_store + i_b * N + j)
                stores = st >= 0
                dsrc = d_stats_out + tl.maximum(st, 0).to(tl.int64) * H + i_h
                dE_last += tl.where(stores, tl.load(dsrc), 0.0)
                dsb_last += tl.where(stores, tl.load(dsrc + 2 * S_out * H), 0.0)
            # Gradients of E~_t and sbar_t: through a, hc, and (last position) the carry and the chunk end.
            dE = -da * a_t / E_cl * vf + tl.where(last, dE_last, 0.0)
            dsbar = -dhc * b_t * vf + tl.where(last, dsb_last, 0.0)
            db_all = (db + dhc * (sb0 - sbar_t)) * vf
            dout = i_b * T_in * H + t * H + i_h
            tl.store(dg1 + dout, db_all * inv_n, mask=inb)
            tl.store(dgh + dout, -(db_all + dhc * vf) * inv_n + da * vf / E_cl, mask=inb)
            if HAS_G0:
                tl.store(dg0 + dout, dhc * vf * inv_n, mask=inb)
            # E~_t = ... + sum_{i in incl} exp(s_i - m_t), sbar_t = (n_c sb_c + sum_{i in incl} s_i) / n_t.
            e = tl.where(incl, tl.exp(tl.where(incl, s_c[None, :] - m_t[:, None], 0.0)), 0.0)
            w_sbar = dsbar * inv_n
            through_E = tl.sum(e * dE[:, None], axis=0)
            ds_c = ds_core + vf * (through_E + tl.sum(tl.where(incl, w_sbar[:, None], 0.0), axis=0))
            tl.store(ds + dout, ds_c, mask=inb)
            # The carry into this chunk (E~_c at m0, sb_c = sb0 with count n_c) and its gradient.
            n_c = tl.sum(tl.where(o_c == 0, n_t - vf, 0.0), axis=0)
            dE_c = tl.sum(tl.where(head, dE * tl.exp(tl.where(head, m0 - m_t, 0.0)), 0.0), axis=0)
            dsb_c = n_c * tl.sum(tl.where(head, w_sbar, 0.0), axis=0) + dsb0 + tl.sum(dhc * b_t * vf, axis=0)
            ld = tl.load(chunk_load + i_b * N + j)
            loads = ld >= 0
            if HAS_STATE:
                put = (o_c == 0) & ((o_c * 0 + ld) >= 0)  # (block masks for the interpreter)
                dst = d_stats_in + tl.maximum(ld, 0).to(tl.int64) * H + i_h + o_c * 0
                tl.store(dst, tl.where(put, dE_c, 0.0), mask=put)
                tl.store(dst + 2 * S_in * H, tl.where(put, dsb_c, 0.0), mask=put)
            dE_c = tl.where(loads, 0.0, dE_c)
            dsb_c = tl.where(loads, 0.0, dsb_c)


    # ------------------------------------------------------------------------------------------
    # The layer's neighbours of the op: RoPE then L2 normalisation of q and k, in one pass
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _rope_rows(x, cos, sin, r, R, T, H, x_sb, x_st, x_sj, x_sh, c_sb, c_st, s_sb, s_st, D: tl.constexpr,
                   BR: tl.constexpr):
        """Rows r (BR,) of the (B, T, 2, H) rows of x (each d = D channels, any strides): the rotated halves y1,
        y2 (BR, D / 2) float32, the cos / sin halves and the row mask."""
        o_d = tl.arange(0, D // 2)
        mask = r < R
        h = r % H
        j = (r // H) % 2
        t = (r // (2 * H)) % T
        b = r // (2 * H * T)
        src = x + b[:, None] * x_sb + t[:, None] * x_st + j[:, None] * x_sj + h[:, None] * x_sh + o_d[None, :]
        x1 = tl.load(src, mask=mask[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(src + D // 2, mask=mask[:, None], other=0.0).to(tl.float32)
        c = tl.load(cos + b[:, None] * c_sb + t[:, None] * c_st + o_d[None, :], mask=mask[:, None], other=0.0)
        s = tl.load(sin + b[:, None] * s_sb + t[:, None] * s_st + o_d[None, :], mask=mask[:, None], other=0.0)
        return x1 * c - x2 * s, x1 * s + x2 * c, c, s, mask, o_d

    @triton.jit
    def _rope_norm_fwd_kernel(x, cos, sin, y, R, T, H, x_sb, x_st, x_sj, x_sh, c_sb, c_st, s_sb, s_st,
                              D: tl.constexpr, BR: tl.constexpr):
        """Grid (cdiv(R, BR),): y (R, D) = normalize(rope(x)) per row, float32 inside, stored in y's dtype."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        y1, y2, _, _, mask, o_d = _rope_rows(x, cos, sin, r, R, T, H, x_sb, x_st, x_sj, x_sh, c_sb, c_st, s_sb, s_st,
                                             D, BR)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(y1 * y1 + y2 * y2, axis=1)), _NORM_EPS_K)
        dst = y + r[:, None] * D + o_d[None, :]
        tl.store(dst, (y1 * inv[:, None]).to(y.dtype.element_ty), mask=mask[:, None])
        tl.store(dst + D // 2, (y2 * inv[:, None]).to(y.dtype.element_ty), mask=mask[:, None])

    @triton.jit
    def _rope_norm_bwd_kernel(x, cos, sin, dy, dx, R, T, H, x_sb, x_st, x_sj, x_sh, c_sb, c_st, s_sb, s_st,
                              D: tl.constexpr, BR: tl.constexpr):
        """Grid (cdiv(R, BR),): dx (R, D) from dy (R, D): the normalisation's gradient (dy - y (y . dy)) / |y|,
        rotated back."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        y1, y2, c, s, mask, o_d = _rope_rows(x, cos, sin, r, R, T, H, x_sb, x_st, x_sj, x_sh, c_sb, c_st, s_sb, s_st,
                                             D, BR)
        norm = tl.sqrt(tl.sum(y1 * y1 + y2 * y2, axis=1))
        inv = 1.0 / tl.maximum(norm, _NORM_EPS_K)
        src = dy + r[:, None] * D + o_d[None, :]
        g1 = tl.load(src, mask=mask[:, None], other=0.0).to(tl.float32)
        g2 = tl.load(src + D // 2, mask=mask[:, None], other=0.0).to(tl.float32)
        # Below the floor the normalisation is a plain scale by 1 / eps (as F.normalize's clamp).
        along = tl.where(norm > _NORM_EPS_K, tl.sum(y1 * g1 + y2 * g2, axis=1) * inv * inv, 0.0)
        d1 = (g1 - y1 * along[:, None]) * inv[:, None]
        d2 = (g2 - y2 * along[:, None]) * inv[:, None]
        dst = dx + r[:, None] * D + o_d[None, :]
        tl.store(dst, (d1 * c + d2 * s).to(dx.dtype.element_ty), mask=mask[:, None])
        tl.store(dst + D // 2, (d2 * c - d1 * s).to(dx.dtype.element_ty), mask=mask[:, None])


    # ------------------------------------------------------------------------------------------
    # The layer's radial logit s (the "deviation" logit of docs/method.md), in one pass
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _logit_block(u, counts, valid, seg, i_b, i_h, j, T, u_sb, u_st, u_sh, D: tl.constexpr, BT: tl.constexpr,
                     HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr):
        """Token block j of row i_b, head i_h: u (BT, D) in its dtype (0 on padding and past T), the counts
        (BT,) float32, incl (BT, BT) [t, i]: i <= t, same document, and head (BT,): the positions that
        continue the running sum carried from the previous block."""
        o_t = tl.arange(0, BT)
        o_d = tl.arange(0, D)
        t = j * BT + o_t
        inb = t < T
        real = inb
        if HAS_VALID:
            real = inb & (tl.load(valid + i_b * T + t, mask=inb, other=0) != 0)
        u_c = tl.load(u + i_b * u_sb + t[:, None] * u_st + i_h * u_sh + o_d[None, :], mask=real[:, None], other=0.0)
        n = tl.load(counts + i_b * T + t, mask=inb, other=1).to(tl.float32)
        incl = o_t[None, :] <= o_t[:, None]
        if HAS_SEG:
            seg_c = tl.load(seg + i_b * T + t, mask=inb, other=-1)
            incl = incl & (seg_c[:, None] == seg_c[None, :])
            head = (seg_c == tl.load(seg + i_b * T + tl.maximum(j * BT - 1, 0))) & (j > 0)
        else:
            head = (o_t >= 0) & (j > 0)
        return t, inb, real, u_c, n, incl, head, o_t, o_d

    @triton.jit
    def _logit_fwd_kernel(u, mu, log_tau, counts, valid, seg, s, carries, T, H, u_sb, u_st, u_sh, scale,
                          D: tl.constexpr, BT: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr,
                          LOWP: tl.constexpr, F32: tl.constexpr):
        """Grid (B H,), sequential over blocks of BT tokens with the running sum of u carried between them:
        s_t = -scale u_t . (tau mu + sum_{i<=t} u_i) / (tau + n_t), the sum over the real tokens of the
        token's document, s (B, T, H) float32; carries (B, H, cdiv(T, BT), D) float32, the running sum at
        each block's end (for the backward). The in-block running sum is a product with the 0 / 1 mask
        (exact for 16-bit u)."""
        i_bh = tl.program_id(0).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        tau = tl.exp(tl.load(log_tau + i_h).to(tl.float32))
        prior = tau * tl.load(mu + i_h * D + tl.arange(0, D)).to(tl.float32)
        carry = tl.zeros([D], dtype=tl.float32)
        for j in range(tl.cdiv(T, BT)):
            t, inb, real, u_c, n, incl, head, o_t, o_d = _logit_block(
                u, counts, valid, seg, i_b, i_h, j, T, u_sb, u_st, u_sh, D, BT, HAS_VALID, HAS_SEG)
            total = _exact_dot(incl.to(u_c.dtype), u_c, LOWP, F32) + tl.where(head[:, None], carry[None, :], 0.0)
            ubar = (prior[None, :] + total) / (tau + n)[:, None]
            tl.store(s + (i_b * T + t) * H + i_h, -scale * tl.sum(u_c.to(tl.float32) * ubar, axis=1), mask=inb)
            carry = tl.sum(tl.where((o_t == BT - 1)[:, None], total, 0.0), axis=0)
            tl.store(carries + (i_bh * tl.cdiv(T, BT) + j) * D + o_d, carry)

    @triton.jit
    def _logit_bwd_kernel(u, mu, log_tau, counts, valid, seg, carries, ds, du, dmu, dlog_tau, T, H, u_sb, u_st, u_sh,
                          scale, D: tl.constexpr, BT: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr,
                          LOWP: tl.constexpr, F32: tl.constexpr):
        """Grid (B H,), the reverse sweep of _logit_fwd_kernel (the running sums rebuilt per block from the
        forward's carries). du (B, T, H, D) contiguous in u's dtype; dmu (B, H, D) and dlog_tau (B, H) float32,
        this row's shares (summed over the rows afterwards). The carry between blocks is the gradient of the
        running sum at a block's end."""
        i_bh = tl.program_id(0).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        tau = tl.exp(tl.load(log_tau + i_h).to(tl.float32))
        mu_h = tl.load(mu + i_h * D + tl.arange(0, D)).to(tl.float32)
        nblocks = tl.cdiv(T, BT)
        d_carry = tl.zeros([D], dtype=tl.float32)
        d_mu = tl.zeros([D], dtype=tl.float32)
        d_tau = tl.zeros([1], dtype=tl.float32)
        for jj in range(nblocks):
            j = nblocks - 1 - jj
            t, inb, real, u_c, n, incl, head, o_t, o_d = _logit_block(
                u, counts, valid, seg, i_b, i_h, j, T, u_sb, u_st, u_sh, D, BT, HAS_VALID, HAS_SEG)
            before = tl.load(carries + (i_bh * nblocks + tl.maximum(j - 1, 0)) * D + o_d)
            total = _exact_dot(incl.to(u_c.dtype), u_c, LOWP, F32) + tl.where(head[:, None], before[None, :], 0.0)
            last = o_t == BT - 1
            den = tau + n
            u_f = u_c.to(tl.float32)
            ubar = (tau * mu_h[None, :] + total) / den[:, None]
            g = -scale * tl.load(ds + (i_b * T + t) * H + i_h, mask=inb, other=0.0)       # ds_t (-scale)
            through_s = (g / den)[:, None] * u_f            # d s_t / d (running sum at t), times ds_t
            d_total = through_s + tl.where(last[:, None], d_carry[None, :], 0.0)
            # (the 0 / 1 mask is exact in u's dtype; the float32 gradients are split: see _state_dot)
            du_c = g[:, None] * ubar + _state_dot(tl.trans(incl.to(u_c.dtype)), d_total, LOWP, F32)
            du_c = tl.where(real[:, None], du_c, 0.0)
            tl.store(du + ((i_b * T + t[:, None]) * H + i_h) * D + o_d[None, :], du_c.to(du.dtype.element_ty),
                     mask=inb[:, None])
            d_mu += tau * tl.sum(through_s, axis=0)
            d_tau += tl.sum(g / den * tl.sum(u_f * (mu_h[None, :] - ubar), axis=1), axis=0)
            d_carry = tl.sum(tl.where(head[:, None], d_total, 0.0), axis=0)
        tl.store(dmu + i_bh * D + tl.arange(0, D), d_mu)
        tl.store(dlog_tau + i_bh + tl.arange(0, 1), tau * d_tau)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _block(d: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(d))


def _meta(q, v, chunk_size):
    """Sizes and compile-time flags shared by the launchers."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    return dict(B=B, T=T, H=H, N=T // chunk_size, K=K, V=V, C=chunk_size, BK=_block(K),
                BK_SPLIT=min(_block(K), STATE_TILE), BV=min(_block(V), STATE_TILE),
                BV_BWD=min(_block(V), CHUNK_BWD_BLOCK_V),
                DOT_PREC=FLOAT32_DOT if q.dtype == torch.float32 else "tf32", LOWP=q.dtype != torch.float32,
                F32=FLOAT32_DOT)


_TUNED = {}


def _launch(kernel, grid, device, launch: dict, args, kwargs, BV: int):
    """kernel[grid(BV)](*args, **kwargs): on a GPU autotuned over its d_v block BV and warps (kernels whose
    launches only write their outputs: the states and output kernels), else with BV and ``launch``."""
    if device.type == "cuda" and not _interpreting():
        tuned = _TUNED.get(kernel)
        if tuned is None:
            configs = [triton.Config({"BV": bv}, num_warps=w, num_stages=AUTOTUNE_STAGES)
                       for bv in AUTOTUNE_BLOCK_V for w in AUTOTUNE_WARPS]
            tuned = _TUNED[kernel] = triton.autotune(configs=configs, key=["K", "V", "C", "HAS_SEG"])(kernel)
        return tuned[lambda meta: grid(meta["BV"])](*args, **kwargs)
    return kernel[grid(BV)](*args, **kwargs, BV=BV, **launch)


def _states_grid(z):
    return lambda BV: (triton.cdiv(z["K"], z["BK_SPLIT"]), triton.cdiv(z["V"], BV), z["B"] * z["H"])


def _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, out_states, seg, z):
    """Runs the states kernel; returns the state at each chunk start, (B, H, N, 3, K, V) float32. start_states
    None: every loading chunk starts from zero states."""
    kv_starts = torch.empty(z["B"], z["H"], z["N"], 3, z["K"], z["V"], dtype=torch.float32, device=k.device)
    store_out = out_states is not None
    _launch(_states_fwd_kernel, _states_grid(z), k.device, _STATES_LAUNCH, (
        k, v, s, m0, m1, sb0, sb1, kv_starts if start_states is None else start_states, chunk_load, chunk_store,
        kv_starts, out_states if store_out else kv_starts, seg, z["T"], z["H"], z["N"]), dict(
        K=z["K"], V=z["V"], C=z["C"], BK=z["BK_SPLIT"], STORE_OUT=store_out, F32=z["F32"], HAS_SEG=z["HAS_SEG"],
        HAS_START=start_states is not None, LOWP=z["LOWP"]), z["BV"])
    return kv_starts


def _segment_ids(segments, chunk_load):
    """The kernels' seg operand: segments (B, T) as int32, or chunk_load as a stand-in pointer (never read
    without HAS_SEG); and HAS_SEG."""
    if segments is None:
        return chunk_load, False
    return segments.to(device=chunk_load.device, dtype=torch.int32).contiguous(), True


def _interpreted_bf16(x):
    """x, or x in float32 when it is bfloat16 and the kernels run in the interpreter (which computes bfloat16 wrong)."""
    return x.float() if x is not None and x.dtype == torch.bfloat16 and _interpreting() else x


def _from_interpreted(x, dtype):
    """x (a kernel's output) in ``dtype``: a no-op but for bfloat16 computed as float32 in the interpreter."""
    return x.to(dtype)


def _prepare(q, k, v, scalars: Optional[ChunkScalars], start_states, chunk_load, chunk_store, *extra):
    """Contiguous kernel operands: q, k, v and the ``extra`` tensors (the gradients coming in) in their
    dtype (float32 for bfloat16 under the interpreter), scalars and states float32, chunk tables int32
    (each a no-op when it is so already, as ops.py passes them)."""
    q, k, v = (_interpreted_bf16(x).contiguous() for x in (q, k, v))
    f32 = lambda x: None if x is None else x.to(torch.float32).contiguous()  # noqa: E731
    chunk_load, chunk_store = (x.to(device=q.device, dtype=torch.int32).contiguous() for x in (chunk_load, chunk_store))
    return (q, k, v, None if scalars is None else scalars.map(f32), f32(start_states), chunk_load, chunk_store,
            *(_interpreted_bf16(x).contiguous() for x in extra))


def _out_dtype(layout: CoreLayout, q) -> torch.dtype:
    """o's dtype: the layout's out_dtype, else float32."""
    return torch.float32 if layout.out_dtype is None else layout.out_dtype


def _core_forward(q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout, chunk_load, chunk_store, seg, z):
    """The states and output kernels on prepared operands: o and out_states (num_out_states rows)."""
    s, m, a, b, hc, m0, m1, sb0, sb1 = scalars.tensors()
    # Rows never stored stay 0. Without any (num_out_states = 0) the states kernel stores nothing.
    out_states = torch.zeros(layout.num_out_states, z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=q.device)
    kv_starts = _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store,
                              out_states if layout.num_out_states else None, seg, z)
    o_dtype = _out_dtype(layout, q)
    store_dtype = torch.float32 if o_dtype == torch.bfloat16 and _interpreting() else o_dtype  # (see _prepare)
    o = torch.empty(z["B"], z["T"], z["H"], z["V"], dtype=store_dtype, device=q.device)
    _launch(_output_fwd_kernel, lambda BV: (triton.cdiv(z["V"], BV), z["N"], z["B"] * z["H"]), q.device,
            _OUTPUT_LAUNCH, (q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, o, seg, z["T"], z["H"], z["N"]),
            dict(K=z["K"], V=z["V"], C=z["C"], BK=z["BK"], DOT_PREC=z["DOT_PREC"], LOWP=z["LOWP"], F32=z["F32"],
                 HAS_SEG=z["HAS_SEG"]), z["BV"])
    return _from_interpreted(o, o_dtype), out_states


def _forward_impl(q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout):
    q, k, v, scalars, start_states, chunk_load, chunk_store = _prepare(
        q, k, v, scalars, start_states, layout.chunk_load, layout.chunk_store)
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    return _core_forward(q, k, v, scalars, start_states, layout, chunk_load, chunk_store, seg, z)


def _core_backward(do, d_out_states, q, k, v, scalars: ChunkScalars, start_states, chunk_load, chunk_store, seg, z,
                   num_loads: int, num_in: int):
    """The backward kernels on prepared operands. Returns dq, dk, dv (their dtypes), dtok (4, B, H, T) =
    [ds, da, db, dhc] and dchunk (2, B, H, N) = [dsb0, dsb1] (float32), and the gradient of start_states
    (num_in rows; None without start states)."""
    s, m, a, b, hc, m0, m1, sb0, sb1 = scalars.tensors()
    dev = q.device
    kv_starts = _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, None, seg, z)
    has_start = start_states is not None
    if has_start:
        # Each loading chunk gets its own slot for its start-state gradient; rows loaded by several chunks
        # are summed afterwards. The number of slots comes from the host (num_loads), so nothing here waits
        # for the device: the slot -> row table is a scatter, with the chunks that load nothing sent to an
        # extra slot that is dropped.
        loads = chunk_load >= 0
        slots = loads.flatten().cumsum(0).view_as(loads) - 1
        load_slot = torch.where(loads, slots, -1).to(torch.int32).contiguous()
        load_rows = torch.zeros(num_loads + 1, dtype=torch.long, device=dev).scatter_(
            0, torch.where(loads, slots, num_loads).flatten().long(),
            chunk_load.flatten().long().clamp(min=0))[:num_loads]
        d_starts = torch.empty(max(num_loads, 1), z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=dev)
    else:
        load_slot, d_starts = chunk_load, kv_starts  # (stand-in pointers, never touched)
    load_dout = d_out_states is not None and d_out_states.shape[0] > 0
    dkv_ends = torch.empty_like(kv_starts)
    _launch(_states_bwd_kernel, _states_grid(z), dev, _STATES_LAUNCH, (
        q, do, m, a, b, hc, m0, m1, sb0, sb1, chunk_load, chunk_store, load_slot,
        d_out_states.contiguous() if load_dout else kv_starts, dkv_ends, d_starts, seg, z["T"], z["H"], z["N"]), dict(
        K=z["K"], V=z["V"], C=z["C"], BK=z["BK_SPLIT"], F32=z["F32"], HAS_SEG=z["HAS_SEG"], HAS_START=has_start,
        LOAD_DOUT=load_dout, LOWP=z["LOWP"]), z["BV"])

    # Written by the kernels in the inputs' dtype (their float32 sums rounded once, on the store).
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=dev) for x in (q, k, v))
    dtok = torch.empty(4, *s.shape, dtype=torch.float32, device=dev)
    dchunk = torch.empty(2, *sb0.shape, dtype=torch.float32, device=dev)
    ds, da, db, dhc = dtok.unbind(0)
    dsb0, dsb1 = dchunk.unbind(0)
    chunk_grid = (z["N"], z["B"] * z["H"])
    sizes = dict(K=z["K"], V=z["V"], C=z["C"], BK=z["BK"], BV=z["BV_BWD"], DOT_PREC=z["DOT_PREC"], LOWP=z["LOWP"],
                 F32=z["F32"], HAS_SEG=z["HAS_SEG"], **_CHUNK_BWD_LAUNCH)
    _chunk_bwd_q_kernel[chunk_grid](q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, dkv_ends, do, dq, da, db, dhc, ds,
                                    dsb0, dsb1, seg, z["T"], z["H"], z["N"], **sizes)
    _chunk_bwd_kv_kernel[chunk_grid](q, k, v, s, m, a, b, hc, m1, sb0, sb1, dkv_ends, do, dk, dv, ds, dsb1, seg,
                                     z["T"], z["H"], z["N"], **sizes)
    d_start_states = None
    if has_start:
        d_start_states = torch.zeros(num_in, z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=dev)
        d_start_states.index_add_(0, load_rows, d_starts[:num_loads])
    return dq, dk, dv, dtok, dchunk, d_start_states


def _backward_impl(do, d_out_states, q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout,
                   num_loads: int):
    """Gradients of q, k, v (their dtypes), of the differentiable scalars (dtok (4, B, H, T) = [ds, da, db, dhc]
    and dchunk (2, B, H, N) = [dsb0, dsb1]: one tensor each, since a custom op's outputs must not alias) and
    of start_states. num_loads: how many chunks load a start state (a host int: nothing waits for the device)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    num_in = start_states.shape[0]
    q, k, v, scalars, start_states, chunk_load, chunk_store, do, d_out_states = _prepare(
        q, k, v, scalars, start_states, layout.chunk_load, layout.chunk_store, do, d_out_states)
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    dq, dk, dv, dtok, dchunk, d_start_states = _core_backward(
        do, d_out_states, q, k, v, scalars, start_states, chunk_load, chunk_store, seg, z, num_loads, num_in)
    dq, dk, dv = (_from_interpreted(x, dtype) for x, dtype in zip((dq, dk, dv), dtypes))
    return dq, dk, dv, dtok, dchunk, d_start_states


# ----------------------------------------------------------------------------------------------
# The whole chunked op (per-token scalars included): the kernels' entry for ops.py
# ----------------------------------------------------------------------------------------------

# Slots of the per-token (tok) and per-chunk (chunk) scalars the scalars kernel writes; ChunkScalars' fields
# are views of them. E~, sbar and n stay for the backward.
TOKEN_SLOTS = ("s", "m", "a", "b", "hc", "E", "sbar", "n")
CHUNK_SLOTS = ("m0", "m1", "sb0", "sb1")
# Rows of the statistics tensors stats_in / stats_out (num_sequences each): ZeroSState's per-head scalars.
STATS = ("E", "m", "sbar", "n")


def _scalars_of(tok, chunk) -> ChunkScalars:
    return ChunkScalars(*tok[:5].unbind(0), *chunk.unbind(0))


def _strides(x):
    """(batch, token, head) strides of a (B, T, H) tensor, or zeros for an absent one."""
    return tuple(x.stride()) if x is not None else (0, 0, 0)


def _scalar_inputs(s, g1, gh, g0):
    """The per-token inputs as the scalars kernels read them (any strides; bfloat16 as float32 in the
    interpreter) and their strides, flat."""
    s, g1, gh, g0 = (_interpreted_bf16(x) for x in (s, g1, gh, g0))
    return (s, g1, gh, g1 if g0 is None else g0), (*_strides(s), *_strides(g1), *_strides(gh), *_strides(g0))


def _scalars_forward(s, g1, gh, g0, valid, stats_in, chunk_load, chunk_store, seg, has_seg: bool, L: int, C: int,
                     num_out_states: int):
    """The scalars kernel alone: tok (8, B', H, L), chunk (4, B', H, N) (TOKEN_SLOTS, CHUNK_SLOTS) and
    stats_out (4, num_out_states, H) (STATS), float32. Operands as zeros_chunk_fused takes them; chunk_load,
    chunk_store int32 and seg as ``_segment_ids`` gives it."""
    B, _, H = s.shape
    N, dev, S_out = L // C, s.device, num_out_states
    tok = torch.empty(len(TOKEN_SLOTS), B, H, L, dtype=torch.float32, device=dev)
    chunk = torch.empty(len(CHUNK_SLOTS), B, H, N, dtype=torch.float32, device=dev)
    stats_out = (torch.zeros if S_out else torch.empty)(len(STATS), max(S_out, 1), H, dtype=torch.float32, device=dev)
    (s_, g1_, gh_, g0_), strides = _scalar_inputs(s, g1, gh, g0)
    _scalars_fwd_kernel[(B * H,)](
        s_, g1_, gh_, g0_, valid if valid is not None else chunk_load, seg,
        stats_in if stats_in is not None else tok, chunk_load, chunk_store, tok, chunk, stats_out,
        s.shape[1], L, H, N, 0 if stats_in is None else stats_in.shape[1], max(S_out, 1), *strides, C=C,
        HAS_G0=g0 is not None, HAS_VALID=valid is not None, HAS_SEG=has_seg, HAS_STATE=stats_in is not None,
        STORE_OUT=S_out > 0, **_SCALARS_LAUNCH)
    return tok, chunk, stats_out[:, :S_out]


def fused_scalars(s, g1, gh, g0, valid, stats_in, layout: CoreLayout):
    """The per-token scalars as the fused path forms them (the scalars kernel alone, no gradient): the
    ``ChunkScalars`` of the core, E~, sbar and n per token ((B', H, L) each) and stats_out (4, num_out_states,
    H). Operands as ``zeros_chunk_fused`` takes them; L = chunk_load.shape[1] * chunk_size. (For tests and
    benchmarks: the scan's precision on streams too long for the interpreter to run the whole op.)"""
    chunk_load, chunk_store = (x.to(torch.int32).contiguous() for x in (layout.chunk_load, layout.chunk_store))
    seg, has_seg = _segment_ids(layout.segments, chunk_load)
    L = chunk_load.shape[1] * layout.chunk_size
    tok, chunk, stats_out = _scalars_forward(s, g1, gh, g0, valid, stats_in, chunk_load, chunk_store, seg, has_seg, L,
                                             layout.chunk_size, layout.num_out_states)
    return _scalars_of(tok, chunk), dict(zip(TOKEN_SLOTS[5:], tok[5:].unbind(0))), stats_out


def _zeros_chunk_forward(q, k, v, s, g1, gh, g0, valid, stats_in, start_states, layout: CoreLayout):
    """The scalars kernel, then the core's kernels. Returns o, out_states, stats_out (4, S_out, H), tok, chunk."""
    q, k, v, _, start_states, chunk_load, chunk_store = _prepare(
        q, k, v, None, start_states, layout.chunk_load, layout.chunk_store)
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    tok, chunk, stats_out = _scalars_forward(s, g1, gh, g0, valid, stats_in, chunk_load, chunk_store, seg,
                                             z["HAS_SEG"], z["T"], z["C"], layout.num_out_states)
    o, out_states = _core_forward(q, k, v, _scalars_of(tok, chunk), start_states, layout, chunk_load, chunk_store,
                                  seg, z)
    return o, out_states, stats_out, tok, chunk


def _zeros_chunk_backward(do, d_out_states, d_stats_out, q, k, v, s, g1, gh, g0, valid, stats_in, start_states, tok,
                          chunk, layout: CoreLayout, num_loads: int):
    """Gradients of q, k, v (their dtypes), of s, g1, gh as one (3, B', T_in, H) float32 tensor (a custom op's
    outputs must not alias), of g0 ((B', T_in, H); None without g0), stats_in (E~ and sbar rows; None
    without) and start_states (None without)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, _, start_states, chunk_load, chunk_store, do = _prepare(
        q, k, v, None, start_states, layout.chunk_load, layout.chunk_store, do)
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    num_in = 0 if start_states is None else start_states.shape[0]
    dq, dk, dv, dtok, dchunk, d_start_states = _core_backward(
        do, d_out_states, q, k, v, _scalars_of(tok, chunk), start_states, chunk_load, chunk_store, seg, z, num_loads,
        num_in)
    d_scalars, dg0, d_stats_in = _scalars_backward(s, g1, gh, g0, valid, stats_in, tok, chunk, dtok, dchunk,
                                                   d_stats_out, chunk_load, chunk_store, seg, z)
    dq, dk, dv = (_from_interpreted(x, dtype) for x, dtype in zip((dq, dk, dv), dtypes))
    return dq, dk, dv, d_scalars, dg0, d_stats_in, d_start_states


def _scalars_backward(s, g1, gh, g0, valid, stats_in, tok, chunk, dtok, dchunk, d_stats_out, chunk_load, chunk_store,
                      seg, z):
    """The scalars' reverse sweep: d_scalars (3, B', T_in, H) = [ds (the core's share included), dg1, dgh] and
    dg0 (B', T_in, H) float32 (None without g0), d_stats_in (4, S_in, H) (its E~ and sbar rows; None without
    stats_in)."""
    B, L, H, N, dev = z["B"], z["T"], z["H"], z["N"], s.device
    T_in = s.shape[1]
    d_scalars = torch.empty(3, B, T_in, H, dtype=torch.float32, device=dev)  # ds, dg1, dgh: one allocation
    ds, dg1, dgh = d_scalars.unbind(0)
    dg0 = torch.empty(B, T_in, H, dtype=torch.float32, device=dev) if g0 is not None else None
    d_stats_in = torch.zeros_like(stats_in) if stats_in is not None else None
    has_dout = d_stats_out is not None and d_stats_out.shape[1] > 0
    (s_, g1_, gh_, g0_), strides = _scalar_inputs(s, g1, gh, g0)
    _scalars_bwd_kernel[(B * H,)](
        s_, g1_, gh_, g0_, valid if valid is not None else chunk_load, seg, tok, chunk, dtok, dchunk,
        d_stats_out.contiguous() if has_dout else tok, chunk_load, chunk_store, ds, dg1, dgh,
        dg0 if dg0 is not None else ds, d_stats_in if d_stats_in is not None else tok, T_in, L, H, N,
        0 if stats_in is None else stats_in.shape[1], d_stats_out.shape[1] if has_dout else 1, *strides, C=z["C"],
        HAS_G0=g0 is not None, HAS_VALID=valid is not None, HAS_SEG=z["HAS_SEG"], HAS_STATE=stats_in is not None,
        HAS_DOUT=has_dout, **_SCALARS_LAUNCH)
    return d_scalars, dg0, d_stats_in


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees one opaque node per call) and autograd: the one place where the
# contract is flat (torch.library takes plain tensors and ints; ops_contract.py fixes the order)
# ----------------------------------------------------------------------------------------------

# A copy of this module loaded under another name (an exported model's trust_remote_code copy)
# registers its own namespace instead of colliding with zeros_lm's.
_NAMESPACE = "zeros_lm" if __name__ == "zeros_lm.ops_fused" else "zeros_lm_" + re.sub(r"\W", "_", __name__)
_Tensor = torch.Tensor


def _typed(scalar_tensors, start_states, chunk_load, chunk_store, num_out_states, chunk_size, segments):
    """The custom ops' flat arguments as (scalars, start_states, layout)."""
    return (ChunkScalars(*scalar_tensors), start_states,
            CoreLayout(chunk_load, chunk_store, num_out_states, chunk_size, segments=segments))


@torch.library.custom_op(f"{_NAMESPACE}::chunk_core_fused", mutates_args=())
def _chunk_core_op(q: _Tensor, k: _Tensor, v: _Tensor, s: _Tensor, m: _Tensor, a: _Tensor, b: _Tensor, hc: _Tensor,
                   m0: _Tensor, m1: _Tensor, sb0: _Tensor, sb1: _Tensor, start_states: _Tensor, chunk_load: _Tensor,
                   chunk_store: _Tensor, num_out_states: int, chunk_size: int, num_loads: int,
                   segments: Optional[_Tensor], out_dtype: Optional[torch.dtype] = None) -> tuple[_Tensor, _Tensor]:
    scalars, start_states, layout = _typed((s, m, a, b, hc, m0, m1, sb0, sb1), start_states, chunk_load, chunk_store,
                                           num_out_states, chunk_size, segments)
    return _forward_impl(q, k, v, scalars, start_states, dataclasses.replace(layout, out_dtype=out_dtype))


@_chunk_core_op.register_fake
def _(q, k, v, s, m, a, b, hc, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, num_out_states, chunk_size,
      num_loads, segments, out_dtype=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    o_dtype = _out_dtype(CoreLayout(chunk_load, chunk_store, num_out_states, chunk_size, out_dtype=out_dtype), q)
    return (q.new_empty(B, T, H, V, dtype=o_dtype), q.new_empty(num_out_states, H, 3, K, V, dtype=torch.float32))


@torch.library.custom_op(f"{_NAMESPACE}::chunk_core_fused_backward", mutates_args=())
def _chunk_core_backward_op(do: _Tensor, d_out_states: _Tensor, q: _Tensor, k: _Tensor, v: _Tensor, s: _Tensor,
                            m: _Tensor, a: _Tensor, b: _Tensor, hc: _Tensor, m0: _Tensor, m1: _Tensor, sb0: _Tensor,
                            sb1: _Tensor, start_states: _Tensor, chunk_load: _Tensor, chunk_store: _Tensor,
                            chunk_size: int, num_loads: int, segments: Optional[_Tensor]
                            ) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    scalars, start_states, layout = _typed((s, m, a, b, hc, m0, m1, sb0, sb1), start_states, chunk_load, chunk_store,
                                           d_out_states.shape[0], chunk_size, segments)
    return _backward_impl(do, d_out_states, q, k, v, scalars, start_states, layout, num_loads)


@_chunk_core_backward_op.register_fake
def _(do, d_out_states, q, k, v, s, m, a, b, hc, m0, m1, sb0, sb1, start_states, *rest):
    # Contiguous, as _backward_impl returns them whatever the inputs' strides (the model passes (B, H, T)
    # views of (B, T, H) tensors; compiled code checks the real strides against these).
    new = lambda x, dtype=torch.float32: x.new_empty(x.shape, dtype=dtype)  # noqa: E731
    return (new(q, q.dtype), new(k, k.dtype), new(v, v.dtype), s.new_empty(4, *s.shape, dtype=torch.float32),
            sb0.new_empty(2, *sb0.shape, dtype=torch.float32), new(start_states))


def _setup_context(ctx, inputs, output):
    *tensors, _num_out_states, chunk_size, num_loads, segments, _out_dtype = inputs
    ctx.set_materialize_grads(False)  # (an unused output's gradient stays None: no zeros to allocate)
    ctx.save_for_backward(*tensors, segments)
    ctx.chunk_size, ctx.num_loads = chunk_size, num_loads


def _backward(ctx, do, d_out_states):
    *tensors, segments = ctx.saved_tensors
    q, v, start_states = tensors[0], tensors[2], tensors[12]
    if do is None:
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    if d_out_states is None:
        d_out_states = torch.zeros(0, *start_states.shape[1:], dtype=torch.float32, device=q.device)
    dq, dk, dv, dtok, dchunk, d_start = _chunk_core_backward_op(
        do, d_out_states, *tensors, ctx.chunk_size, ctx.num_loads, segments)
    ds, da, db, dhc = dtok.unbind(0)
    dsb0, dsb1 = dchunk.unbind(0)
    return dq, dk, dv, ds, None, da, db, dhc, None, None, dsb0, dsb1, d_start, None, None, None, None, None, None, None


_chunk_core_op.register_autograd(_backward, setup_context=_setup_context)


_OptTensor = Optional[torch.Tensor]


@torch.library.custom_op(f"{_NAMESPACE}::zeros_chunk_fused", mutates_args=())
def _zeros_chunk_op(q: _Tensor, k: _Tensor, v: _Tensor, s: _Tensor, g1: _Tensor, gh: _Tensor, g0: _OptTensor,
                    valid: _OptTensor, stats_in: _OptTensor, start_states: _OptTensor, chunk_load: _Tensor,
                    chunk_store: _Tensor, num_out_states: int, chunk_size: int, num_loads: int,
                    segments: _OptTensor, out_dtype: Optional[torch.dtype] = None
                    ) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    layout = CoreLayout(chunk_load, chunk_store, num_out_states, chunk_size, segments=segments, out_dtype=out_dtype)
    return _zeros_chunk_forward(q, k, v, s, g1, gh, g0, valid, stats_in, start_states, layout)


@_zeros_chunk_op.register_fake
def _(q, k, v, s, g1, gh, g0, valid, stats_in, start_states, chunk_load, chunk_store, num_out_states, chunk_size,
      num_loads, segments, out_dtype=None):
    B, L, H, K = q.shape
    V = v.shape[-1]
    o_dtype = _out_dtype(CoreLayout(chunk_load, chunk_store, num_out_states, chunk_size, out_dtype=out_dtype), q)
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, L, H, V, dtype=o_dtype), q.new_empty(num_out_states, H, 3, K, V, **f32),
            q.new_empty(len(STATS), num_out_states, H, **f32), q.new_empty(len(TOKEN_SLOTS), B, H, L, **f32),
            q.new_empty(len(CHUNK_SLOTS), B, H, L // chunk_size, **f32))


@torch.library.custom_op(f"{_NAMESPACE}::zeros_chunk_fused_backward", mutates_args=())
def _zeros_chunk_backward_op(do: _Tensor, d_out_states: _OptTensor, d_stats_out: _OptTensor, q: _Tensor, k: _Tensor,
                             v: _Tensor, s: _Tensor, g1: _Tensor, gh: _Tensor, g0: _OptTensor, valid: _OptTensor,
                             stats_in: _OptTensor, start_states: _OptTensor, tok: _Tensor, chunk: _Tensor,
                             chunk_load: _Tensor, chunk_store: _Tensor, chunk_size: int, num_loads: int,
                             segments: _OptTensor) -> list[_Tensor]:
    layout = CoreLayout(chunk_load, chunk_store, 0 if d_out_states is None else d_out_states.shape[0], chunk_size,
                        segments=segments)
    grads = _zeros_chunk_backward(do, d_out_states, d_stats_out, q, k, v, s, g1, gh, g0, valid, stats_in,
                                  start_states, tok, chunk, layout, num_loads)
    return [x if x is not None else q.new_empty(0) for x in grads]  # (absent: empty; the autograd maps them to None)


@_zeros_chunk_backward_op.register_fake
def _(do, d_out_states, d_stats_out, q, k, v, s, g1, gh, g0, valid, stats_in, start_states, *rest):
    B, T_in, H = s.shape
    new = lambda x, dtype=torch.float32: x.new_empty(x.shape, dtype=dtype)  # noqa: E731
    absent = q.new_empty(0)
    return [new(q, q.dtype), new(k, k.dtype), new(v, v.dtype), s.new_empty(3, B, T_in, H, dtype=torch.float32),
            s.new_empty(B, T_in, H, dtype=torch.float32) if g0 is not None else absent,
            new(stats_in) if stats_in is not None else absent,
            new(start_states) if start_states is not None else absent]


def _zeros_chunk_setup_context(ctx, inputs, output):
    (q, k, v, s, g1, gh, g0, valid, stats_in, start_states, chunk_load, chunk_store, _num_out, chunk_size, num_loads,
     segments, _out_dtype) = inputs
    _, _, _, tok, chunk = output
    ctx.mark_non_differentiable(tok, chunk)
    ctx.set_materialize_grads(False)  # (an unused output's gradient stays None: no zeros to allocate)
    ctx.save_for_backward(q, k, v, s, g1, gh, g0, valid, stats_in, start_states, tok, chunk, chunk_load, chunk_store,
                          segments)
    ctx.chunk_size, ctx.num_loads = chunk_size, num_loads
    ctx.dtypes = (s.dtype, g1.dtype, gh.dtype, None if g0 is None else g0.dtype)


def _zeros_chunk_backward_autograd(ctx, do, d_out_states, d_stats_out, _d_tok, _d_chunk):
    q, k, v, s, g1, gh, g0, valid, stats_in, start_states, tok, chunk, chunk_load, chunk_store, segments = \
        ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk, dv, d_scalars, dg0, d_stats_in, d_start = _zeros_chunk_backward_op(
        do, d_out_states, d_stats_out, q, k, v, s, g1, gh, g0, valid, stats_in, start_states, tok, chunk,
        chunk_load, chunk_store, ctx.chunk_size, ctx.num_loads, segments)
    ds, dg1, dgh = (x.to(dtype) for x, dtype in zip(d_scalars.unbind(0), ctx.dtypes))
    dg0 = dg0.to(ctx.dtypes[3]) if g0 is not None else None
    return (dq, dk, dv, ds, dg1, dgh, dg0, None, d_stats_in if stats_in is not None else None,
            d_start if start_states is not None else None) + (None,) * 7


_zeros_chunk_op.register_autograd(_zeros_chunk_backward_autograd, setup_context=_zeros_chunk_setup_context)


# ----------------------------------------------------------------------------------------------
# The entry ops.py calls
# ----------------------------------------------------------------------------------------------

def _check(q, k, v, scalars: Optional[ChunkScalars], start_states, layout: CoreLayout, name="chunk_core_fused"):
    """Clear errors for inputs the kernels cannot take. scalars None: the per-token inputs are checked by
    the caller (zeros_chunk_fused); start_states may then be None."""
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: mode='fused' needs Triton (pip install triton, Linux); "
                           "use mode='chunked' without it")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: q and k must be (B, T, H, d_k) of one shape and v (B, T, H, d_v); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype == torch.float64 or q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype among float32, float16, bfloat16 (got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}); Triton computes float64 wrong without an error, "
                         "use mode='chunked' for float64")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dimensions up to {MAX_HEAD_DIM} are supported, got d_k={K}, d_v={V}; "
                         "use mode='chunked'")
    C = layout.chunk_size
    if not is_kernel_chunk(C):
        raise ValueError(f"{name}: chunk_size must be a power of two >= {MIN_CHUNK_SIZE} (the kernels' tile), "
                         f"got {C!r}; ops_contract.kernel_chunk_size picks one")
    if T == 0 or T % C:
        raise ValueError(f"{name}: T = {T} must be a positive multiple of chunk_size = {C}; pad the chunks first")
    N = T // C
    if scalars is not None:
        scalars.check(B, H, T, N, name)
    for key in ("chunk_load", "chunk_store"):
        if tuple(getattr(layout, key).shape) != (B, N):
            raise ValueError(f"{name}: {key} must have shape {(B, N)}, got {tuple(getattr(layout, key).shape)}")
    if start_states is not None and (start_states.dim() != 5 or tuple(start_states.shape[1:]) != (H, 3, K, V)
                                     or start_states.shape[0] < 1):
        raise ValueError(f"{name}: start_states must be (S_in >= 1, H, 3, d_k, d_v) = (S_in, {H}, 3, {K}, {V}), "
                         f"got {tuple(start_states.shape)}")
    if layout.num_out_states < 0:
        raise ValueError(f"{name}: num_out_states must be >= 0, got {layout.num_out_states}")
    if layout.segments is not None and tuple(layout.segments.shape) != (B, T):
        raise ValueError(f"{name}: segments must be (B, T) = {(B, T)}, got {tuple(layout.segments.shape)}")
    tensors = dict(zip(ChunkScalars.NAMES, scalars.tensors())) if scalars is not None else {}
    tensors |= {"k": k, "v": v, "start_states": start_states, "chunk_load": layout.chunk_load,
                "chunk_store": layout.chunk_store}
    for key, x in tensors.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name}: {key} is on {x.device}, q on {q.device}: put all inputs on one device")
    if q.device.type == "cuda":  # (the interpreter checks below are not traceable by torch.compile)
        return
    if not _interpreter_consistent():
        raise RuntimeError(f"{name}: Triton was imported before TRITON_INTERPRET=1 was set, so its interpreter "
                           "cannot run; set TRITON_INTERPRET=1 in the environment before starting Python")
    if not _interpreting():
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
                         "in the environment before starting Python to run them on CPU in Triton's interpreter")


def fused_chunk_core(q, k, v, scalars: ChunkScalars, start_states: torch.Tensor, layout: CoreLayout):
    """The chunk core of ZeroS in Triton, differentiable (the contract and its math: ``ops_contract.py``).

    q, k, v share one dtype among float32, float16, bfloat16; scalars and start_states are float32 (or
    cast to it); layout.chunk_size is a kernel tile (a power of two >= 16). Returns o (B, T, H, d_v) in
    layout.out_dtype (float32 when None) and out_states (num_out_states, H, 3, d_k, d_v) float32. ``chunk_core_fused`` is this core in the
    flat convention (what ops.py calls).
    """
    _check(q, k, v, scalars, start_states, layout)
    scalars = scalars.detach_maxima()
    return _chunk_core_op(q, k, v, *scalars.tensors(), start_states, layout.chunk_load, layout.chunk_store,
                          layout.num_out_states, layout.chunk_size, layout.num_loads, layout.segments, layout.out_dtype)


chunk_core_fused = flat_entry(fused_chunk_core)


def zeros_chunk_fused(q, k, v, s, g1, gh, g0, valid, stats_in, start_states, layout: CoreLayout):
    """The chunked form of ZeroS in Triton, per-token scalars included, differentiable.

    q, k, v: (B', L, H, d) chunk-aligned (L = N C, padding k = v = 0), one dtype among float32, float16,
    bfloat16. s, g1, gh (and g0 on a zero-order layer, else None): (B', T_in, H) with T_in <= L, any strides
    and float dtype (positions from T_in on are padding). valid: (B', L) bool, the real positions, or None
    (those before T_in). stats_in: (4, S_in, H) float32, the rows E~, m, sbar, n of the incoming
    ``ZeroSState``s, and start_states (S_in, H, 3, d_k, d_v) their sums; both None for empty states.

    The scalars kernel forms what ``ops._chunk_scalars`` forms in PyTorch (running count, mean, maximum and
    E~ per sequence; the coefficients a, b, hc) by chunk-local scans with a carry, in float32; then the
    core's kernels (``fused_chunk_core``'s). Returns o (B', L, H, d_v) in layout.out_dtype (float32 when
    None), out_states (num_out_states, H, 3, d_k, d_v) and stats_out (4, num_out_states, H) (E~, m, sbar, n
    after each stored sequence), float32.
    """
    name = "zeros_chunk_fused"
    _check(q, k, v, None, start_states, layout, name)
    B, L, H, _ = q.shape
    for key, x in (("s", s), ("g1", g1), ("gh", gh), ("g0", g0)):
        if x is not None and (x.dim() != 3 or x.shape[0] != B or x.shape[1] > L or x.shape[2] != H):
            raise ValueError(f"{name}: {key} must be (B', T_in <= {L}, H) = ({B}, <= {L}, {H}), got {tuple(x.shape)}")
        if x is not None and (x.dtype == torch.float64 or not x.dtype.is_floating_point):
            raise ValueError(f"{name}: {key} must be float32, float16 or bfloat16, got {x.dtype}")
    if (stats_in is None) != (start_states is None):
        raise ValueError(f"{name}: give stats_in and start_states together (an incoming state), or neither")
    o, out_states, stats_out, _, _ = _zeros_chunk_op(
        q, k, v, s, g1, gh, g0, valid, stats_in, start_states, layout.chunk_load, layout.chunk_store,
        layout.num_out_states, layout.chunk_size, layout.num_loads, layout.segments, layout.out_dtype)
    return o, out_states, stats_out


# ----------------------------------------------------------------------------------------------
# RoPE + L2 normalisation of q and k (the layer's neighbours of the op on the CUDA path)
# ----------------------------------------------------------------------------------------------

def _rope_launch(kernel, x, cos, sin, *tensors):
    B, T, two, H, D = x.shape
    R = B * T * two * H
    cos, sin = (y.to(torch.float32) for y in (cos, sin))
    x = _interpreted_bf16(x)  # (a copy in the interpreter: its strides, not the view's)
    kernel[(triton.cdiv(R, ROPE_ROWS),)](
        x, cos, sin, *tensors, R, T, H, *x.stride()[:4], cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), D=D, BR=ROPE_ROWS)


@torch.library.custom_op(f"{_NAMESPACE}::rope_normalize", mutates_args=())
def _rope_normalize_op(x: _Tensor, cos: _Tensor, sin: _Tensor) -> _Tensor:
    y = torch.empty(x.shape, dtype=_interpreted_bf16(x).dtype, device=x.device)
    _rope_launch(_rope_norm_fwd_kernel, x, cos, sin, y)
    return _from_interpreted(y, x.dtype)


@_rope_normalize_op.register_fake
def _(x, cos, sin):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op(f"{_NAMESPACE}::rope_normalize_bwd", mutates_args=())
def _rope_normalize_backward_op(dy: _Tensor, x: _Tensor, cos: _Tensor, sin: _Tensor) -> _Tensor:
    dx = torch.empty(x.shape, dtype=_interpreted_bf16(x).dtype, device=x.device)
    _rope_launch(_rope_norm_bwd_kernel, x, cos, sin, _interpreted_bf16(dy).contiguous(), dx)
    return _from_interpreted(dx, x.dtype)


@_rope_normalize_backward_op.register_fake
def _(dy, x, cos, sin):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rope_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rope_backward(ctx, dy):
    x, cos, sin = ctx.saved_tensors
    return _rope_normalize_backward_op(dy, x, cos, sin), None, None


_rope_normalize_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def rope_normalize_fused(x, cos, sin):
    """RoPE then L2 normalisation of q and k in one kernel (``modeling_zeros.apply_rope`` then
    ``F.normalize``; float32 inside): x (B, T, 2, H, d) with any strides (the q, k part of the fused
    projection), cos and sin (B, T, 1, d / 2) (any strides). Returns (B, T, 2, H, d) contiguous in x's dtype,
    differentiable in x (cos and sin take no gradient)."""
    if not HAS_TRITON:
        raise RuntimeError("rope_normalize_fused needs Triton")
    if x.dim() != 5 or x.shape[2] != 2 or x.shape[-1] % 2 or x.shape[-1] & (x.shape[-1] - 1) \
            or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rope_normalize_fused: x must be (B, T, 2, H, d), d a power of two, float32 / float16 / "
                         f"bfloat16; got {tuple(x.shape)} {x.dtype}")
    return _rope_normalize_op(x, cos, sin)


# ----------------------------------------------------------------------------------------------
# The deviation logit s (the layer's neighbour of the op on the CUDA path)
# ----------------------------------------------------------------------------------------------

# Tokens per block of the logit kernels (their running sum is a (block, block) x (block, d) product) and
# their launch options: no register spills at d = 64 on sm_90 (benchmarks/kernel_stats.py).
LOGIT_BLOCK = 32
_LOGIT_LAUNCH = dict(num_warps=8)


def _logit_args(u, counts, valid, segment):
    """The logit kernels' common operands: u (interpreted bfloat16 as float32), counts, the valid / segment
    pointers (stand-ins when absent), u's strides, and the flags."""
    u_k = _interpreted_bf16(u)
    B, T, H, D = u.shape
    flags = dict(D=D, BT=LOGIT_BLOCK, HAS_VALID=valid is not None, HAS_SEG=segment is not None,
                 LOWP=u_k.dtype != torch.float32, F32=FLOAT32_DOT)
    return (u_k, counts, counts if valid is None else valid, counts if segment is None else segment,
            (u_k.stride(0), u_k.stride(1), u_k.stride(2)), flags, B, T, H, D)


@torch.library.custom_op(f"{_NAMESPACE}::deviation_logits", mutates_args=())
def _deviation_logits_op(u: _Tensor, mu: _Tensor, log_tau: _Tensor, counts: _Tensor, valid: _OptTensor,
                         segment: _OptTensor) -> tuple[_Tensor, _Tensor]:
    u_k, counts, valid_p, seg_p, strides, flags, B, T, H, D = _logit_args(u, counts, valid, segment)
    s = torch.empty(B, T, H, dtype=torch.float32, device=u.device)
    carries = torch.empty(B, H, triton.cdiv(T, LOGIT_BLOCK), D, dtype=torch.float32, device=u.device)
    _logit_fwd_kernel[(B * H,)](u_k, mu, log_tau, counts, valid_p, seg_p, s, carries, T, H, *strides, D ** -0.5,
                                **flags, **_LOGIT_LAUNCH)
    return s, carries


@_deviation_logits_op.register_fake
def _(u, mu, log_tau, counts, valid, segment):
    B, T, H, D = u.shape
    return (u.new_empty(B, T, H, dtype=torch.float32),
            u.new_empty(B, H, -(-T // LOGIT_BLOCK), D, dtype=torch.float32))


@torch.library.custom_op(f"{_NAMESPACE}::deviation_logits_bwd", mutates_args=())
def _deviation_logits_backward_op(ds: _Tensor, u: _Tensor, mu: _Tensor, log_tau: _Tensor, counts: _Tensor,
                                  valid: _OptTensor, segment: _OptTensor, carries: _Tensor
                                  ) -> tuple[_Tensor, _Tensor, _Tensor]:
    u_k, counts, valid_p, seg_p, strides, flags, B, T, H, D = _logit_args(u, counts, valid, segment)
    du = torch.empty(B, T, H, D, dtype=u_k.dtype, device=u.device)
    d_mu = torch.empty(B, H, D, dtype=torch.float32, device=u.device)
    d_log_tau = torch.empty(B, H, dtype=torch.float32, device=u.device)
    _logit_bwd_kernel[(B * H,)](u_k, mu, log_tau, counts, valid_p, seg_p, carries, ds.contiguous(), du, d_mu,
                                d_log_tau, T, H, *strides, D ** -0.5, **flags, **_LOGIT_LAUNCH)
    return _from_interpreted(du, u.dtype), d_mu.sum(0).to(mu.dtype), d_log_tau.sum(0).to(log_tau.dtype)


@_deviation_logits_backward_op.register_fake
def _(ds, u, mu, log_tau, counts, valid, segment, carries):
    return torch.empty(u.shape, dtype=u.dtype, device=u.device), torch.empty_like(mu), torch.empty_like(log_tau)


def _logit_setup_context(ctx, inputs, output):
    u, mu, log_tau, counts, valid, segment = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, mu, log_tau, counts, valid, segment, output[1])


def _logit_backward(ctx, ds, _d_carries):
    u, mu, log_tau, counts, valid, segment, carries = ctx.saved_tensors
    if ds is None:
        return (None,) * 6
    du, d_mu, d_log_tau = _deviation_logits_backward_op(ds, u, mu, log_tau, counts, valid, segment, carries)
    return du, d_mu, d_log_tau, None, None, None


_deviation_logits_op.register_autograd(_logit_backward, setup_context=_logit_setup_context)


def deviation_logits_fused(u, mu, log_tau, counts, valid=None, segment=None):
    """The deviation logit of docs/method.md in one kernel (forward and backward), from an empty running sum:

        s_t = -(u_t . ubar_t) / sqrt(d),  ubar_t = (tau mu + sum_{i<=t} u_i) / (tau + n_t),  tau = exp(log_tau)

    the sum over the real tokens of the token's document. u (B, T, H, d) with any strides (the fused
    projection's u part), mu (H, d), log_tau (H,), counts (B, T) int (n_t), valid (B, T) bool or None,
    segment (B, T) int (each token's document) or None. Returns s (B, T, H) float32; differentiable in u,
    mu and log_tau (``ZeroSAttention._logits`` is the PyTorch form)."""
    if not HAS_TRITON:
        raise RuntimeError("deviation_logits_fused needs Triton")
    D = u.shape[-1]
    if u.dim() != 4 or D < _MIN_BLOCK or D & (D - 1) or u.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"deviation_logits_fused: u must be (B, T, H, d), d a power of two >= {_MIN_BLOCK}, "
                         f"float32 / float16 / bfloat16; got {tuple(u.shape)} {u.dtype}")
    return _deviation_logits_op(u, mu, log_tau, counts.contiguous(), valid, segment)[0]
