"""Linearize a pretrained softmax transformer into a ZeroS (or hybrid) model (docs/linearize.md).

The pieces, in the order ``zeros-lm linearize`` (:mod:`zeros_lm.cli.linearize`) uses them:

- :func:`load_teacher`: a Hugging Face Llama-family causal-LM directory (Llama, Mistral, Qwen2-style
  without q/k/v biases), a GGUF file (transformers' ``gguf_file=``), or a softmax model of this
  framework; :class:`TeacherSpec` is what the student needs to know of it.
- :func:`student_config`, :func:`map_weights` (embeddings, norms, MLP, q / k / v / o copied) and
  :func:`init_converted_layers` (the ZeroS-only parameters set so that a converted layer starts near its
  teacher: the logit reads the key, constant gates, and a least-squares scale of each head's normalised
  output folded into the output projection); :func:`convert` does all three.
- :class:`AttentionTransfer`: per-layer hooks that feed every student mixer the teacher's own input and
  compare its output with the teacher's, while the student's residual stream carries the teacher's
  outputs (so all layers train in one pass, each on exactly its teacher's hidden states).
- Two LightningModules built on pretraining's :class:`~zeros_lm.training.ZeroSLitModule` (optimiser,
  schedule, logging, checkpoints, resume): :class:`TransferLitModule` (stage 1, attention transfer,
  relative MSE) and :class:`DistillLitModule` (stage 2, KL to the teacher's logits plus an optional
  next-token loss; attention-only, low-rank adapters or all parameters trainable).
- :func:`choose_softmax_layers`: the layers with the largest transfer error stay softmax
  (``--keep-softmax K``); :func:`revert_to_softmax` rebuilds the student with them.

Shapes: B batch, T tokens, H query heads, Hkv key/value heads, d head dimension, D hidden size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_zeros import FULL_LAYER, LINEAR_LAYER, ZeroSConfig
from .modeling_zeros import ZeroSForCausalLM
from .training import ZeroSLitModule

__all__ = [
    "LinearizeError",
    "TeacherSpec",
    "SUPPORTED_MODEL_TYPES",
    "load_teacher",
    "teacher_spec",
    "student_config",
    "map_weights",
    "init_converted_layers",
    "convert",
    "AttentionTransfer",
    "transfer_errors",
    "choose_softmax_layers",
    "revert_to_softmax",
    "LowRankAdapters",
    "TransferLitModule",
    "DistillLitModule",
    "distillation_loss",
    "RECORD_KEY",
]

# Hugging Face model types whose decoder is a Llama: RMSNorm, SwiGLU MLP, RoPE, (grouped) K/V heads.
HF_LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = HF_LLAMA_FAMILY + (ZeroSConfig.model_type,)
RECORD_KEY = "linearized_from"  # the config.json entry that records the teacher, recipe and tokens
GGUF_SUFFIX = ".gguf"
# what transformers needs to read one (gguf_file=): the reader, and accelerate, which transformers 5 asks for
GGUF_PACKAGES = ("gguf", "accelerate")


class LinearizeError(ValueError):
    """A problem with the teacher or the linearization's options, reported as one line."""


