"""The generation cache of a ZeroS model (:class:`ZeroSCache`), its typed per-layer slots, and its state files.

Each layer of the stack keeps one slot, of the type of its token mixer (``config.mixer_types``):

- :class:`ZeroSLayerState` (``"zeros"``): the core ``ZeroSState`` of ``zeros_attention``, the running sum
  of u of the deviation logit, the short convolution's last inputs;
- :class:`LinearLayerState` (``"linear"``): the running sums S and z of plain linear attention, the short
  convolution's last inputs;
- :class:`SoftmaxLayerState` (``"softmax"``): the keys, the values, and which keys are real.

A slot names its entries, and it alone knows how to select, repeat, copy and move them, how rows of
different lengths join one batch and leave it (``stack``, ``used_columns``, ``keep_columns``: the
server's continuous batching, through :meth:`ZeroSCache.stack`, :meth:`ZeroSCache.drop_rows` and
:meth:`ZeroSCache.take_rows`) and which
tensors it writes to a state file, so the mixers, :meth:`ZeroSCache.save` and :meth:`ZeroSCache.load` cannot
disagree about what sits where.

``save_pretrained`` copies this file beside ``modeling_zeros.py`` (``trust_remote_code``), so it imports
nothing from the ``zeros_lm`` package except its flat siblings (``.atomic``, ``.configuration_zeros``, ``.ops``).

Shapes: B batch, Hkv key/value heads (``num_key_value_heads``: a state is kept once per K/V head, not per
query head), d head dimension, S keys in the cache, K ``conv_size``, C the convolved channels.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.cache_utils import Cache

from .atomic import atomic_write_file, remove_stale_temporaries
from .configuration_zeros import ZeroSConfig
from .ops import ZeroSState

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TensorFn = Callable[[torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------------------------------
# Per-layer slots
# --------------------------------------------------------------------------------------------------


def _cat_entries(entries: list, capacity: int = 0):
    """One slot entry of several slots joined along the batch: tensors, ZeroSStates, or all None. capacity:
    the first entry's buffer may take the other rows (:func:`_append_rows`)."""
    if all(x is None for x in entries):
        return None
    if any(x is None for x in entries):
        raise ValueError("cannot join slots of which some use an entry and some do not (different configurations)")
    join = (lambda xs: _append_rows(xs[0], xs[1:], capacity)) if capacity else (lambda xs: torch.cat(xs, dim=0))
    if isinstance(entries[0], ZeroSState):
        return ZeroSState(**{f.name: join([getattr(x, f.name) for x in entries]) for f in dataclasses.fields(ZeroSState)})
    return join(entries)


def _append_rows(first: torch.Tensor, rest: list[torch.Tensor], capacity: int) -> torch.Tensor:
    """first (n, ...) followed by the rows of ``rest``, in a buffer of at least ``capacity`` rows: first's own
    memory when first is a contiguous tensor whose storage has room for them after its rows (first's rows are
    then not copied: a stream joining a served batch costs its own state, not the batch's), else a new buffer.
    The memory of first's storage past its rows must be nobody's (the caller owns first:
    ``ZeroSCache.in_place_updates``)."""
    n, k = first.shape[0], sum(x.shape[0] for x in rest)
    row_bytes = first[:1].numel() * first.element_size()
    room = first.untyped_storage().nbytes() - first.storage_offset() * first.element_size()
    if first.is_contiguous() and n and room >= (n + k) * row_bytes:
        out = first.as_strided((n + k, *first.shape[1:]), first.stride(), first.storage_offset())
    else:
        out = first.new_empty((max(capacity, n + k), *first.shape[1:]))[: n + k]
        out[:n].copy_(first)
    row = n
    for x in rest:
        out[row : row + x.shape[0]].copy_(x)
        row += x.shape[0]
    return out


