"""Configuration of ZeroS language models (and of the softmax / linear-attention baselines).

This is the one place where the model's fields, their types and their defaults are written: the
training command (``--model.<field>``, the YAML ``model:`` section) takes its options from this
signature, checkpoints and exports store ``to_dict()``, and both rebuild the config from it. A new
field added here reaches all of them. The defaults are those of the embedded default run
(``configs/default.yaml``).

This file is copied next to the weights by ``save_pretrained`` (it is imported relatively by
``modeling_zeros.py``), so it must import nothing from the ``zeros_lm`` package but its flat siblings,
relatively (``ops_contract.py``, which holds the one rule for a chunk size; it is copied along).
"""

from typing import Literal, get_args

from transformers import PreTrainedConfig

from .ops_contract import check_chunk_size

AttentionType = Literal["zeros", "softmax", "linear"]
LogitType = Literal["deviation", "norm"]
AttentionBackend = Literal["auto", "torch"]  # ZeroS: "auto" = fused kernels on CUDA when Triton is there
ATTENTION_TYPES = get_args(AttentionType)
LOGIT_TYPES = get_args(LogitType)
ATTENTION_BACKENDS = get_args(AttentionBackend)
# Hybrid stacks: entries of ``layer_types``, in transformers' own vocabulary (which it validates).
LINEAR_LAYER, FULL_LAYER = "linear_attention", "full_attention"
LAYER_TYPES = (LINEAR_LAYER, FULL_LAYER)
# Fields that are None in the signature and derived from other fields when the config is built (then
# stored resolved): see ZeroSConfig.derived_defaults.
DERIVED_FIELDS = ("intermediate_size", "num_key_value_heads", "head_dim")


