"""ZeroS language model with Hugging Face interfaces (in the style of modeling_mamba.py).

Contents: the three token mixers (ZeroSAttention, SoftmaxAttention, LinearAttention), the block,
ZeroSModel and ZeroSForCausalLM (PreTrainedModel + GenerationMixin). Beside it: the building blocks
(RMSNorm, RoPE, the SwiGLU MLP, the short convolution: layers_zeros.py), the cache and its state files
(cache_zeros.py), packed documents (packing.py), the kernels (ops.py, ops_fused.py, ops_softmax.py).

``save_pretrained`` copies this file into the model directory for ``trust_remote_code=True``
loading, together with the files it imports relatively, recursively (as flat siblings). It and they
must therefore import nothing from the ``zeros_lm`` package but those flat siblings (no subpackages).

Shapes: B batch, T new tokens, S tokens already in the cache, H (query) heads, Hkv key/value heads
(``num_key_value_heads``; each serves H / Hkv query heads), d head dimension.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

try:  # transformers' init functions skip weights that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

from .cache_zeros import LinearLayerState, SoftmaxLayerState, ZeroSCache, ZeroSLayerState
from .configuration_zeros import ZeroSConfig
from .layers_zeros import (  # noqa: F401  (the building blocks; apply_rope, rope_cos_sin re-exported)
    ShortConvolution,
    ZeroSMLP,
    ZeroSRMSNorm,
    apply_rope,
    l2_normalize,
    one_per_group,
    repeat_kv_heads,
    rope_cos_sin,
    split_projection,
)
from .ops import ChunkLayouts, accumulation_dtype, as_dtype, cumsum_tokens, fused_applies, linear_attention_chunked, named_range, zeros_attention
from .ops_softmax import packed_softmax_attention, softmax_attention_mask
from .packing import (
    PackedDocuments,
    linear_attention_over_documents,
    packed_position_ids,
    zeros_attention_over_documents,
)

logger = logging.get_logger(__name__)

OUTPUT_NORM_EPS = 1e-5  # per-head LayerNorm of the ZeroS output


@dataclasses.dataclass(frozen=True)
class MixerContext:
    """What every token mixer of one forward pass reads besides its input; the model builds it once.

    cos, sin: (B, T, 1, d/2) RoPE at each column's position (counts - 1);
    counts: (B, T) long, the real tokens of the row (of its document with packed documents) up to and
        including each column, those already in the cache included: the t of docs/method.md;
    valid: (B, T) bool, which columns are real tokens; None when all are;
    documents: the packed documents of the rows (no cache then), or None: one sequence per row;
    chunk_layouts: where the ZeroS op keeps the chunk layouts of this batch (``zeros_attention``'s
        ``chunk_layouts``): built by the first layer that needs one, reused by the others.

    (The cache travels beside it, as its own argument: gradient checkpointing drops it.)
    """

    cos: torch.Tensor
    sin: torch.Tensor
    counts: torch.Tensor
    valid: torch.Tensor | None = None
    documents: PackedDocuments | None = None
    chunk_layouts: ChunkLayouts = dataclasses.field(default_factory=ChunkLayouts, compare=False, repr=False)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class ZeroSAttention(nn.Module):
    """ZeroS zero-sum linear attention (docs/method.md section 2).

    q, k, v, u projections (one fused matrix, optionally through a short causal convolution); a gate
    projection with two gates per head (g1, gh), three when ``has_zero_order`` (g0 of the zero-order
    term g0/t; the model decides which layer carries it: :func:`zero_order_layers`); RoPE on q and k at
    the positions of the real tokens, then L2 normalisation; the radial logit s; the core op; a per-head
    LayerNorm without affine parameters; the output projection.

    Grouped K/V heads: k, v and u (so the logit s and its prior mu, tau) are per K/V head, q and the
    gates per query head. Every key-side sum of the state (F, G, H, E, the logits' maximum and mean, the
    u-sum) is then the same for a group's query heads, and the cache keeps it once per K/V head
    (docs/method.md, "Grouped K/V heads"). The op itself runs per query head on the repeated k, v, s.

    Cache slot: a ZeroSLayerState (cache_zeros.py), Hkv heads.
    """

    def __init__(self, config: ZeroSConfig, layer_idx: int, *, has_zero_order: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.has_zero_order = has_zero_order
        self.num_gates = 3 if self.has_zero_order else 2
        # rows: q (H d), k, v, u (Hkv d each)
        self.qkvu_sizes = [n * self.head_dim for n in (self.num_heads,) + (self.num_kv_heads,) * 3]
        self.qkvu_proj = nn.Linear(config.hidden_size, sum(self.qkvu_sizes), bias=False)
        self.conv = ShortConvolution(sum(self.qkvu_sizes), config.conv_size) if config.conv_size else None
        if config.use_gates:
            self.gate_proj = nn.Linear(config.hidden_size, self.num_heads * self.num_gates, bias=True)
        if config.logit_type == "deviation":
            self.mu = nn.Parameter(torch.zeros(self.num_kv_heads, self.head_dim))
            self.log_tau = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj._is_residual_output = True

    def _logits(self, u, valid, counts, usum, documents=None, fused=False):
        """Radial logits s (B, T, Hkv) in float32 and the new running sum of u (deviation logit); with
        packed ``documents`` the running mean restarts at each document. fused: the fused kernels' path
        without a cache (one kernel, ``ops_fused.deviation_logits_fused``; no running sum returned)."""
        if fused and usum is None and self.config.logit_type == "deviation":
            from .ops_fused import deviation_logits_fused
            return deviation_logits_fused(u, self.mu, self.log_tau, counts, valid,
                                          None if documents is None else documents.segment), None
        uf = as_dtype(u, accumulation_dtype(u.dtype))
        d = self.head_dim
        if self.config.logit_type == "norm":
            return uf.pow(2).sum(-1) / d, None
        um = uf if valid is None else uf * valid[:, :, None, None]
        # sum_{j<=t} u_j over this call's tokens (of the document); one token (decoding) is its own sum
        if documents is not None:
            csum = documents.running_sum(um)
        else:
            csum = um if um.shape[1] == 1 else cumsum_tokens(um)
        if usum is not None:
            csum = csum + usum.unsqueeze(1)
        tau = as_dtype(self.log_tau, uf.dtype).exp()  # (H,)
        # s = -u . ubar / sqrt(d), ubar = (csum + tau mu) / (tau + t): the division on the (B, T, H) dot products
        scale = (tau + counts.unsqueeze(-1)) * -math.sqrt(d)
        s = torch.linalg.vecdot(uf, torch.addcmul(csum, tau.unsqueeze(-1), as_dtype(self.mu, uf.dtype))) / scale
        return s, csum[:, -1]

    def forward(self, x: torch.Tensor, context: MixerContext, cache: ZeroSCache | None = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); reads and updates this layer's slot of ``cache``."""
        B, T, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        groups = H // Hkv
        acc = accumulation_dtype(x.dtype)
        valid, documents = context.valid, context.documents
        state = cache.layer_state(self.layer_idx) if cache is not None else None
        core_state, usum, conv_state = (None, None, None) if state is None else (state.core, state.u_sum, state.conv)
        qkvu = self.qkvu_proj(x)
        if self.conv is not None:
            qkvu, conv_state = self.conv(qkvu, valid=valid, state=conv_state, documents=documents)
        mode = "auto" if self.config.attention_backend == "auto" else "chunked"
        if T == 1 and cache is not None and documents is None:
            mode = "recurrent"
        if groups == 1:
            qk, v, u = split_projection(qkvu.view(B, T, 4, H, d))
            # q and k together: RoPE, then L2 normalisation (on the fused kernels' path one kernel, writing
            # the projections' dtype, which the kernels take)
            fused = mode == "auto" and fused_applies(v, v)
            if fused:
                from .ops_fused import rope_normalize_fused
                q, k = rope_normalize_fused(qk, context.cos, context.sin).unbind(dim=2)
            else:
                qk = apply_rope(qk, context.cos, context.sin)
                q, k = as_dtype(l2_normalize(as_dtype(qk, acc)), x.dtype).unbind(dim=2)
        else:  # q (B, T, H, d); k, v, u (B, T, Hkv, d); the fused neighbours take one head count (the op is fused)
            fused = False
            q, k, v, u = (p.unflatten(-1, (-1, d)) for p in qkvu.split(self.qkvu_sizes, dim=-1))
            q, k = (as_dtype(l2_normalize(as_dtype(apply_rope(p, context.cos, context.sin), acc)), x.dtype) for p in (q, k))
        s, usum = self._logits(u, valid, context.counts, usum, documents, fused=fused and cache is None)
        # the op runs per query head: the key side repeated over each group (its state stays per K/V head)
        k, v, s = (repeat_kv_heads(t, groups, dim=2) for t in (k, v, s))
        if core_state is not None and groups > 1:
            core_state = core_state._map(lambda t: repeat_kv_heads(t, groups, dim=1))

        if self.config.use_gates:
            gl = as_dtype(self.gate_proj(x).view(B, T, H, self.num_gates), acc)
            g1, gh = torch.sigmoid(gl[..., :2] if self.has_zero_order else gl).unbind(dim=-1)
            g0 = torch.tanh(gl[..., 2]) if self.has_zero_order else None
        else:  # ablation: every gate is the constant 1
            g1 = gh = torch.ones(B, T, H, dtype=acc, device=x.device)
            g0 = g1 if self.has_zero_order else None

        attend = zeros_attention if documents is None else functools.partial(zeros_attention_over_documents, documents)
        with named_range("zeros_lm.op"):  # (a named range for benchmarks/profile_step.py)
            o, core_state = attend(
                q, k, v, s, g1, gh, g0, mode=mode, chunk_size=self.config.chunk_size, valid=valid,
                initial_state=core_state, output_final_state=cache is not None, chunk_layouts=context.chunk_layouts,
                in_place=getattr(cache, "in_place_updates", False),  # (a cache of an older zeros_lm has none)
            )
        if cache is not None:
            if groups > 1:
                core_state = core_state._map(lambda t: one_per_group(t, groups))
            cache.update_layer_state(self.layer_idx, ZeroSLayerState(core=core_state, u_sum=usum, conv=conv_state))
        if self.config.use_output_norm:
            o = F.layer_norm(as_dtype(o, acc), (d,), eps=OUTPUT_NORM_EPS)
        return self.o_proj(as_dtype(o, x.dtype).reshape(B, T, H * d))