def _select(x: torch.Tensor, dim: int, indices: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, indices)``; on the CPU as one concatenation of the runs of consecutive indices
    (block copies). torch's CPU index_select gathers element by element: for 30 of 31 rows of a batch of
    recurrent states (6, 3, 64, 64) it took 19 ms against 0.3 ms for the copy, on a 2-core CPU, and every
    stream that leaves a served batch pays it (:meth:`ZeroSCache.take_rows`)."""
    if x.device.type != "cpu":
        return x.index_select(dim, indices.to(x.device))
    runs: list[list[int]] = []  # [start, stop) of consecutive indices
    for i in indices.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    if not runs:
        return x.narrow(dim, 0, 0).clone()
    return torch.cat([x.narrow(dim, a, b - a) for a, b in runs], dim=dim)


def _map_entry(x, fn: TensorFn):
    """fn applied to one slot entry: a tensor, every tensor of a ZeroSState, or None (stays None)."""
    if x is None:
        return None
    if isinstance(x, ZeroSState):
        return ZeroSState(**{f.name: fn(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return fn(x)


@dataclasses.dataclass
class LayerState:
    """A layer's slot in :class:`ZeroSCache`: a dataclass whose fields are tensors (batch first), a
    ``ZeroSState``, or None (an entry the layer's configuration does not use).

    Subclasses name their entries; the field order is also the order of the unnamed tuples of state
    files of format ``zeros-lm-state/1``, which :meth:`ZeroSCache.load` still reads.
    """

    KIND: ClassVar[str] = ""  # the entry of config.mixer_types this slot belongs to
    OPTIONAL: ClassVar[tuple[str, ...]] = ()  # fields that may be None
    MODEL_DTYPE: ClassVar[tuple[str, ...]] = ()  # fields in the model's dtype (the others accumulate in float32)

    def map(self, fn: TensorFn) -> "LayerState":
        """A slot of the same type with ``fn`` applied to each of its tensors."""
        return type(self)(**{f.name: _map_entry(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def index_select(self, indices: torch.Tensor) -> "LayerState":
        """Rows ``indices`` of the batch, in that order (selection, beam-search reordering)."""
        return self.map(lambda x: _select(x, 0, indices))

    def repeat_interleave(self, repeats: int) -> "LayerState":
        """Each row repeated ``repeats`` times in place (num_return_sequences, forks of one state)."""
        return self.map(lambda x: x.repeat_interleave(repeats, dim=0))

    def clone(self) -> "LayerState":
        return self.map(torch.Tensor.clone)

    # -- continuous batching: streams join one batch and leave it ----------------------------------
    @classmethod
    def stack(cls, slots: list["LayerState"], capacity: int = 0) -> "LayerState":
        """One slot whose rows are the rows of ``slots``, in order (the other inputs are left as they are; with
        ``capacity`` the first one's buffers may take the rows after its own: :meth:`ZeroSCache.stack`)."""
        return cls(**{f.name: _cat_entries([getattr(s, f.name) for s in slots], capacity)
                      for f in dataclasses.fields(cls)})

    def used_columns(self) -> torch.Tensor | None:
        """(S,) bool: the token columns some row of the slot uses (None: the slot keeps no columns)."""
        return None

    def keep_columns(self, columns: torch.Tensor) -> "LayerState":
        """The slot with only the token columns ``columns`` (indices, ascending; the others no row uses:
        :meth:`used_columns`)."""
        return self

    def to(self, device=None, dtype: torch.dtype | None = None) -> "LayerState":
        """Every tensor on ``device``; ``dtype`` (the model's) applies only to the ``MODEL_DTYPE`` fields."""
        moved = {}
        for f in dataclasses.fields(self):
            cast = dtype if f.name in self.MODEL_DTYPE else None
            moved[f.name] = _map_entry(getattr(self, f.name), lambda x, cast=cast: x.to(device=device, dtype=cast))
        return type(self)(**moved)

    @property
    def nbytes(self) -> int:
        """Size of the slot's tensors, in bytes."""
        sizes = []
        self.map(lambda x: sizes.append(x.numel() * x.element_size()) or x)
        return sum(sizes)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The slot's tensors as a state file stores them: ``name`` for a tensor, ``name.field`` for each
        tensor of a ZeroSState; None entries are left out."""
        out = {}
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            if isinstance(x, ZeroSState):
                out.update({f"{f.name}.{g.name}": getattr(x, g.name) for g in dataclasses.fields(x)})
            elif x is not None:
                out[f.name] = x
        return out

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerState":
        """The inverse of :meth:`file_tensors`; KeyError names a required entry that is missing."""
        values = {}
        for f in dataclasses.fields(cls):
            prefix = f"{f.name}."
            nested = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if nested:
                values[f.name] = ZeroSState(**{g.name: nested[g.name] for g in dataclasses.fields(ZeroSState)})
            elif f.name in tensors:
                values[f.name] = tensors[f.name]
            elif f.name in cls.OPTIONAL:
                values[f.name] = None
            else:
                raise KeyError(f"{cls.__name__}.{f.name}")
        return cls(**values)


@dataclasses.dataclass
class ZeroSLayerState(LayerState):
    """Slot of a ZeroS layer (``ZeroSAttention``).

    core: the ``ZeroSState`` of ``zeros_attention``, per K/V head (float32; O(Hkv d^2) per row: every entry
        is key-side, so a group of query heads shares one);
    u_sum: (B, Hkv, d) float32, the running sum of u over the real tokens (the deviation logit's mean);
        None with ``logit_type="norm"``;
    conv: (B, K - 1, C) in the model's dtype, the short convolution's last real inputs (C = (H + 3 Hkv) d,
        the q, k, v, u projections); None without one.
    """

    KIND: ClassVar[str] = "zeros"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("u_sum", "conv")
    MODEL_DTYPE: ClassVar[tuple[str, ...]] = ("conv",)

    core: ZeroSState
    u_sum: torch.Tensor | None = None
    conv: torch.Tensor | None = None


@dataclasses.dataclass
class LinearLayerState(LayerState):
    """Slot of a plain linear-attention layer (``LinearAttention``), the running sums over the real tokens.

    kv_sum: (B, Hkv, d, d) float32, S = sum phi(k) v^T;
    k_sum: (B, Hkv, d) float32, z = sum phi(k) (the normaliser);
    conv: (B, K - 1, C) in the model's dtype, the short convolution's last real inputs (C = (H + 2 Hkv) d);
        None without one.
    """

    KIND: ClassVar[str] = "linear"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("conv",)
    MODEL_DTYPE: ClassVar[tuple[str, ...]] = ("conv",)

    kv_sum: torch.Tensor
    k_sum: torch.Tensor
    conv: torch.Tensor | None = None


@dataclasses.dataclass
class SoftmaxLayerState(LayerState):
    """Slot of a softmax layer (``SoftmaxAttention``): the usual KV cache, which grows with the context.

    keys, values: (B, Hkv, S, d) in the model's dtype (keys after RoPE; grouped K/V heads once each);
    valid: (B, S) bool, which of the S keys are real (padding keys are never attended to).
    """

    KIND: ClassVar[str] = "softmax"
    MODEL_DTYPE: ClassVar[tuple[str, ...]] = ("keys", "values")

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @property
    def width(self) -> int:
        """S, the key columns."""
        return self.valid.shape[1]

    def left_padded(self, width: int) -> "SoftmaxLayerState":
        """The slot with ``width`` key columns: the missing ones in front, zero and not valid (never attended to)."""
        missing = width - self.width
        if missing < 0:
            raise ValueError(f"cannot pad {self.width} key columns to {width}")
        if missing == 0:
            return self
        pad_kv = (0, 0, missing, 0)  # (B, H, S, d): in front of S
        return SoftmaxLayerState(keys=F.pad(self.keys, pad_kv), values=F.pad(self.values, pad_kv),
                                 valid=F.pad(self.valid, (missing, 0), value=False))

    @classmethod
    def stack(cls, slots: list["LayerState"], capacity: int = 0) -> "SoftmaxLayerState":
        """Rows of different lengths S join left-padded to the longest, the padding masked by ``valid`` (always
        into new tensors: the columns change; a softmax layer copies its keys at every token anyway)."""
        width = max(s.width for s in slots)
        return super().stack([s.left_padded(width) for s in slots])

    def used_columns(self) -> torch.Tensor:
        return self.valid.any(dim=0)

    def keep_columns(self, columns: torch.Tensor) -> "SoftmaxLayerState":
        if len(columns) == self.width:
            return self
        return SoftmaxLayerState(keys=_select(self.keys, 2, columns), values=_select(self.values, 2, columns),
                                 valid=_select(self.valid, 1, columns))


LAYER_STATE_CLASSES: dict[str, type[LayerState]] = {
    cls.KIND: cls for cls in (ZeroSLayerState, LinearLayerState, SoftmaxLayerState)
}

# --------------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------------

# The format tag of the files save() writes: named entries ("layers.{i}.{field}"), the layers' kinds in
# the header, and a fingerprint of every element of every weight. Earlier formats still load: 2 has the
# same entries but fingerprinted only the leading elements of each weight; 1 stored unnamed tuples
# ("layers.{i}.{position}", the entries' types in the header) with that same partial fingerprint.
STATE_FILE_FORMAT = "zeros-lm-state/3"
STATE_FILE_FORMAT_NAMED = "zeros-lm-state/2"
STATE_FILE_FORMAT_TUPLES = "zeros-lm-state/1"
STATE_FILE_FORMATS = (STATE_FILE_FORMAT, STATE_FILE_FORMAT_NAMED, STATE_FILE_FORMAT_TUPLES)
# The config fields a state depends on (a state file records them; load() compares them with the model's).
STATE_CONFIG_FIELDS = (
    "model_type", "attention_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "logit_type",
    "vocab_size", "first_layer_zero_order", "zero_order_all_layers", "layer_types", "conv_size",
    "num_key_value_heads", "head_dim",
)
# The canonical form of a floating-point weight in the fingerprint: the same checkpoint loaded in float32 or
# bfloat16 has the same bfloat16 values (a cast rounds to nearest), so both fingerprint the same.
_FINGERPRINT_DTYPE = torch.bfloat16
# How many leading elements of each weight the fingerprint of each format reads (None: all of them). Formats 1
# and 2 read 256 only, so a model whose later weights all changed passed; kept to check those files.
_FINGERPRINT_ELEMENTS = {STATE_FILE_FORMAT: None, STATE_FILE_FORMAT_NAMED: 256, STATE_FILE_FORMAT_TUPLES: 256}
# Fields added to STATE_CONFIG_FIELDS after files were written without them: a file that lacks one was
# saved from a model with the field's default, computed here from the file's own fields.
_STATE_FIELD_DEFAULTS = {
    "num_key_value_heads": lambda fields: fields.get("num_attention_heads"),
    "head_dim": lambda fields: (fields["hidden_size"] // fields["num_attention_heads"]
                                if fields.get("hidden_size") and fields.get("num_attention_heads") else None),
}


def _weights_fingerprint(model: nn.Module, leading: int | None = None) -> str:
    """A short hash of the model's weights: the names, the shapes and every element of each (``leading``:
    only the first ones, the rule of old files), as bfloat16 words, so that float32 and bfloat16 copies of
    one checkpoint agree. Cheap next to loading the model: one pass over its bytes."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        if leading is not None:  # formats 1 and 2, exactly as they were written
            words = flat[:leading].to("cpu", _FINGERPRINT_DTYPE).view(torch.int16)
        elif flat.is_floating_point():
            words = flat.to(_FINGERPRINT_DTYPE).view(torch.int16).cpu()
        else:  # integer buffers as they are
            words = flat.cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(words.numpy().tobytes())
    return h.hexdigest()[:16]


def _state_identity(config_fields: dict, model: nn.Module | None, file_format: str = STATE_FILE_FORMAT) -> dict:
    """What a state depends on: the config fields and (with ``model``) its weights' fingerprint, by the rule
    of ``file_format``."""
    ident = dict(config_fields)
    if model is not None:
        ident["weights"] = _weights_fingerprint(model, _FINGERPRINT_ELEMENTS[file_format])
    return ident


def check_state_target(path, overwrite: bool = False, overwrite_option: str = "overwrite=True") -> None:
    """Raise unless a state may be written to ``path``: FileExistsError for an existing file that is not a
    state file (never replaced) or, without ``overwrite``, an existing state file (the message names
    ``overwrite_option``, the way the caller's user asks for it); IsADirectoryError for a directory."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a directory; give a file name")
    if os.path.lexists(path):
        if not is_state_file(path):
            raise FileExistsError(f"'{path}' exists and is not a ZeroS state file; it is left alone: "
                                  "choose another file name")
        if not overwrite:
            raise FileExistsError(f"the state file '{path}' exists; replace it with {overwrite_option}, "
                                  "or choose another file name")


def is_state_file(path) -> bool:
    """Whether ``path`` is a file that :meth:`ZeroSCache.save` wrote (of any format); reads only its header."""
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") in STATE_FILE_FORMATS
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return False


def _read_state_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and tensors of a state file, or one clear ValueError for any file that is not one."""
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") not in STATE_FILE_FORMATS:
                raise ValueError("no ZeroS state header")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key in ("seen_tokens", "identity", "user"):
            header[key] = json.loads(header[key])
    except Exception as e:  # noqa: BLE001 - truncated, foreign or corrupt files all land here
        raise _unreadable(path, e) from None
    return header, tensors


def _unreadable(path: str, error: Exception) -> ValueError:
    return ValueError(
        f"'{path}' is not a readable ZeroS state file ({' '.join(str(error).split())[:200]}); "
        "write one with ZeroSCache.save or generate.py --save-state"
    )


def _layer_states_named(header: dict, tensors: dict, layer_kinds) -> list:
    """Slots of a file of STATE_FILE_FORMAT: the kind of each layer in the header, its named entries."""
    states = []
    for i, (kind, expected) in enumerate(zip(json.loads(header["layers"]), layer_kinds)):
        if kind is None:
            states.append(None)
            continue
        if kind != expected:
            raise ValueError(f"layer {i} holds a {kind!r} state, the model's layer is {expected!r}")
        prefix = f"layers.{i}."
        entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        states.append(LAYER_STATE_CLASSES[kind].from_file_tensors(entries))
    return states


def _layer_states_from_tuples(header: dict, tensors: dict, layer_kinds) -> list:
    """Slots of a file of STATE_FILE_FORMAT_TUPLES: per layer, the types of its unnamed entries in the header
    ("zeros_state", "tensor" or "none"), in the order of the slot's fields."""
    states = []
    for i, (entry_types, kind) in enumerate(zip(json.loads(header["layout"]), layer_kinds)):
        if entry_types is None:
            states.append(None)
            continue
        items = []
        for j, entry_type in enumerate(entry_types):
            key = f"layers.{i}.{j}"
            if entry_type == "zeros_state":
                items.append(ZeroSState(**{f.name: tensors[f"{key}.{f.name}"] for f in dataclasses.fields(ZeroSState)}))
            else:
                items.append(tensors[key] if entry_type == "tensor" else None)
        states.append(LAYER_STATE_CLASSES[kind](*items))
    return states


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


class ZeroSCache(Cache):
    """Generation cache of a :class:`ZeroSForCausalLM`.

    Per layer, the slot of that layer's mixer (``config.mixer_types``; hybrid stacks mix them):
    :class:`ZeroSLayerState`, :class:`LinearLayerState` or :class:`SoftmaxLayerState` (None before the
    first token); and, shared by all layers, the number of real (non-padding) tokens consumed in each
    row, which gives the RoPE positions and the counts t of the running means. The size grows with the
    context only through softmax layers (see :attr:`nbytes`).

    A recurrent state cannot be rolled back, so :meth:`crop` raises. It can be saved to a file and loaded
    again (:meth:`save`, :meth:`load`): a prompt read once is reused by any number of later generations,
    and :meth:`copy` / ``batch_repeat_interleave`` fork it.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: ZeroSConfig):
        super().__init__(layers=[])
        self.layer_kinds = config.mixer_types
        self.num_layers = config.num_hidden_layers
        self.layer_states: list[LayerState | None] = [None] * self.num_layers
        self.num_tokens: torch.Tensor | None = None  # (B,) long: real tokens consumed per row
        self.seen_tokens = 0  # columns consumed, padding included (= the KV length for softmax)
        self.config_fields = {name: getattr(config, name, None) for name in STATE_CONFIG_FIELDS}
        self.metadata: dict[str, str] = {}  # what load() read besides the state (see save)
        # Whether a ZeroS layer decoding a token may write its new recurrent state over the old one's sums (one
        # pass less over the state per token; ``zeros_attention``'s ``in_place``) instead of into new tensors.
        # Only for an owner that reads the states through this cache alone, between calls (the server's decode
        # batch, generate.py): a ZeroSState taken out of it earlier would change with it. A new cache, and every
        # cache made from this one (take_rows, stack, map, copy), starts without.
        self.in_place_updates = False

    def __repr__(self):
        return (
            f"ZeroSCache(layers={list(self.layer_kinds)}, "
            f"seen_tokens={self.seen_tokens}, nbytes={self.nbytes})"
        )

    # -- used by the model ------------------------------------------------------------------------
    def layer_state(self, layer_idx: int) -> LayerState | None:
        return self.layer_states[layer_idx]

    def update_layer_state(self, layer_idx: int, state: LayerState) -> None:
        expected = LAYER_STATE_CLASSES[self.layer_kinds[layer_idx]]
        if not isinstance(state, expected):
            raise TypeError(f"layer {layer_idx} ({self.layer_kinds[layer_idx]}) keeps a {expected.__name__}, "
                            f"not a {type(state).__name__}")
        self.layer_states[layer_idx] = state

    def advance(self, valid: torch.Tensor | None, batch_size: int, num_new: int, device) -> None:
        """Record that ``num_new`` columns (``valid`` marks the real ones) went through every layer."""
        if valid is None:
            added = torch.full((batch_size,), num_new, dtype=torch.long, device=device)
        else:
            added = valid.sum(dim=1, dtype=torch.long)
        self.num_tokens = added if self.num_tokens is None else self.num_tokens + added
        self.seen_tokens += num_new

    # -- transformers Cache API -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Number of token columns consumed so far (padding included)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        # generate() slices the prompt by get_seq_length() only for non-linear (KV) caches
        return [kind != "softmax" for kind in self.layer_kinds]

    @property
    def batch_size(self) -> int:
        return -1 if self.num_tokens is None else int(self.num_tokens.shape[0])

    @property
    def nbytes(self) -> int:
        """Size of everything the cache holds, in bytes."""
        total = sum(s.nbytes for s in self.layer_states if s is not None)
        if self.num_tokens is not None:
            total += self.num_tokens.numel() * self.num_tokens.element_size()
        return total

    def get_nbytes(self) -> int:
        return self.nbytes

    def _apply(self, slot_fn: Callable[[LayerState], LayerState], tensor_fn: TensorFn) -> None:
        """slot_fn on every layer's slot, tensor_fn on the per-row token counts."""
        self.layer_states = [None if s is None else slot_fn(s) for s in self.layer_states]
        self.num_tokens = None if self.num_tokens is None else tensor_fn(self.num_tokens)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (in that order)."""
        self._apply(lambda s: s.index_select(indices), lambda x: x.index_select(0, indices.to(x.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows for beam search."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda s: s.repeat_interleave(repeats), lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.layer_states = [None] * self.num_layers
        self.num_tokens = None
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise ValueError(
            "ZeroSCache cannot be cropped: a recurrent state cannot be rolled back to an earlier token. "
            "Recompute the prefix instead (features that need crop, e.g. assisted generation, are unsupported)."
        )

    def activate_past_recording(self):
        raise ValueError("ZeroSCache cannot record past states (a recurrent state cannot be rolled back).")

    # -- continuous batching ----------------------------------------------------------------------
    def _with_states(self, layer_states: list, num_tokens: torch.Tensor | None, seen_tokens: int) -> "ZeroSCache":
        """A new cache of this one's model with the given contents (this one is left as it is)."""
        out = copy.copy(self)
        out.layer_states, out.num_tokens, out.seen_tokens = layer_states, num_tokens, seen_tokens
        out.metadata = dict(self.metadata)
        out.in_place_updates = False  # (its tensors may be this one's: map, to)
        return out

    @classmethod
    def stack(cls, caches: list["ZeroSCache"], capacity: int = 0) -> "ZeroSCache":
        """One cache whose rows are the rows of ``caches``, in order (every one must have read a token; they
        are left as they are): streams of different lengths join one batch, each slot type joining its own
        entries (:meth:`LayerState.stack`; softmax keys left-padded and masked).

        capacity: when the first cache's tensors may be overwritten (its ``in_place_updates``: a served batch),
        the others' rows are written after its own in the buffers its tensors are prefixes of, where those
        have room (recurrent states: rows of a fixed shape), and only the joining rows are copied; where they
        have none, into new buffers of ``capacity`` rows (at least the rows joined) that later joins fill.
        The first cache is then not to be used afterwards. (At 32 streams the batch holds 53 MB of ZeroS
        states: copying it cost every join 20 ms on a 2-core CPU, in the step every stream waits on.)"""
        if not caches:
            raise ValueError("ZeroSCache.stack: no cache to join")
        if any(c.num_tokens is None for c in caches):
            raise ValueError("ZeroSCache.stack: a cache has read no token yet")
        if any(c.layer_kinds != caches[0].layer_kinds for c in caches):
            raise ValueError("ZeroSCache.stack: the caches belong to models with different layers")
        if len(caches) == 1:
            return caches[0]
        room = capacity if caches[0].in_place_updates else 0
        states = [LAYER_STATE_CLASSES[kind].stack([c.layer_states[i] for c in caches], room)
                  for i, kind in enumerate(caches[0].layer_kinds)]
        # every row's slots end at the last column; the shorter rows' missing columns are in front
        return caches[0]._with_states(states, torch.cat([c.num_tokens for c in caches]),
                                      max(c.seen_tokens for c in caches))

    def take_rows(self, rows: list[int] | torch.Tensor) -> "ZeroSCache":
        """A new cache of the given rows (in that order), without the token columns none of them uses (this one
        is left as it is): streams leave a batch. The columns go wherever they are: the leading ones of rows
        shorter than the batch's longest, and the padding a batched prefill left after a row's new tokens."""
        if self.num_tokens is None:
            raise ValueError("ZeroSCache.take_rows: the cache is empty")
        index = torch.as_tensor(rows, dtype=torch.long, device=self.num_tokens.device)
        states = [None if s is None else s.index_select(index) for s in self.layer_states]
        return self._with_rows(states, self.num_tokens.index_select(0, index))

    def _with_rows(self, states: list, num_tokens: torch.Tensor) -> "ZeroSCache":
        """A cache of the rows in ``states`` (num_tokens: theirs) without the token columns none of them uses
        (:meth:`take_rows`, :meth:`drop_rows`)."""
        used = [u for u in (s.used_columns() for s in states if s is not None) if u is not None]
        if not used:  # no slot keeps columns: a row of n real tokens would use n of them
            return self._with_states(states, num_tokens, int(num_tokens.max()) if len(num_tokens) else 0)
        # the slots that keep columns (softmax) know which ones each row uses; every such slot has the same
        keep = torch.stack(used).any(dim=0).nonzero().squeeze(1)  # (S',) ascending
        states = [None if s is None else s.keep_columns(keep) for s in states]
        return self._with_states(states, num_tokens, len(keep))

    def drop_rows(self, rows: list[int]) -> tuple["ZeroSCache", list[int]]:
        """This cache without ``rows``, made over its own tensors: each dropped row below the new batch size
        takes one of the last rows, and only those are copied (:meth:`take_rows` copies every row it keeps:
        at 31 streams of the served batch 53 MB, 18 ms on a 2-core CPU, in the step every other stream
        waits on). The rows' order changes: returns the cache and, per row of it, the index of the row it was.

        Only for a cache whose tensors nothing else reads (``in_place_updates``, which the result keeps);
        this one is not to be used afterwards. Slots that keep token columns (softmax) also drop the columns
        no remaining row uses, as :meth:`take_rows` does.
        """
        if not self.in_place_updates:
            raise ValueError("ZeroSCache.drop_rows overwrites the cache's tensors: only for a cache with "
                             "in_place_updates (nothing else reads it); use take_rows otherwise")
        if self.num_tokens is None:
            raise ValueError("ZeroSCache.drop_rows: the cache is empty")
        n, dropped = len(self.num_tokens), set(rows)
        if not dropped <= set(range(n)):
            raise ValueError(f"ZeroSCache.drop_rows: rows {sorted(dropped)} are not all rows of a batch of {n}")
        size = n - len(dropped)
        holes = [i for i in sorted(dropped) if i < size]
        movers = [j for j in range(size, n) if j not in dropped]  # as many as the holes
        order = list(range(size))
        for hole, mover in zip(holes, movers):
            order[hole] = mover

        def move(x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> the first ``size`` rows, the holes filled
            for hole, mover in zip(holes, movers):  # (row by row: block copies)
                x[hole].copy_(x[mover])
            return x[:size]

        out = self._with_rows([None if s is None else s.map(move) for s in self.layer_states], move(self.num_tokens))
        out.in_place_updates = True
        return out, order

    # -- state files ------------------------------------------------------------------------------
    def map(self, fn: TensorFn) -> "ZeroSCache":
        """A new cache with ``fn`` applied to each of its tensors (this one is left as it is)."""
        return self._with_states([None if s is None else s.map(fn) for s in self.layer_states],
                                 None if self.num_tokens is None else fn(self.num_tokens), self.seen_tokens)

    def copy(self) -> "ZeroSCache":
        """An independent copy (fork a conversation: both continue separately from here)."""
        return self.map(torch.Tensor.clone)

    def save(
        self,
        path,
        model: "PreTrainedModel | None" = None,
        metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
        allow_empty: bool = False,
    ) -> None:
        """Write the cache to ``path`` (safetensors), atomically: a reader never sees half a file.

        The file records what the state depends on: the config fields of ``STATE_CONFIG_FIELDS`` and, when
        ``model`` is given, a fingerprint of all its weights, so that :meth:`load` refuses a model it does
        not fit. ``metadata`` (str -> str) is stored alongside (e.g. generate.py's pending tokens).

        Nothing else is ever replaced: an existing file that is not a state file is refused (FileExistsError),
        and so is an existing state file unless ``overwrite``. An empty cache (no token read yet) is refused
        (ValueError) unless ``allow_empty``: its file holds no state, only the metadata (generate.py's one
        pending token of a one-token prompt).
        """
        if self.num_tokens is None and not allow_empty:
            raise ValueError("ZeroSCache.save: the cache is empty (no token has been read yet)")
        check_state_target(path, overwrite)
        tensors = {} if self.num_tokens is None else {"num_tokens": self.num_tokens}
        for i, state in enumerate(self.layer_states):
            if state is not None:
                tensors.update({f"layers.{i}.{name}": x for name, x in state.file_tensors().items()})
        header = {
            "format": STATE_FILE_FORMAT,
            "layers": json.dumps([None if s is None else s.KIND for s in self.layer_states]),
            "seen_tokens": str(self.seen_tokens),
            "identity": json.dumps(_state_identity(self.config_fields, model)),
            "user": json.dumps(metadata or {}),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        path = os.fspath(path)
        remove_stale_temporaries(os.path.dirname(path) or ".", of=os.path.basename(path))  # a killed save's
        atomic_write_file(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=header))

    @classmethod
    def load(cls, path, model: "PreTrainedModel", *, check_weights: bool = True) -> "ZeroSCache":
        """Read a state written by :meth:`save` for ``model`` (on its device); one clear error if the file is
        missing, is not a ZeroS state file, or was saved from a model this one is not. The returned cache
        continues exactly where the saved one stopped (pass it to ``generate(..., cache=...)``).
        Files of the earlier formats (``zeros-lm-state/1`` and ``/2``) load too, their weights checked by
        the fingerprint rule they were written with."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"'{path}' is a directory, not a state file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"state file '{path}' does not exist")
        header, tensors = _read_state_file(path)
        cache = cls(model.config)
        saved = dict(header["identity"])
        for name, default in _STATE_FIELD_DEFAULTS.items():
            if name not in saved:
                saved[name] = default(saved)
        current = _state_identity(cache.config_fields, model if check_weights else None, header["format"])
        # Config fields must all match; the weights are compared when both sides have a fingerprint.
        mismatched = [k for k in current if k != "weights" and saved.get(k) != current[k]]
        if "weights" in saved and "weights" in current and saved["weights"] != current["weights"]:
            mismatched.append("weights")
        if mismatched:
            detail = ", ".join(f"{k}: file {saved.get(k)!r} vs model {current.get(k)!r}" for k in mismatched if k != "weights")
            if "weights" in mismatched:
                detail = (detail + "; " if detail else "") + "the weights differ (another checkpoint)"
            raise ValueError(f"state file '{path}' was saved from a different model ({detail}); "
                             "load it into the model that wrote it")
        try:
            named = header["format"] != STATE_FILE_FORMAT_TUPLES
            read_layers = _layer_states_named if named else _layer_states_from_tuples
            num_layers = len(json.loads(header["layers" if named else "layout"]))
            if num_layers != cache.num_layers:
                raise ValueError(f"{num_layers} layers, the model {cache.num_layers}")
            states = read_layers(header, tensors, cache.layer_kinds)
            num_tokens = tensors.get("num_tokens")
            if num_tokens is None and (any(s is not None for s in states) or int(header["seen_tokens"])):
                raise KeyError("num_tokens")  # only an empty state (allow_empty) has none
        except Exception as e:  # noqa: BLE001 - a header and tensors that do not fit each other
            raise _unreadable(path, e) from None
        device, dtype = model.device, model.dtype
        cache.layer_states = [None if s is None else s.to(device, dtype) for s in states]
        cache.num_tokens = None if num_tokens is None else num_tokens.to(device)
        cache.seen_tokens = int(header["seen_tokens"])
        cache.metadata = header["user"]
        return cache


__all__ = [
    "LAYER_STATE_CLASSES", "LayerState", "LinearLayerState", "STATE_CONFIG_FIELDS", "STATE_FILE_FORMAT",
    "SoftmaxLayerState", "ZeroSCache", "ZeroSLayerState", "check_state_target", "is_state_file",
]