def _derived_defaults(hidden_size, num_attention_heads) -> dict:
    """The values of DERIVED_FIELDS when they are not given (None where the inputs give none)."""
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    hidden_ok = positive_int(hidden_size)
    return {
        "intermediate_size": 64 * ((8 * hidden_size // 3 + 63) // 64) if hidden_ok else None,
        "num_key_value_heads": num_attention_heads,
        "head_dim": hidden_size // num_attention_heads
        if hidden_ok and positive_int(num_attention_heads) and hidden_size % num_attention_heads == 0 else None,
    }
# The widest short convolution accepted. It mixes a few neighbouring tokens (GLA, DeltaNet and Mamba
# use 4); long-range mixing is the attention's job. Its cost grows with the width (one product per
# lag in every forward, conv_size - 1 inputs per layer in the generation state), so a width far
# beyond a chunk of the chunked form (64 by default) is a mistake, not a short convolution.
MAX_CONV_SIZE = 64


class ZeroSConfig(PreTrainedConfig):
    r"""Configuration of a :class:`ZeroSForCausalLM`.

    One config class for three models that differ only in their token mixer, so that they can be
    trained and compared with the same code:

    - ``attention_type="zeros"``: ZeroS zero-sum linear attention (constant-size recurrent state);
    - ``attention_type="softmax"``: causal softmax attention with a KV cache (the strong baseline);
    - ``attention_type="linear"``: plain causal linear attention with elu+1 features (weak baseline).

    Args:
        vocab_size: size of the vocabulary.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of blocks.
        num_attention_heads: query heads per attention layer; without ``head_dim`` it must divide
            ``hidden_size`` and give an even head dimension (RoPE rotates pairs of channels).
        intermediate_size: width of the SwiGLU MLP; ``None`` picks 8/3 * hidden_size rounded up to a
            multiple of 64 (704 for hidden_size 256, 1024 for 384).
        num_key_value_heads: grouped K/V heads (GQA): key/value heads per attention layer, each shared by a
            group of ``num_attention_heads / num_key_value_heads`` query heads (it must divide
            ``num_attention_heads``). ``None`` (default): one per query head. Softmax layers cache only
            these heads; ZeroS layers project k, v and u (the logit's input) per K/V head and keep one
            state per K/V head (F, G, H, the logit sums and maximum all come from the key side), so the
            state shrinks by the group size; the query and the gates stay per query head. Linear
            attention keeps its sums per K/V head too.
        head_dim: the head dimension d of every attention layer (q, k, v, u are ``heads * head_dim``
            wide, the output projection reads ``num_attention_heads * head_dim``); even. ``None``
            (default): ``hidden_size / num_attention_heads``. Stored resolved (an int) after init.
        rope_theta: RoPE base.
        chunk_size: chunk length of the chunked (training / prefill) forms.
        attention_type: ``"zeros"``, ``"softmax"`` or ``"linear"``.
        first_layer_zero_order: ZeroS only: add the tanh-gated zero-order term g0/t on layer 0.
        logit_type: ZeroS only: the scalar "radial" logit s_t. ``"deviation"`` (default):
            s_t = -(u_t . ubar_t)/sqrt(d) with ubar_t a running mean of u with a learned prior (mu, tau);
            ``"norm"``: s_t = |u_t|^2 / d.
        use_gates: ZeroS only. ``False`` is the "without gates" ablation: no gate projection, and every
            gate is the constant 1 (g1 = gh = 1, so r_{t,i} = p_{t,i} - 1/t, the softmax weight minus its
            uniform part; g0 = 1 where the zero-order term is on, i.e. plain softmax weights there).
            The per-head LayerNorm makes the output invariant to a common scale of the gates, so 1 and
            any other constant give the same model up to its epsilon.
        zero_order_all_layers: ZeroS only, ablation: the g0 term on every layer, not only layer 0.
        use_output_norm: ZeroS only. ``False`` is the ablation without the per-head LayerNorm.
        rms_norm_eps: epsilon of the RMSNorms.
        initializer_range: std of the normal init; the output projections of attention and MLP use
            ``initializer_range / sqrt(2 * num_hidden_layers)``.
        zero_init_residual: initialise those output projections (attention and MLP) to zero instead, so
            every block starts as the identity and the residual stream at init is the embedding alone
            (as torchvision's ``zero_init_residual``, SkipInit / ReZero). Off by default (the paper's
            init). It can shorten the plateau a deeper stack sits on before it learns associative
            recall, but not reliably: a 4-layer softmax model on MQAR left it in one seed of seven,
            and a 2-layer one did not learn the task with it (reports/mqar-4-layers).
        use_cache: whether ``forward`` returns a :class:`ZeroSCache` by default (in eval mode).
        layer_types: hybrid stacks: one entry per layer, ``"linear_attention"`` (the mixer of
            ``attention_type``: ZeroS, or the linear baseline) or ``"full_attention"`` (softmax attention
            with a KV cache). The Hugging Face convention of hybrid configs, in the vocabulary transformers
            validates, so the config loads in stock transformers. ``None``: every layer is ``attention_type``.
        softmax_every: shorthand for ``layer_types``: every N-th layer (N-1, 2N-1, ...) is softmax
            attention, the others ``attention_type`` ("one softmax layer in 4": 4). 0: off. The zero-order
            term stays on the first ZeroS layer of the stack.
        conv_size: width of a short causal depthwise convolution (then SiLU) on the projected q, k, v (and
            u, which feeds the logit) of the ZeroS and linear-attention layers, as in GLA / DeltaNet /
            Mamba; its generation state is the last ``conv_size - 1`` inputs. 0 (default): off; else 2 to
            ``MAX_CONV_SIZE`` (64). Softmax layers have none.
        attention_backend: ZeroS only: ``"auto"`` (default) runs the fused Triton kernels for CUDA tensors
            when Triton is installed, else the PyTorch chunked form; ``"torch"`` always the PyTorch form
            (debugging, comparisons).
        tie_word_embeddings: tie the LM head to the input embedding.
    """

    model_type = "zeros"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        chunk_size: int = 64,
        attention_type: AttentionType = "zeros",
        first_layer_zero_order: bool = True,
        logit_type: LogitType = "deviation",
        use_gates: bool = True,
        zero_order_all_layers: bool = False,
        use_output_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        zero_init_residual: bool = False,
        use_cache: bool = True,
        attention_backend: AttentionBackend = "auto",
        layer_types: list[str] | None = None,
        softmax_every: int = 0,
        conv_size: int = 0,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        derived = _derived_defaults(hidden_size, num_attention_heads)
        if intermediate_size is None:
            intermediate_size = derived["intermediate_size"]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        if num_key_value_heads is None:
            num_key_value_heads = derived["num_key_value_heads"]
        if head_dim is None:
            head_dim = derived["head_dim"]  # None where heads do not divide hidden_size: _check refuses it
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.chunk_size = chunk_size
        self.attention_type = attention_type
        self.first_layer_zero_order = first_layer_zero_order
        self.logit_type = logit_type
        self.use_gates = use_gates
        self.zero_order_all_layers = zero_order_all_layers
        self.use_output_norm = use_output_norm
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.zero_init_residual = zero_init_residual
        self.use_cache = use_cache
        self.attention_backend = attention_backend
        self.softmax_every = softmax_every
        self.conv_size = conv_size
        if softmax_every and layer_types is None and isinstance(num_hidden_layers, int):
            layer_types = [FULL_LAYER if (i + 1) % softmax_every == 0 else LINEAR_LAYER for i in range(num_hidden_layers)]
        self.layer_types = list(layer_types) if layer_types is not None else None
        self._check()
        # Passed on through a copy: the signature resolver of jsonargparse (which builds the training
        # command's --model.* options from this signature) follows a plain ``**kwargs`` into
        # PreTrainedConfig and would offer transformers' own keys (id2label, problem_type, ...) as
        # training options.
        extra = dict(kwargs)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **extra,
        )

    def derived_defaults(self) -> dict:
        """What each of :data:`DERIVED_FIELDS` would be, were it not given, from this config's other fields."""
        return _derived_defaults(self.hidden_size, self.num_attention_heads)

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per K/V head (1 without grouped K/V heads)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def mixer_types(self) -> tuple:
        """The token mixer of each layer: "zeros", "softmax" or "linear"."""
        if self.layer_types is None:
            return (self.attention_type,) * self.num_hidden_layers
        return tuple("softmax" if kind == FULL_LAYER else self.attention_type for kind in self.layer_types)

    def _check(self) -> None:
        """Raise a ValueError naming the first bad field."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ZeroSConfig.{name} must be a positive integer, got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_key_value_heads",
        ):
            positive_int(name)
        check_chunk_size(self.chunk_size, "ZeroSConfig.chunk_size")
        if self.head_dim is None:  # not given, and num_attention_heads does not divide hidden_size
            raise ValueError(
                f"ZeroSConfig: num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size}); or give head_dim"
            )
        positive_int("head_dim")
        if self.head_dim % 2 != 0:
            derived = self.head_dim * self.num_attention_heads == self.hidden_size
            where = "hidden_size / num_attention_heads" if derived else "head_dim"
            raise ValueError(
                f"ZeroSConfig: the head dimension {where} = {self.head_dim} "
                "must be even (RoPE rotates pairs of channels)"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"ZeroSConfig: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}): each K/V head serves a whole group of query heads"
            )
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"ZeroSConfig.attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"ZeroSConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.logit_type not in LOGIT_TYPES:
            raise ValueError(f"ZeroSConfig.logit_type must be one of {LOGIT_TYPES}, got {self.logit_type!r}")
        for name in ("first_layer_zero_order", "use_gates", "zero_order_all_layers", "use_output_norm",
                     "zero_init_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZeroSConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("softmax_every", "conv_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ZeroSConfig.{name} must be an integer >= 0, got {value!r}")
        if self.softmax_every > self.num_hidden_layers:
            raise ValueError(
                f"ZeroSConfig.softmax_every ({self.softmax_every}) is larger than num_hidden_layers "
                f"({self.num_hidden_layers}): no layer would be softmax attention; give at most "
                f"{self.num_hidden_layers}, or 0 for no softmax layer"
            )
        if self.conv_size == 1:
            raise ValueError("ZeroSConfig.conv_size must be 0 (off) or at least 2 (a width-1 convolution only rescales)")
        if self.conv_size > MAX_CONV_SIZE:
            raise ValueError(
                f"ZeroSConfig.conv_size must be at most {MAX_CONV_SIZE} (a short convolution mixes a few "
                f"neighbouring tokens; 4 is usual), got {self.conv_size}"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(
                    f"ZeroSConfig.layer_types must list {self.num_hidden_layers} entries (num_hidden_layers), each "
                    f"of {LAYER_TYPES}, got {self.layer_types!r}"
                )
            if self.softmax_every and self.layer_types != [
                FULL_LAYER if (i + 1) % self.softmax_every == 0 else LINEAR_LAYER for i in range(self.num_hidden_layers)
            ]:
                raise ValueError("ZeroSConfig: softmax_every and layer_types disagree; give one of them")
            if self.attention_type == "softmax" and LINEAR_LAYER in self.layer_types:
                raise ValueError(
                    'ZeroSConfig: "linear_attention" layers run attention_type, which is "softmax"; set '
                    'attention_type to "zeros" or "linear" for a hybrid stack'
                )
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ZeroSConfig.{name} must be a positive number, got {value!r}")


__all__ = ["DERIVED_FIELDS", "ZeroSConfig", "MAX_CONV_SIZE"]