class SoftmaxAttention(nn.Module):
    """Causal softmax attention (SDPA) with RoPE and a KV cache: the baseline, and the "full_attention"
    layers of hybrid stacks.

    Cache slot: a SoftmaxLayerState (cache_zeros.py): keys, values (Hkv heads: grouped K/V heads are
    cached once) and which keys are real.
    """

    def __init__(self, config: ZeroSConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_sizes = [n * self.head_dim for n in (self.num_heads, self.num_kv_heads, self.num_kv_heads)]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj._is_residual_output = True

    def forward(self, x: torch.Tensor, context: MixerContext, cache: ZeroSCache | None = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); appends the new keys and values to this layer's slot of ``cache``."""
        B, T, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        groups = H // Hkv
        valid, documents = context.valid, context.documents
        if groups == 1:
            qkv = self.qkv_proj(x).view(B, T, 3, H, d)
            q, k = apply_rope(qkv[:, :, :2], context.cos, context.sin).transpose(1, 3).unbind(dim=2)  # (B, H, T, d) each
            v = qkv[:, :, 2].transpose(1, 2)
        else:  # q (B, H, T, d); k, v (B, Hkv, T, d)
            q, k, v = (p.unflatten(-1, (-1, d)) for p in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
            q, k = (apply_rope(p, context.cos, context.sin).transpose(1, 2) for p in (q, k))
            v = v.transpose(1, 2)
        past = cache.layer_state(self.layer_idx) if cache is not None else None
        past_valid = None
        if past is not None:
            k = torch.cat([past.keys, k], dim=2)
            v = torch.cat([past.values, v], dim=2)
            past_valid = past.valid
        # the cache holds the Hkv heads; attention reads them repeated over each group
        k_cached, v_cached = k, v
        k, v = repeat_kv_heads(k, groups, dim=1), repeat_kv_heads(v, groups, dim=1)
        if documents is not None and valid is None:
            o = packed_softmax_attention(q, k, v, documents)
            if o is not None:
                return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))
        mask = softmax_attention_mask(valid, past_valid, B, T, x.device, documents)
        if cache is not None:
            new_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            keys_valid = new_valid if past_valid is None else torch.cat([past_valid, new_valid], dim=1)
            cache.update_layer_state(self.layer_idx, SoftmaxLayerState(keys=k_cached, values=v_cached, valid=keys_valid))
        S = k.shape[2] - T
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=(T > 1 and S == 0))
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2)
        if valid is not None:
            o = o * valid[:, :, None, None].to(o.dtype)
        return self.o_proj(o.reshape(B, T, H * d))


