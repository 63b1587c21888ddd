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

from .ops_contract import MIN_KERNEL_CHUNK, ChunkScalars, CoreLayout, flat_entry, is_kernel_chunk

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU installs without Triton: the other modes of ops.py keep working
    triton = tl = None
    HAS_TRITON = False

__all__ = ["chunk_core_fused", "fused_chunk_core", "HAS_TRITON", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "MIN_CHUNK_SIZE"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The output and backward kernels hold a whole (C, d_k) tile (Q K^T sums over d_k).
MAX_HEAD_DIM = 128
# tl.dot needs every dimension >= 16 on a GPU; tl.arange needs powers of two (ops_contract.is_kernel_chunk).
MIN_CHUNK_SIZE = MIN_KERNEL_CHUNK
_MIN_BLOCK = 16
# Block sizes: the states kernels split d_k and d_v into blocks (more programs in flight, smaller
# tiles), the output kernel splits d_v, the per-chunk backward loops over d_v blocks. Those that hold
# a whole d_k (Q K^T sums over it) take it in one block of up to MAX_HEAD_DIM. Chosen without a GPU to
# time them, from compiling for sm_90 (Triton's ahead-of-time compiler): the fewest register spills
# at d = 64, C = 64 within 80 KiB of shared memory (A100 / H100 both fit).
SPLIT_BLOCK_K = 32
SPLIT_BLOCK_V = 32
# The per-chunk backward: 8 warps, no software pipelining of its d_v loop (that would multiply its
# shared memory), d_v blocks of SPLIT_BLOCK_V.
_CHUNK_BWD_LAUNCH = dict(num_warps=8, num_stages=1)
# The products that must be float32-grade (states, readouts, output gradients): tl.dot's
# input_precision. "tf32x3" (three TF32 tensor-core products, about float32's accuracy) or "ieee"
# (CUDA-core FMAs). The interpreter computes both in float32.
FLOAT32_DOT = "tf32x3"


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

    @triton.jit
    def _weights_dot(w, x, LOWP: tl.constexpr, F32: tl.constexpr):
        """w (M, L) float32 weights times x (L, N): float32 (M, N).

        With LOWP (16-bit x) each row of w is scaled to max |w| = 1 and rounded to x's dtype (tensor
        cores): a relative error of each weight. Unscaled, the small weights of nearly uniform logits
        (~0.01 / t) would fall into fp16's subnormals within a few hundred tokens.
        """
        if LOWP:
            scale = tl.max(tl.abs(w), axis=1)
            scale = tl.where(scale > 0, scale, 1.0)
            return tl.dot((w / scale[:, None]).to(x.dtype), x) * scale[:, None]
        else:
            return tl.dot(w, x.to(tl.float32), input_precision=F32)

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
                           HAS_SEG: tl.constexpr):
        """Grid (d_k blocks, d_v blocks, B H). Writes the state at each chunk start to kv_starts (B, H, N, 3, K, V)."""
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
            src = start_states + (tl.maximum(ld, 0).to(tl.int64) * H + i_h) * 3 * KV + kv_off
            F = tl.where(loads, tl.load(src, mask=mask_kv & loads, other=0.0), F)
            G = tl.where(loads, tl.load(src + KV, mask=mask_kv & loads, other=0.0), G)
            Hs = tl.where(loads, tl.load(src + 2 * KV, mask=mask_kv & loads, other=0.0), Hs)
            dst = kv_starts + (i_bh * N + j) * 3 * KV + kv_off
            tl.store(dst, F, mask=mask_kv)
            tl.store(dst + KV, G, mask=mask_kv)
            tl.store(dst + 2 * KV, Hs, mask=mask_kv)

            t = j * C + o_c
            k_c = tl.load(k + ((i_b * T + t[:, None]) * H + i_h) * K + o_k[None, :], mask=mask_k[None, :], other=0.0)
            v_c = tl.load(v + ((i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], mask=mask_v[None, :], other=0.0)
            k_c = k_c.to(tl.float32)
            v_c = v_c.to(tl.float32)
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
            k_t = tl.trans(k_c)
            F += tl.dot(k_t, v_c * tl.exp(tl.minimum(s_c - m1_j, 0.0))[:, None], input_precision=F32)
            G += tl.dot(k_t, v_c * (s_c - sb1_j)[:, None], input_precision=F32)
            Hs += tl.dot(k_t, v_c, input_precision=F32)
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

        # Before the chunk: the start state, read in float32 (a F + hc H cancels for uniform logits).
        src = kv_starts + (i_bh * N + i_n) * 3 * KV + o_k[:, None] * V + o_v[None, :]
        q_f = q_c.to(tl.float32)
        acc += tl.dot(q_f * alpha[:, None], tl.load(src, mask=mask_kv, other=0.0), input_precision=F32)
        acc += tl.dot(q_f * b_r[:, None], tl.load(src + KV, mask=mask_kv, other=0.0), input_precision=F32)
        acc += tl.dot(q_f * hc_r[:, None], tl.load(src + 2 * KV, mask=mask_kv, other=0.0), input_precision=F32)
        tl.store(o + row * V + o_v[None, :], acc, mask=mask_v[None, :])

    @triton.jit
    def _states_bwd_kernel(q, do, m, a, b, hc, m0, m1, sb0, sb1, chunk_load, chunk_store, load_slot, d_out,
                           dkv_ends, d_starts, seg, T, H, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr, HAS_SEG: tl.constexpr):
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
            q_c = tl.load(q + row * K + o_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
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
            dF += tl.dot(tl.trans(q_c * alpha[:, None]), do_c, input_precision=F32)
            dG += tl.dot(tl.trans(q_c * b_r[:, None]), do_c, input_precision=F32)
            dH += tl.dot(tl.trans(q_c * hc_r[:, None]), do_c, input_precision=F32)

            ld = tl.load(chunk_load + i_b * N + j)
            loads = (zero_kv + ld) >= 0
            dst = d_starts + (tl.maximum(tl.load(load_slot + i_b * N + j), 0).to(tl.int64) * H + i_h) * 3 * KV + kv_off
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
        (BV,), the (d_k, BV) mask of state tiles, and the chunk's v (float32) and do tiles (C, BV)."""
        o_v = v0 + tl.arange(0, BV)
        mask_v = o_v < V
        v_f = tl.load(v + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        do_c = tl.load(do + row * V + o_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        return o_v, mask_v, mask_k[:, None] & mask_v[None, :], v_f, do_c

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
        qk = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PREC)

        # Sums over d_v, block by block: do v^T, and the readout of the start state (float32).
        dov = tl.zeros([C, C], dtype=tl.float32)
        dq_c = tl.zeros([C, BK], dtype=tl.float32)
        read_F = tl.zeros([C], dtype=tl.float32)     # q_t^T F do_t, and likewise for G and H
        read_G = tl.zeros([C], dtype=tl.float32)
        read_H = tl.zeros([C], dtype=tl.float32)
        shift_k = tl.zeros([BK], dtype=tl.float32)   # <dG', H> row sums: the gradient of sb0 - sb1
        for v0 in range(0, V, BV):
            o_v, mask_v, mask_kv, v_f, do_c = _value_block(v, do, row, v0, mask_k, V, BV)
            kv_off = o_k[:, None] * V + o_v[None, :]
            start = kv_starts + p * 3 * KV + kv_off
            F0 = tl.load(start, mask=mask_kv, other=0.0)
            G0 = tl.load(start + KV, mask=mask_kv, other=0.0)
            H0 = tl.load(start + 2 * KV, mask=mask_kv, other=0.0)
            dG = tl.load(dkv_ends + p * 3 * KV + KV + kv_off, mask=mask_kv, other=0.0)
            dov += tl.dot(do_c, tl.trans(v_f), input_precision=F32)
            dq_c += tl.dot(do_c * (a_c * decay)[:, None], tl.trans(F0), input_precision=F32)
            dq_c += tl.dot(do_c * (b_c * reader)[:, None], tl.trans(G0), input_precision=F32)
            dq_c += tl.dot(do_c * (hc_c * reader)[:, None], tl.trans(H0), input_precision=F32)
            read_F += tl.sum(tl.dot(q_f, F0, input_precision=F32) * do_c, axis=1)
            read_G += tl.sum(tl.dot(q_f, G0, input_precision=F32) * do_c, axis=1)
            read_H += tl.sum(tl.dot(q_f, H0, input_precision=F32) * do_c, axis=1)
            shift_k += tl.sum(dG * H0, axis=1)

        # With D[t, i] = (q_t . k_i)(do_t . v_i), the gradient of R[t, i].
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
        k_f = k_c.to(tl.float32)
        if HAS_SEG:  # only the keys of the chunk's last sequence are in the state after it
            writers = _chunk_segments(seg, i_b, i_n, T, C)[0]
            k_f = tl.where(writers[:, None], k_f, 0.0)
        else:
            writers = o_c >= 0

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
            o_v, mask_v, mask_kv, v_f, do_c = _value_block(v, do, row, v0, mask_k, V, BV)
            end = dkv_ends + p * 3 * KV + o_k[:, None] * V + o_v[None, :]
            dF = tl.load(end, mask=mask_kv, other=0.0)
            dG = tl.load(end + KV, mask=mask_kv, other=0.0)
            dH = tl.load(end + 2 * KV, mask=mask_kv, other=0.0)
            dov += tl.dot(do_c, tl.trans(v_f), input_precision=F32)
            v_w = tl.where(writers[:, None], v_f, 0.0)
            dk_c += tl.dot(v_w * e1[:, None], tl.trans(dF), input_precision=F32)
            dk_c += tl.dot(v_w * centred1[:, None], tl.trans(dG), input_precision=F32)
            dk_c += tl.dot(v_w, tl.trans(dH), input_precision=F32)
            kdF = tl.dot(k_f, dF, input_precision=F32)
            kdG = tl.dot(k_f, dG, input_precision=F32)
            dv_c = tl.dot(tl.trans(w), do_c, input_precision=F32)
            dv_c += e1[:, None] * kdF + centred1[:, None] * kdG + tl.dot(k_f, dH, input_precision=F32)
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
                BK_SPLIT=min(_block(K), max(_MIN_BLOCK, SPLIT_BLOCK_K)), BV=min(_block(V), max(_MIN_BLOCK, SPLIT_BLOCK_V)),
                DOT_PREC=FLOAT32_DOT if q.dtype == torch.float32 else "tf32", LOWP=q.dtype != torch.float32,
                F32=FLOAT32_DOT)


def _states_grid(z):
    return (triton.cdiv(z["K"], z["BK_SPLIT"]), triton.cdiv(z["V"], z["BV"]), z["B"] * z["H"])


def _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, out_states, seg, z):
    """Runs the states kernel; returns the state at each chunk start, (B, H, N, 3, K, V) float32."""
    kv_starts = torch.empty(z["B"], z["H"], z["N"], 3, z["K"], z["V"], dtype=torch.float32, device=k.device)
    store_out = out_states is not None
    _states_fwd_kernel[_states_grid(z)](
        k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, kv_starts,
        out_states if store_out else kv_starts, seg, z["T"], z["H"], z["N"], K=z["K"], V=z["V"], C=z["C"],
        BK=z["BK_SPLIT"], BV=z["BV"], STORE_OUT=store_out, F32=z["F32"], HAS_SEG=z["HAS_SEG"])
    return kv_starts


def _segment_ids(segments, chunk_load):
    """The kernels' seg operand: segments (B, T) as int32, or chunk_load as a stand-in pointer (never read
    without HAS_SEG); and HAS_SEG."""
    if segments is None:
        return chunk_load, False
    return segments.to(device=chunk_load.device, dtype=torch.int32).contiguous(), True


def _prepare(q, k, v, scalars: ChunkScalars, start_states, chunk_load, chunk_store, *extra):
    """Contiguous kernel operands: q, k, v and the ``extra`` tensors (the gradients coming in) in their
    dtype (float32 for bfloat16 under the interpreter, which computes bfloat16 wrong), scalars and states
    float32, chunk tables int32 (each a no-op when it is so already, as ops.py passes them)."""
    interpreted_bf16 = lambda x: x.float() if x.dtype == torch.bfloat16 and _interpreting() else x  # noqa: E731
    q, k, v = (interpreted_bf16(x).contiguous() for x in (q, k, v))
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    chunk_load, chunk_store = (x.to(device=q.device, dtype=torch.int32).contiguous() for x in (chunk_load, chunk_store))
    return (q, k, v, scalars.map(f32), f32(start_states), chunk_load, chunk_store,
            *(interpreted_bf16(x).contiguous() for x in extra))


def _out_dtype(layout: CoreLayout, q) -> torch.dtype:
    """o's dtype: the layout's out_dtype (float32 for bfloat16 under the interpreter), else float32."""
    if layout.out_dtype is None or (layout.out_dtype == torch.bfloat16 and _interpreting()):
        return torch.float32
    return layout.out_dtype


def _forward_impl(q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout):
    q, k, v, scalars, start_states, chunk_load, chunk_store = _prepare(
        q, k, v, scalars, start_states, layout.chunk_load, layout.chunk_store)
    s, m, a, b, hc, m0, m1, sb0, sb1 = scalars.tensors()
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    # At least one row, so that the kernel always gets a real pointer; the extra row is never written.
    out_states = torch.zeros(max(layout.num_out_states, 1), z["H"], 3, z["K"], z["V"], dtype=torch.float32,
                             device=q.device)
    kv_starts = _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, out_states, seg, z)
    o = torch.empty(z["B"], z["T"], z["H"], z["V"], dtype=_out_dtype(layout, q), device=q.device)
    _output_fwd_kernel[(triton.cdiv(z["V"], z["BV"]), z["N"], z["B"] * z["H"])](
        q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, o, seg, z["T"], z["H"], z["N"], K=z["K"], V=z["V"], C=z["C"],
        BK=z["BK"], BV=z["BV"], DOT_PREC=z["DOT_PREC"], LOWP=z["LOWP"], F32=z["F32"], HAS_SEG=z["HAS_SEG"])
    return o, out_states[:layout.num_out_states]