# --------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TeacherSpec:
    """What the student takes from its teacher's configuration."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: Optional[int]
    eos_token_id: Any
    pad_token_id: Optional[int]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", None):
        raise LinearizeError(
            f"the teacher uses RoPE scaling {params.get('rope_type')!r}, which the student does not implement; "
            "only plain RoPE (rope_type 'default') is supported"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def teacher_spec(teacher: nn.Module) -> TeacherSpec:
    """The :class:`TeacherSpec` of a loaded teacher; :class:`LinearizeError` for one the mapping cannot
    reproduce exactly (another architecture, biases, RoPE scaling, a ZeroS model that is not softmax)."""
    config = teacher.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LinearizeError(
            f"unsupported teacher architecture {model_type!r}; supported: Llama-family causal LMs "
            f"({', '.join(HF_LLAMA_FAMILY)}) and softmax models of this framework"
        )
    if model_type == ZeroSConfig.model_type:
        if set(config.mixer_types) != {"softmax"}:
            raise LinearizeError(
                f"the teacher is a zeros-lm model with {sorted(set(config.mixer_types))} layers; a teacher must be "
                "softmax attention in every layer (attention_type softmax)"
            )
        heads = config.num_attention_heads
        return TeacherSpec(
            model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=config.head_dim,
            intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta, tie_word_embeddings=bool(config.tie_word_embeddings),
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LinearizeError(f"unsupported teacher: MLP activation {config.hidden_act!r} (the student's SwiGLU uses silu)")
    attention = teacher.model.layers[0].self_attn
    if any(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise LinearizeError("unsupported teacher: its attention projections have biases (e.g. Qwen2); "
                             "the student's projections have none")
    if getattr(teacher.model.layers[0].mlp.gate_proj, "bias", None) is not None:
        raise LinearizeError("unsupported teacher: its MLP has biases; the student's SwiGLU has none")
    heads = config.num_attention_heads
    return TeacherSpec(
        model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size, rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=_rope_theta(config), tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def _read_model_type(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_teacher(path) -> tuple[nn.Module, Any]:
    """The teacher (float32, eval mode, no gradients) and its tokenizer, from a Hugging Face directory,
    a ``.gguf`` file or a zeros-lm softmax model directory. One-line :class:`LinearizeError` for a
    missing path, another architecture, or a GGUF file without the ``gguf`` package."""
    import zeros_lm  # noqa: F401  (registers model_type "zeros" with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise LinearizeError(
            f"teacher {str(path)!r} does not exist; give a Hugging Face model directory, a {GGUF_SUFFIX} file "
            "or a zeros-lm softmax model directory"
        )
    kwargs: dict = {}
    if p.is_file():
        if p.suffix.lower() != GGUF_SUFFIX:
            raise LinearizeError(f"teacher {str(path)!r} is a file but not a {GGUF_SUFFIX} file; give a model directory "
                                 f"or a {GGUF_SUFFIX} file")
        missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise LinearizeError(f"reading a GGUF teacher needs the {' and '.join(missing)} package"
                                 f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)} (or the zeros-lm[gguf] extra)")
        directory, kwargs = str(p.parent), {"gguf_file": p.name}
        from transformers import AutoConfig

        try:
            with _quiet_loading():
                model_type = AutoConfig.from_pretrained(directory, **kwargs).model_type
        except Exception as e:  # noqa: BLE001 - transformers refuses GGUF architectures it cannot read
            raise LinearizeError(f"cannot read the GGUF teacher {str(path)!r}: {' '.join(str(e).split())[:200]}") from None
    else:
        directory = str(p)
        model_type = _read_model_type(p)
        if model_type is None:
            raise LinearizeError(f"teacher directory {str(path)!r} has no readable config.json with a model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LinearizeError(
            f"unsupported teacher architecture {model_type!r} in {str(path)!r}; supported: Llama-family causal LMs "
            f"({', '.join(HF_LLAMA_FAMILY)}) and softmax models of this framework"
        )
    with _quiet_loading():
        if model_type == ZeroSConfig.model_type:
            model = ZeroSForCausalLM.from_pretrained(directory, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise LinearizeError(f"cannot load the teacher's tokenizer from {str(path)!r}: {' '.join(str(e).split())[:200]}") from None
    if getattr(model.config, "model_type", None) in HF_LLAMA_FAMILY:
        model.config._attn_implementation = "sdpa"
    teacher_spec(model)  # refuse what the mapping cannot reproduce, before any work
    model.eval().requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The student: its config and the weight mapping
# --------------------------------------------------------------------------------------------------


def layer_types_from(num_layers: int, softmax_layers) -> list[str]:
    chosen = set(softmax_layers)
    return [FULL_LAYER if i in chosen else LINEAR_LAYER for i in range(num_layers)]


def student_config(spec: TeacherSpec, softmax_layers=(), **overrides) -> ZeroSConfig:
    """A ZeroS config with the teacher's shapes, norm epsilon and RoPE base; the layers in
    ``softmax_layers`` stay softmax attention. Every converted layer has the zero-order term (the
    teacher's weights have it: see :func:`init_converted_layers`). ``overrides``: other ZeroSConfig fields
    (conv_size, ...).

    Grouped K/V heads map onto the student's own (``num_key_value_heads``: k, v and u per K/V head, one
    ZeroS state per K/V head), and the teacher's ``head_dim`` is kept whatever hidden_size / heads is."""
    fields: dict = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, intermediate_size=spec.intermediate_size,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id,
        attention_type="zeros", zero_order_all_layers=True,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
    )
    fields["layer_types"] = layer_types_from(spec.num_hidden_layers, softmax_layers)
    fields.update(overrides)
    try:
        return ZeroSConfig(**fields)
    except (TypeError, ValueError) as e:
        raise LinearizeError(f"cannot build the student's config: {' '.join(str(e).split())}") from None