class LinearAttention(nn.Module):
    """Plain causal linear attention (Katharopoulos et al.): phi = elu + 1, normalised. Weak baseline.

    Cache slot: a LinearLayerState (cache_zeros.py), its sums per K/V head (they are key-side)."""

    def __init__(self, config: ZeroSConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_sizes = [n * self.head_dim for n in (self.num_heads, self.num_kv_heads, self.num_kv_heads)]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.conv = ShortConvolution(sum(self.qkv_sizes), config.conv_size) if config.conv_size else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj._is_residual_output = True

    def forward(self, x: torch.Tensor, context: MixerContext, cache: ZeroSCache | None = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); reads and updates this layer's slot of ``cache``. (No RoPE.)"""
        B, T, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        groups = H // Hkv
        acc = accumulation_dtype(x.dtype)
        valid, documents = context.valid, context.documents
        state = cache.layer_state(self.layer_idx) if cache is not None else None
        S0, z0, conv_state = (state.kv_sum, state.k_sum, state.conv) if state is not None else (None, None, None)
        qkv = self.qkv_proj(x)
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, valid=valid, state=conv_state, documents=documents)
        if groups == 1:
            q, k, v = qkv.view(B, T, 3, H, d).to(acc).permute(2, 0, 3, 1, 4).unbind(dim=0)  # (B, H, T, d)
        else:  # the key side repeated over each group (the sums stay per K/V head)
            q, k, v = (p.unflatten(-1, (-1, d)).to(acc).transpose(1, 2) for p in qkv.split(self.qkv_sizes, dim=-1))
            k, v = repeat_kv_heads(k, groups, dim=1), repeat_kv_heads(v, groups, dim=1)
            if S0 is not None:
                S0, z0 = repeat_kv_heads(S0, groups, dim=1), repeat_kv_heads(z0, groups, dim=1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        if valid is not None:
            k = k * valid[:, None, :, None]
            v = v * valid[:, None, :, None]
        if documents is not None:
            o = linear_attention_over_documents(q, k, v, documents, self.config.chunk_size)
        else:
            if S0 is None:
                S0, z0 = q.new_zeros(B, H, d, d), q.new_zeros(B, H, d)
            o, S1, z1 = linear_attention_chunked(q, k, v, S0, z0, self.config.chunk_size)
            if cache is not None:
                S1, z1 = one_per_group(S1, groups), one_per_group(z1, groups)
                cache.update_layer_state(self.layer_idx, LinearLayerState(kv_sum=S1, k_sum=z1, conv=conv_state))
        o = o.transpose(1, 2)
        if valid is not None:
            o = o * valid[:, :, None, None]
        return self.o_proj(o.to(x.dtype).reshape(B, T, H * d))


ATTENTION_CLASSES = {"zeros": ZeroSAttention, "softmax": SoftmaxAttention, "linear": LinearAttention}


def zero_order_layers(config: ZeroSConfig) -> frozenset[int]:
    """The layers whose mixer carries the zero-order term g0/t (docs/method.md): every ZeroS layer with
    ``zero_order_all_layers``; else, with ``first_layer_zero_order``, the first ZeroS layer of the stack (as
    in the paper; in a hybrid stack it need not be layer 0); else none."""
    zeros = [i for i, kind in enumerate(config.mixer_types) if kind == "zeros"]
    if config.zero_order_all_layers:
        return frozenset(zeros)
    return frozenset(zeros[:1]) if config.first_layer_zero_order else frozenset()


class ZeroSBlock(GradientCheckpointingLayer):
    """RMSNorm -> token mixer (this layer's entry of ``config.mixer_types``) -> residual; RMSNorm -> SwiGLU -> residual.

    ``has_zero_order``: whether its mixer (ZeroS only) carries the zero-order term; the model decides it
    from the whole stack (:func:`zero_order_layers`).
    """

    def __init__(self, config: ZeroSConfig, layer_idx: int, *, has_zero_order: bool = False):
        super().__init__()
        kind = config.mixer_types[layer_idx]
        self.attn_norm = ZeroSRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if kind == "zeros":
            self.attn = ZeroSAttention(config, layer_idx, has_zero_order=has_zero_order)
        elif has_zero_order:
            raise ValueError(f"layer {layer_idx} is a {kind} layer: only ZeroS layers carry the zero-order term")
        else:
            self.attn = ATTENTION_CLASSES[kind](config, layer_idx)
        self.mlp_norm = ZeroSRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ZeroSMLP(config)

    def forward(self, hidden_states: torch.Tensor, context: MixerContext, cache: ZeroSCache | None = None):
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), context, cache=cache)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class ZeroSPreTrainedModel(PreTrainedModel):
    config_class = ZeroSConfig
    config: ZeroSConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZeroSBlock"]
    _is_stateful = True  # no assisted generation: the state cannot be rolled back

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own ZeroSCache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            residual_output = getattr(module, "_is_residual_output", False)
            if residual_output and self.config.zero_init_residual:
                init.zeros_(module.weight)  # the block starts as the identity
            else:
                scale = 1.0 / math.sqrt(2 * self.config.num_hidden_layers) if residual_output else 1.0
                init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ZeroSRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):  # as nn.Conv1d's default for a depthwise kernel
            bound = 1.0 / math.sqrt(module.conv_size)
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, ZeroSAttention) and hasattr(module, "mu"):
            init.zeros_(module.mu)
            init.zeros_(module.log_tau)  # tau = 1: the prior counts as one token