def _backward_impl(do, d_out_states, q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout,
                   num_loads: int):
    """Gradients of q, k, v (their dtypes), of the differentiable scalars (s, a, b, hc, sb0, sb1) and of
    start_states. num_loads: how many chunks load a start state (a host int: nothing waits for the device)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    num_in = start_states.shape[0]
    q, k, v, scalars, start_states, chunk_load, chunk_store, do, d_out_states = _prepare(
        q, k, v, scalars, start_states, layout.chunk_load, layout.chunk_store, do, d_out_states)
    s, m, a, b, hc, m0, m1, sb0, sb1 = scalars.tensors()
    z = _meta(q, v, layout.chunk_size)
    seg, z["HAS_SEG"] = _segment_ids(layout.segments, chunk_load)
    dev = q.device
    kv_starts = _chunk_starts(k, v, s, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store, None, seg, z)

    # Each loading chunk gets its own slot for its start-state gradient; rows loaded by several chunks
    # are summed afterwards. The number of slots comes from the host (num_loads), so nothing here waits
    # for the device: the slot -> row table is a scatter, with the chunks that load nothing sent to an
    # extra slot that is dropped.
    loads = chunk_load >= 0
    slots = loads.flatten().cumsum(0).view_as(loads) - 1
    load_slot = torch.where(loads, slots, -1).to(torch.int32).contiguous()
    load_rows = torch.zeros(num_loads + 1, dtype=torch.long, device=dev).scatter_(
        0, torch.where(loads, slots, num_loads).flatten().long(), chunk_load.flatten().long().clamp(min=0))[:num_loads]
    d_starts = torch.empty(max(num_loads, 1), z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=dev)
    if d_out_states.shape[0] == 0:  # a real pointer for the kernel; chunk_store never points into it then
        d_out_states = torch.zeros(1, z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=dev)
    dkv_ends = torch.empty_like(kv_starts)
    _states_bwd_kernel[_states_grid(z)](
        q, do, m, a, b, hc, m0, m1, sb0, sb1, chunk_load, chunk_store, load_slot, d_out_states, dkv_ends, d_starts,
        seg, z["T"], z["H"], z["N"], K=z["K"], V=z["V"], C=z["C"], BK=z["BK_SPLIT"], BV=z["BV"], F32=z["F32"],
        HAS_SEG=z["HAS_SEG"])

    # Written by the kernels in the inputs' dtype (their float32 sums rounded once, on the store).
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=dev) for x in (q, k, v))
    ds, da, db, dhc = (torch.empty_like(s) for _ in range(4))
    dsb0, dsb1 = torch.empty_like(sb0), torch.empty_like(sb1)
    chunk_grid = (z["N"], z["B"] * z["H"])
    sizes = dict(K=z["K"], V=z["V"], C=z["C"], BK=z["BK"], BV=z["BV"], DOT_PREC=z["DOT_PREC"], LOWP=z["LOWP"],
                 F32=z["F32"], HAS_SEG=z["HAS_SEG"], **_CHUNK_BWD_LAUNCH)
    _chunk_bwd_q_kernel[chunk_grid](q, k, v, s, m, a, b, hc, m0, sb0, kv_starts, dkv_ends, do, dq, da, db, dhc, ds,
                                    dsb0, dsb1, seg, z["T"], z["H"], z["N"], **sizes)
    _chunk_bwd_kv_kernel[chunk_grid](q, k, v, s, m, a, b, hc, m1, sb0, sb1, dkv_ends, do, dk, dv, ds, dsb1, seg,
                                     z["T"], z["H"], z["N"], **sizes)
    d_start_states = torch.zeros(num_in, z["H"], 3, z["K"], z["V"], dtype=torch.float32, device=dev)
    d_start_states.index_add_(0, load_rows, d_starts[:num_loads])
    dq, dk, dv = (x.to(dtype) for x, dtype in zip((dq, dk, dv), dtypes))  # (no-ops but for interpreted bf16)
    return dq, dk, dv, ds, da, db, dhc, dsb0, dsb1, d_start_states


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
                            ) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor,
                                       _Tensor]:
    scalars, start_states, layout = _typed((s, m, a, b, hc, m0, m1, sb0, sb1), start_states, chunk_load, chunk_store,
                                           d_out_states.shape[0], chunk_size, segments)
    return _backward_impl(do, d_out_states, q, k, v, scalars, start_states, layout, num_loads)


@_chunk_core_backward_op.register_fake
def _(do, d_out_states, q, k, v, s, m, a, b, hc, m0, m1, sb0, sb1, start_states, *rest):
    # Contiguous, as _backward_impl returns them whatever the inputs' strides (the model passes (B, H, T)
    # views of (B, T, H) tensors; compiled code checks the real strides against these).
    new = lambda x, dtype=torch.float32: x.new_empty(x.shape, dtype=dtype)  # noqa: E731
    return (new(q, q.dtype), new(k, k.dtype), new(v, v.dtype), new(s), new(a), new(b), new(hc), new(sb0), new(sb1),
            new(start_states))


def _setup_context(ctx, inputs, output):
    *tensors, _num_out_states, chunk_size, num_loads, segments, _out_dtype = inputs
    ctx.save_for_backward(*tensors, segments)
    ctx.chunk_size, ctx.num_loads = chunk_size, num_loads


def _backward(ctx, do, d_out_states):
    *tensors, segments = ctx.saved_tensors
    q, v, start_states = tensors[0], tensors[2], tensors[12]
    if do is None:
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    if d_out_states is None:
        d_out_states = torch.zeros(0, *start_states.shape[1:], dtype=torch.float32, device=q.device)
    dq, dk, dv, ds, da, db, dhc, dsb0, dsb1, d_start = _chunk_core_backward_op(
        do, d_out_states, *tensors, ctx.chunk_size, ctx.num_loads, segments)
    return dq, dk, dv, ds, None, da, db, dhc, None, None, dsb0, dsb1, d_start, None, None, None, None, None, None, None


_chunk_core_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The entry ops.py calls
# ----------------------------------------------------------------------------------------------

def _check(q, k, v, scalars: ChunkScalars, start_states, layout: CoreLayout):
    name = "chunk_core_fused"
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
    scalars.check(B, H, T, N, name)
    for key in ("chunk_load", "chunk_store"):
        if tuple(getattr(layout, key).shape) != (B, N):
            raise ValueError(f"{name}: {key} must have shape {(B, N)}, got {tuple(getattr(layout, key).shape)}")
    if start_states.dim() != 5 or tuple(start_states.shape[1:]) != (H, 3, K, V) or start_states.shape[0] < 1:
        raise ValueError(f"{name}: start_states must be (S_in >= 1, H, 3, d_k, d_v) = (S_in, {H}, 3, {K}, {V}), "
                         f"got {tuple(start_states.shape)}")
    if layout.num_out_states < 0:
        raise ValueError(f"{name}: num_out_states must be >= 0, got {layout.num_out_states}")
    if layout.segments is not None and tuple(layout.segments.shape) != (B, T):
        raise ValueError(f"{name}: segments must be (B, T) = {(B, T)}, got {tuple(layout.segments.shape)}")
    tensors = dict(zip(ChunkScalars.NAMES, scalars.tensors()))
    tensors |= {"k": k, "v": v, "start_states": start_states, "chunk_load": layout.chunk_load,
                "chunk_store": layout.chunk_store}
    for key, x in tensors.items():
        if x.device != q.device:
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