@dataclasses.dataclass
class _LayerWeights:
    """One teacher layer's weights in the student's terms (nn.Linear layout: (out, in))."""

    q: torch.Tensor  # (H d, D)
    k: torch.Tensor  # (Hkv d, D)
    v: torch.Tensor  # (Hkv d, D)
    o: torch.Tensor  # (D, H d)
    gate: torch.Tensor  # (I, D)
    up: torch.Tensor  # (I, D)
    down: torch.Tensor  # (D, I)
    attn_norm: torch.Tensor  # (D,)
    mlp_norm: torch.Tensor  # (D,)


def _teacher_layers(teacher: nn.Module, spec: TeacherSpec) -> list[_LayerWeights]:
    layers = []
    for layer in teacher.model.layers:
        if spec.model_type == ZeroSConfig.model_type:
            q_rows = spec.num_attention_heads * spec.head_dim
            kv_rows = spec.num_key_value_heads * spec.head_dim
            q, k, v = layer.attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
            gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
            layers.append(_LayerWeights(q, k, v, layer.attn.o_proj.weight, gate, up, layer.mlp.down_proj.weight,
                                        layer.attn_norm.weight, layer.mlp_norm.weight))
        else:
            a, m = layer.self_attn, layer.mlp
            layers.append(_LayerWeights(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                                        m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                                        layer.input_layernorm.weight, layer.post_attention_layernorm.weight))
    return layers


@torch.no_grad()
def map_weights(teacher: nn.Module, student: ZeroSForCausalLM) -> None:
    """Copy the teacher's embeddings, norms, MLPs, LM head and q / k / v / o into ``student`` (in place).

    A softmax layer of the student is then its teacher's layer exactly; a ZeroS layer gets q, k, v, o,
    and the rows of u (the logit's input) are left to :func:`init_converted_layers`."""
    spec = teacher_spec(teacher)
    student.model.embed_tokens.weight.copy_(teacher.get_input_embeddings().weight)
    student.model.norm.weight.copy_(teacher.model.norm.weight)
    if not student.config.tie_word_embeddings:
        student.lm_head.weight.copy_(teacher.get_output_embeddings().weight)
    for i, (w, block) in enumerate(zip(_teacher_layers(teacher, spec), student.model.layers)):
        block.attn_norm.weight.copy_(w.attn_norm)
        block.mlp_norm.weight.copy_(w.mlp_norm)
        block.mlp.gate_up_proj.weight.copy_(torch.cat([w.gate, w.up]))
        block.mlp.down_proj.weight.copy_(w.down)
        attn = block.attn
        attn.o_proj.weight.copy_(w.o)
        if student.config.mixer_types[i] == "softmax":
            attn.qkv_proj.weight.copy_(torch.cat([w.q, w.k, w.v]))
        else:
            fused = attn.qkvu_proj.weight
            fused[: w.q.shape[0] + w.k.shape[0] + w.v.shape[0]].copy_(torch.cat([w.q, w.k, w.v]))


# --------------------------------------------------------------------------------------------------
# Per-layer attention transfer: hooks on teacher and student
# --------------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The token mixer of each layer (HF Llama family: ``self_attn``; zeros-lm: ``attn``)."""
    return [getattr(layer, "self_attn", None) or layer.attn for layer in model.model.layers]