class ZeroSModel(ZeroSPreTrainedModel):
    """Embedding, blocks and the final RMSNorm; returns the last hidden state and the cache."""

    def __init__(self, config: ZeroSConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        zero_order = zero_order_layers(config)
        self.layers = nn.ModuleList(
            [ZeroSBlock(config, i, has_zero_order=i in zero_order) for i in range(config.num_hidden_layers)]
        )
        self.norm = ZeroSRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: ZeroSCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: ZeroSCache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        input_ids (B, T): the new tokens (only those not yet in ``cache``).
        attention_mask (B, T) or (B, S+T): 1 for real tokens, 0 for padding; only its last T columns are
            read (generate passes the whole history). Padding may sit anywhere (left padding is usual);
            padding tokens do not enter the state and do not advance the positions.
        cache: a :class:`ZeroSCache` to continue from; updated in place and returned. ``past_key_values``
            is accepted as an alias.
        use_cache: create a new cache when none is given (default: ``config.use_cache`` in eval mode).
        position_ids (B or 1, T) or (B or 1, >= T): packed documents. Where they restart at 0 after a real token of
            the row (``DataCollatorWithFlattening``'s convention), a new document begins: no attention type
            lets it see the documents before it (ZeroS and linear attention restart their states and the
            running mean of u, softmax attention is block-diagonal) and RoPE positions restart. Positions
            are otherwise derived from the real tokens, as without position_ids. A forward with
            documents inside a row takes no cache and returns none.
        """
        if cache is None:
            cache = past_key_values
        if cache is not None and not isinstance(cache, ZeroSCache):
            raise TypeError(f"{type(self).__name__} needs a ZeroSCache, got {type(cache).__name__}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids and inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache and cache is None:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False.")
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must have shape (batch, >= {T}), got {tuple(attention_mask.shape)}")
            valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
            if bool(valid.all()):
                valid = None
        documents = PackedDocuments.from_position_ids(position_ids, valid, B, T, device)
        if documents is not None:
            if cache is not None:
                raise ValueError(
                    "position_ids restart inside a row (packed documents), which cannot continue a cache: "
                    "pass packed documents without cache/past_key_values, or one document per row to generate"
                )
            use_cache = False
        if use_cache and cache is None:
            cache = ZeroSCache(self.config)

        # counts[b, t]: real tokens in row b (of its document) up to and including column t (the t of
        # docs/method.md); the RoPE position of a real token is counts - 1, whatever padding came before it.
        if documents is not None:
            counts = documents.counts
        elif valid is None:
            counts = torch.arange(1, T + 1, device=device).expand(B, T)
        else:
            counts = valid.long().cumsum(dim=1)
        if cache is not None and cache.num_tokens is not None:
            counts = counts + cache.num_tokens.to(device)[:, None]
        cos, sin = rope_cos_sin((counts - 1).clamp_min(0), self.config.head_dim, self.config.rope_theta)
        context = MixerContext(cos=cos, sin=sin, counts=counts, valid=valid, documents=documents)

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, context, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if cache is not None:
            cache.advance(valid, B, T, device)

        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class ZeroSForCausalLM(ZeroSPreTrainedModel, GenerationMixin):
    """ZeroSModel with a language-modelling head (tied to the embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZeroSConfig):
        super().__init__(config)
        self.model = ZeroSModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: ZeroSCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: ZeroSCache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        labels (B, T): next-token targets, shifted inside the model (``labels = input_ids`` works);
            -100 is ignored.
        logits_to_keep: if an int > 0, compute logits for the last that many positions only.

        See :meth:`ZeroSModel.forward` for the other arguments.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            out = tuple(x for x in (logits, outputs.cache, outputs.hidden_states) if x is not None)
            return (loss,) + out if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = ["MixerContext", "PackedDocuments", "ZeroSCache", "ZeroSForCausalLM", "ZeroSModel", "ZeroSPreTrainedModel",
           "packed_position_ids", "zero_order_layers"]