def converted_layers(config: ZeroSConfig) -> list[int]:
    """The layers of a student that are not softmax attention (the ones transfer trains)."""
    return [i for i, kind in enumerate(config.mixer_types) if kind != "softmax"]


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class AttentionTransfer:
    """Run teacher and student on the same tokens so that each student mixer sees exactly its teacher
    layer's input and its output can be compared with the teacher layer's output.

    Inside ``with AttentionTransfer(teacher, student, layers) as t: t.run(input_ids)``: the teacher runs
    first (no gradients) and its mixers' inputs and outputs are recorded; then the student runs with a
    hook on each of its mixers that replaces the mixer's input by the teacher's and, after recording
    the student's own output, passes the teacher's output on to the residual stream. Every student layer
    therefore reads its teacher's hidden states, and all layers train in one pass. ``run`` returns, per
    layer in ``layers``, (student output, teacher output), each (B, T, D).
    """

    def __init__(self, teacher: nn.Module, student: ZeroSForCausalLM, layers=None):
        self.teacher, self.student = teacher, student
        self.layers = list(converted_layers(student.config) if layers is None else layers)
        self._handles: list = []
        self._teacher_io: dict[int, tuple] = {}
        self._student_out: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "AttentionTransfer":
        teacher_mixers, student_mixers = _attention_modules(self.teacher), _attention_modules(self.student)
        for i in self.layers:
            self._handles.append(teacher_mixers[i].register_forward_hook(self._teacher_hook(i), with_kwargs=True))
            self._handles.append(student_mixers[i].register_forward_pre_hook(self._student_pre_hook(i), with_kwargs=True))
            self._handles.append(student_mixers[i].register_forward_hook(self._student_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._teacher_io.clear()
        self._student_out.clear()

    def _teacher_hook(self, i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            self._teacher_io[i] = (x.detach(), _first_tensor(output).detach())
        return hook

    def _student_pre_hook(self, i):
        def hook(module, args, kwargs):
            x = self._teacher_io[i][0]
            if args:
                return (x, *args[1:]), kwargs
            key = "x" if "x" in kwargs else "hidden_states"
            return args, {**kwargs, key: x}
        return hook

    def _student_hook(self, i):
        def hook(module, args, kwargs, output):
            self._student_out[i] = output
            return self._teacher_io[i][1].to(output.dtype)
        return hook

    def run(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._teacher_io.clear()
        self._student_out.clear()
        with torch.no_grad():
            self.teacher(input_ids=input_ids, use_cache=False)
        self.student(input_ids=input_ids, use_cache=False)
        return [(self._student_out[i], self._teacher_io[i][1]) for i in self.layers]


def relative_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher output's mean square: 0 is exact, 1 is no better than
    outputting zeros (the scale-free transfer error of one layer)."""
    s, t = student_out.float(), teacher_out.float()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def transfer_errors(teacher, student, batches, layers=None) -> dict[int, float]:
    """The relative transfer error (:func:`relative_mse`, pooled over ``batches`` of input ids) of each
    converted layer (or of ``layers``)."""
    sums: dict[int, list] = {}
    with AttentionTransfer(teacher, student, layers) as transfer:
        for ids in batches:
            for i, (s, t) in zip(transfer.layers, transfer.run(ids)):
                acc = sums.setdefault(i, [0.0, 0.0])
                acc[0] += float((s.float() - t.float()).pow(2).sum())
                acc[1] += float(t.float().pow(2).sum())
    return {i: err / max(energy, torch.finfo(torch.float32).tiny) for i, (err, energy) in sums.items()}


# --------------------------------------------------------------------------------------------------
# Initialisation of the ZeroS-only parameters
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _fold_output_scales(teacher, student, calibration_ids: torch.Tensor, layers: list[int]) -> None:
    """Scale each head's columns of the output projection by the least-squares coefficient that best
    maps the (LayerNorm-ed, unit-scale) ZeroS head outputs onto the teacher layer's output.

    Per layer: Y (N, D) the teacher's output, A_h = Z_h W_h^T (N, D) head h's contribution through the
    copied output projection; c = argmin |Y - sum_h c_h A_h|^2 solves an H x H system. c = 0 (output
    nothing) is feasible, so the fitted layer is never further from its teacher than a silent one."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    mixers = _attention_modules(student)
    for i in layers:
        def grab(module, args, i=i):
            captured[i] = args[0].detach()
        handles.append(mixers[i].o_proj.register_forward_pre_hook(grab))
    try:
        with AttentionTransfer(teacher, student, layers) as transfer:
            outputs = transfer.run(calibration_ids)
    finally:
        for h in handles:
            h.remove()
    H = student.config.num_attention_heads
    for i, (_, y) in zip(layers, outputs):
        o_proj = mixers[i].o_proj
        z = captured[i].double().reshape(-1, H, o_proj.in_features // H)  # (N, H, d)
        w = o_proj.weight.double().reshape(o_proj.out_features, H, -1)  # (D, H, d)
        contributions = torch.einsum("nhd,ehd->hne", z, w).reshape(H, -1)  # (H, N D)
        target = y.double().reshape(-1)
        gram = contributions @ contributions.T
        ridge = 1e-8 * gram.diagonal().mean().clamp_min(1e-30)
        c = torch.linalg.solve(gram + ridge * torch.eye(H, dtype=gram.dtype), contributions @ target)
        o_proj.weight.copy_((w * c[None, :, None]).reshape_as(o_proj.weight).to(o_proj.weight.dtype))


# The logit prior's weight at conversion: the prior mean of u (mu = -the mean query) counts as this many
# tokens, so that over the first thousands of tokens the logit stays the mean query's softmax logit.
CONVERTED_LOGIT_PRIOR_TOKENS = 1e4
# Gate logits at conversion: g1 = gh = sigmoid(0) = 1/2 and g0 = tanh(atanh(1/2)) = 1/2, so that
# r_{t,i} = (p_{t,i} - 1/t)/2 + 1/(2t) = p_{t,i}/2: half the softmax weight over the logits s.
CONVERTED_GATE = 0.5


@torch.no_grad()
def _mean_queries(teacher, calibration_ids: torch.Tensor, layers: list[int], spec: TeacherSpec,
                  kv_heads: int) -> dict[int, torch.Tensor]:
    """Per layer, the teacher's mean query of each of the student's ``kv_heads`` key/value heads
    (kv_heads, d): the mean, over the calibration tokens and the head's group of query heads, of
    q = W_q x (before RoPE)."""
    inputs: dict[int, torch.Tensor] = {}
    mixers = _attention_modules(teacher)
    handles = [mixers[i].register_forward_hook(
        lambda m, args, kwargs, out, i=i: inputs.__setitem__(i, args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))),
        with_kwargs=True) for i in layers]
    try:
        teacher(input_ids=calibration_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    weights = _teacher_layers(teacher, spec)
    H, Hkv, d = spec.num_attention_heads, kv_heads, spec.head_dim
    return {i: (inputs[i].reshape(-1, inputs[i].shape[-1]).float() @ weights[i].q.float().T)
            .reshape(-1, Hkv, H // Hkv, d).mean(dim=(0, 2)) for i in layers}


@torch.no_grad()
def init_converted_layers(teacher, student: ZeroSForCausalLM, calibration_ids: Optional[torch.Tensor] = None) -> None:
    """Initialise the ZeroS-only parameters of every converted layer so that it starts near its teacher
    (docs/linearize.md explains each choice):

    - u (the logit's input) = the key projection, and the logit prior mu = -(the teacher's mean query of
      the head) with a heavy weight (tau = CONVERTED_LOGIT_PRIOR_TOKENS): the deviation logit
      s_i = -(u_i . ubar)/sqrt(d) is then about qbar . k_i / sqrt(d), the teacher's softmax logit for its
      average query (ZeroS logits depend on the key alone; this is the best such logit to first order);
    - gates: zero weights, biases giving g1 = gh = g0 = 1/2 on every token: with the zero-order term on
      (the student config sets ``zero_order_all_layers``), r_{t,i} = p_{t,i} / 2, a softmax over those
      logits, as the teacher's weights are, times the angular factor cos(q_t, k_i);
    - a short convolution, if any, starts as the identity on its current token;
    - the output projection: the teacher's, with each head's columns scaled by a least-squares fit of
      the normalised ZeroS output to the teacher layer's output (see :func:`_fold_output_scales`).

    ``calibration_ids`` (B, T): tokens for the mean queries and the output scales; without them mu = 0
    and the copied projection stays.
    """
    config = student.config
    layers = converted_layers(config)
    if not layers:
        return
    spec = teacher_spec(teacher)
    mixers = _attention_modules(student)
    d, H, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    mean_q = _mean_queries(teacher, calibration_ids, layers, spec, Hkv) if calibration_ids is not None else {}
    gate_logit = {"g1": 0.0, "gh": 0.0, "g0": math.atanh(CONVERTED_GATE)}  # sigmoid(0) = 1/2
    for i in layers:
        attn = mixers[i]
        fused = attn.qkvu_proj.weight  # rows: q (H d), k (Hkv d), v (Hkv d), u (Hkv d)
        fused[(H + 2 * Hkv) * d:].copy_(fused[H * d:(H + Hkv) * d])
        if hasattr(attn, "mu"):
            attn.mu.copy_(-mean_q[i].view_as(attn.mu) if i in mean_q else torch.zeros_like(attn.mu))
            attn.log_tau.fill_(math.log(CONVERTED_LOGIT_PRIOR_TOKENS))
        if getattr(attn, "gate_proj", None) is not None:
            attn.gate_proj.weight.zero_()
            biases = attn.gate_proj.bias.view(-1, attn.num_gates)  # per head: g1, gh (, g0)
            for j, name in enumerate(("g1", "gh", "g0")[: attn.num_gates]):
                biases[:, j] = gate_logit[name]
        if getattr(attn, "conv", None) is not None:
            attn.conv.weight.zero_()
            attn.conv.weight[:, -1] = 1.0
    if calibration_ids is not None:
        _fold_output_scales(teacher, student, calibration_ids, layers)


def convert(teacher, softmax_layers=(), calibration_ids: Optional[torch.Tensor] = None, seed: int = 0,
            **overrides) -> ZeroSForCausalLM:
    """A ZeroS (hybrid where ``softmax_layers`` is given) student of ``teacher``, weights mapped and
    converted layers initialised (float32, eval mode)."""
    config = student_config(teacher_spec(teacher), softmax_layers, **overrides)
    torch.manual_seed(seed)
    student = ZeroSForCausalLM(config).float()
    map_weights(teacher, student)
    init_converted_layers(teacher, student, calibration_ids)
    return student.eval()


def choose_softmax_layers(errors: dict[int, float], keep: int, given=()) -> list[int]:
    """The ``keep`` layers with the largest transfer error (ties: the earlier layer), with ``given``."""
    if keep < 0:
        raise LinearizeError(f"--keep-softmax must be >= 0, got {keep}")
    ranked = sorted(errors, key=lambda i: (-errors[i], i))
    return sorted(set(given) | set(ranked[:keep]))


@torch.no_grad()
def revert_to_softmax(teacher, student: ZeroSForCausalLM, layers) -> ZeroSForCausalLM:
    """A copy of ``student`` in which ``layers`` are the teacher's softmax attention again; the other
    layers keep their (trained) weights."""
    layers = set(layers)
    config = ZeroSConfig(**{**student.config.to_dict(), "layer_types": None})
    softmax = {i for i, kind in enumerate(student.config.mixer_types) if kind == "softmax"} | layers
    config.layer_types = layer_types_from(config.num_hidden_layers, softmax)
    config.softmax_every = 0
    config._check()
    new = ZeroSForCausalLM(config).float()
    map_weights(teacher, new)
    state = {k: v for k, v in student.state_dict().items()
             if not any(k.startswith(f"model.layers.{i}.attn.") for i in softmax)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected:
        raise LinearizeError(f"internal: unexpected weights when reverting layers to softmax: {unexpected}")
    for key, value in student.config.to_dict().items():
        if key not in config.to_dict():
            setattr(new.config, key, value)  # records such as linearized_from
    return new.eval()


# --------------------------------------------------------------------------------------------------
# Low-rank adapters (stage 2's "lora" trainable set)
# --------------------------------------------------------------------------------------------------


class LowRankAdapters(nn.Module):
    """Low-rank updates W + (alpha / r) B A of chosen ``nn.Linear`` layers of a model, kept outside the
    model (its state_dict, and so its export, stays that of a plain ZeroS model): forward hooks add
    (alpha / r) B A x to each layer's output; :meth:`merge` folds them into the weights. B starts at 0,
    so the adapted model starts as the model."""

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise LinearizeError(f"--lora-rank must be >= 1, got {rank}")
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        modules = dict(model.named_modules())
        self.targets = {name: modules[name] for name in names}
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, linear in self.targets.items():
            key = name.replace(".", "__")
            a = torch.empty(rank, linear.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.down[key] = nn.Parameter(a)
            self.up[key] = nn.Parameter(torch.zeros(linear.out_features, rank))
        self._handles = [linear.register_forward_hook(self._hook(name.replace(".", "__")))
                         for name, linear in self.targets.items()]
        self.merged = False

    def _hook(self, key):
        def hook(module, args, output):
            if self.merged:
                return output
            x = args[0]
            return output + self.scale * F.linear(F.linear(x, self.down[key].to(x.dtype)), self.up[key].to(x.dtype))
        return hook

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every update into its layer's weight and stop adding it."""
        for name, linear in self.targets.items():
            key = name.replace(".", "__")
            linear.weight += (self.scale * self.up[key] @ self.down[key]).to(linear.weight.dtype)
        self.merged = True
        for handle in self._handles:
            handle.remove()


TrainableSet = Literal["attention", "lora", "all"]
TRAINABLE_SETS = ("attention", "lora", "all")


# --------------------------------------------------------------------------------------------------
# The two stages as LightningModules
# --------------------------------------------------------------------------------------------------


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens; logits (B, T, V)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class _LinearizeBase(ZeroSLitModule):
    """Pretraining's module around a student loaded from ``student_dir`` (an HF directory), with a
    frozen teacher beside it. The teacher is not a submodule: it is neither checkpointed nor handed to
    the optimiser or DeepSpeed; it follows the student's device."""

    def __init__(self, teacher: str, student_dir: str, **kwargs):
        kwargs.setdefault("document_resets", False)
        student_config_file = Path(student_dir, "config.json")
        if student_config_file.is_file():  # the vocabulary is the student's own (the teacher's tokenizer)
            kwargs.setdefault("vocab_size", json.loads(student_config_file.read_text(encoding="utf-8"))["vocab_size"])
        super().__init__(init_from=student_dir, **kwargs)
        self.teacher_path = teacher
        teacher_model, _ = load_teacher(teacher)
        self.__dict__["teacher"] = teacher_model  # not registered: not in the state_dict, not trained

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_validation_start(self) -> None:
        self.teacher.to(self.device)


class TransferLitModule(_LinearizeBase):
    """Stage 1, attention transfer: every converted layer learns to reproduce its teacher layer's output
    on the teacher's own hidden states (relative MSE, :func:`relative_mse`, averaged over the layers);
    only the converted layers' mixers train. Logs ``train/transfer`` and ``val/transfer`` (and
    ``val/transfer_<i>`` per layer)."""

    def __init__(self, teacher: str, student_dir: str, **kwargs):
        super().__init__(teacher, student_dir, **kwargs)
        self.layers = converted_layers(self.model.config)
        if not self.layers:
            raise LinearizeError("every layer stays softmax: there is nothing to convert")
        self.model.requires_grad_(False)
        mixers = _attention_modules(self.model)
        for i in self.layers:
            mixers[i].requires_grad_(True)
        self._val_errors: dict[int, list] = {}

    def _transfer(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with AttentionTransfer(self.teacher, self.model, self.layers) as transfer:
            pairs = transfer.run(batch[:, :-1])
        per_layer = [relative_mse(s, t) for s, t in pairs]
        return torch.stack(per_layer).mean(), per_layer

    def training_step(self, batch, batch_idx):
        loss, _ = self._transfer(batch)
        self.log("train/transfer", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_errors = {i: [0.0, 0.0] for i in self.layers}

    def validation_step(self, batch, batch_idx) -> None:
        with AttentionTransfer(self.teacher, self.model, self.layers) as transfer:
            for i, (s, t) in zip(self.layers, transfer.run(batch[:, :-1])):
                self._val_errors[i][0] += float((s.float() - t.float()).pow(2).sum())
                self._val_errors[i][1] += float(t.float().pow(2).sum())

    def on_validation_epoch_end(self) -> None:
        errors = {i: e / max(n, 1e-30) for i, (e, n) in self._val_errors.items() if n > 0}
        if not errors:
            return
        for i, value in errors.items():
            self.log(f"val/transfer_{i}", value, sync_dist=True)
        self.log("val/transfer", sum(errors.values()) / len(errors), prog_bar=True, sync_dist=True)


class DistillLitModule(_LinearizeBase):
    """Stage 2, distillation: KL(teacher || student) on the next-token distributions, plus
    ``next_token_weight`` times the usual next-token loss. ``trainable``: ``"attention"`` (the converted
    layers' mixers), ``"lora"`` (low-rank adapters of rank ``lora_rank`` on every projection of the
    blocks, and the converted mixers' own small parameters: gates, logit prior) or ``"all"``. Logs
    ``train/kl``, ``val/kl`` and the student's ``val/loss`` / ``val/ppl``."""

    def __init__(self, teacher: str, student_dir: str, trainable: TrainableSet = "attention", lora_rank: int = 8,
                 next_token_weight: float = 0.0, **kwargs):
        if trainable not in TRAINABLE_SETS:
            raise LinearizeError(f"--trainable must be one of {TRAINABLE_SETS}, got {trainable!r}")
        super().__init__(teacher, student_dir, **kwargs)
        self.trainable, self.next_token_weight = trainable, float(next_token_weight)
        layers = converted_layers(self.model.config)
        mixers = _attention_modules(self.model)
        self.adapters: Optional[LowRankAdapters] = None
        if trainable == "all":
            self.model.requires_grad_(True)
        else:
            self.model.requires_grad_(False)
            if trainable == "attention":
                for i in layers:
                    mixers[i].requires_grad_(True)
            else:
                names = [name for name, m in self.model.named_modules()
                         if isinstance(m, nn.Linear) and ".layers." in f".{name}" and not name.endswith("gate_proj")]
                self.adapters = LowRankAdapters(self.model, names, lora_rank)
                for i in layers:
                    for name, p in mixers[i].named_parameters():
                        if not name.endswith("proj.weight"):
                            p.requires_grad_(True)  # gates, logit prior, convolution: small, trained fully
        self._val_kl: Optional[torch.Tensor] = None

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if self.adapters is not None:
            groups.append({"params": list(self.adapters.parameters()), "weight_decay": 0.0})
        return groups

    def _losses(self, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs, use_cache=False).logits
        logits = self(inputs)
        kl = distillation_loss(logits, teacher_logits)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return kl, ce

    def training_step(self, batch, batch_idx):
        kl, ce = self._losses(batch)
        loss = kl + self.next_token_weight * ce if self.next_token_weight else kl
        self.log("train/kl", kl, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss", ce, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_kl = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx) -> None:
        kl, ce = self._losses(batch)
        n = batch[:, 1:].numel()
        self._val_sum += ce.detach().double() * n
        self._val_kl += kl.detach().double() * n
        self._val_count += n

    def on_validation_epoch_end(self) -> None:
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(count) > 0:
            kl = self.trainer.strategy.reduce(self._val_kl, reduce_op="sum") / count
            self.log("val/kl", kl.float(), prog_bar=True, sync_dist=True)
        super().on_validation_epoch_end()

    def merged_model(self) -> ZeroSForCausalLM:
        """The student with its adapters (if any) folded into the weights."""
        if self.adapters is not None and not self.adapters.merged:
            self.adapters.merge()
        return self.model


def record(config, **entries) -> None:
    """Add ``entries`` to the student config's :data:`RECORD_KEY` (teacher, recipe, tokens, errors)."""
    current = dict(getattr(config, RECORD_KEY, None) or {})
    current.update(entries)
    setattr(config, RECORD_KEY, current)


def default_tokens(num_parameters: int) -> int:
    """The distillation budget (both stages) that suits a teacher of ``num_parameters``:
    :data:`TOKENS_PER_PARAMETER` per parameter, at least :data:`MIN_DEFAULT_TOKENS`."""
    return max(MIN_DEFAULT_TOKENS, int(TOKENS_PER_PARAMETER * num_parameters))


TOKENS_PER_PARAMETER = 0.1  # 13.5M tokens for a 135M teacher; LoLCATs used ~40M for 8B, RADLADS far more
MIN_DEFAULT_TOKENS = 262_144  # small teachers: 256 blocks of 1,024 tokens, a few minutes on a CPU


