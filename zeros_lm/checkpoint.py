"""What a zeros-lm training checkpoint holds beyond Lightning's own keys, written and read here only.

A checkpoint (a ``.ckpt`` file, or DeepSpeed's client state) carries:

- under :data:`CHECKPOINT_KEY`, the model's configuration (``ZeroSConfig.to_dict()``), written by
  the LightningModule (:func:`model_state`);
- the tokenizer, serialized, in the data module's own state (Lightning saves ``state_dict()`` of
  the data module; :func:`data_state` / :func:`tokenizer_json_from_data_state`).

:func:`read_config` and :func:`read_tokenizer_json` take a whole checkpoint dict and are what the
export and a resume use; they also read checkpoints of the first format (tokenizer stored next to
the config), and ones with only Lightning's ``hyper_parameters``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Optional

CHECKPOINT_KEY = "zeros_lm"
FORMAT = 2  # 1: the tokenizer was stored under CHECKPOINT_KEY too; 2: in the data module's state
TOKENIZER_KEY = "zeros_lm_tokenizer_json"  # in the data module's state_dict
_DERIVED_CONFIG_KEYS = ("auto_map", "architectures", "transformers_version", "model_type")


def config_fields(config_class=None) -> tuple[str, ...]:
    """The model configuration's fields: the named parameters of ``ZeroSConfig.__init__`` (of a
    subclass: its own, then ZeroSConfig's; never PreTrainedConfig's generic ones)."""
    from .configuration_zeros import ZeroSConfig

    names: list[str] = []
    for cls in (config_class or ZeroSConfig).__mro__:
        if "__init__" not in cls.__dict__:
            continue
        parameters = inspect.signature(cls.__dict__["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
                  and p.name not in names]
        if cls is ZeroSConfig or not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return tuple(names)


def model_state(config) -> dict:
    """The entry the LightningModule stores under :data:`CHECKPOINT_KEY`."""
    return {"format": FORMAT, "config": config.to_dict()}


def data_state(tokenizer) -> dict:
    """The data module's ``state_dict()``: its tokenizer (what an export of the checkpoint ships)."""
    return {TOKENIZER_KEY: tokenizer.backend_tokenizer.to_str() if tokenizer is not None else None}


def tokenizer_json_from_data_state(state: dict) -> Optional[str]:
    return state.get(TOKENIZER_KEY)


def read_config(checkpoint: dict):
    """The ``ZeroSConfig`` a checkpoint was trained with; ``ValueError`` if it holds none."""
    from .configuration_zeros import ZeroSConfig

    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config")
    if stored:
        fields = {k: v for k, v in stored.items() if k not in _DERIVED_CONFIG_KEYS}
        return ZeroSConfig(**fields)
    hyper_parameters = dict(checkpoint.get("hyper_parameters") or {})
    if not hyper_parameters:
        raise ValueError("the checkpoint holds neither a zeros-lm config nor hyper-parameters")
    known = set(config_fields())
    return ZeroSConfig(**{k: v for k, v in hyper_parameters.items() if k in known})


def stored_config(path) -> Optional[Any]:
    """The ``ZeroSConfig`` of the checkpoint at ``path`` (a ``.ckpt`` file, or a DeepSpeed directory:
    its client state sits in the model-state shards), read without loading its tensors (memory-mapped);
    None if it cannot be read or holds none. Cheap: what a resume compares before any data work."""
    import torch

    p = Path(path)
    if p.is_dir():
        tag = (p / "latest").read_text().strip() if (p / "latest").is_file() else "checkpoint"
        shards = sorted((p / tag).glob("*model_states.pt"))
        if not shards:
            return None
        p = shards[0]
    try:
        checkpoint = torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
        return read_config(checkpoint)
    except Exception:  # noqa: BLE001 - unreadable: the resume itself reports it
        return None


def config_differences(stored, requested, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(field, stored value, requested value)`` for every field of the model configuration (see
    :func:`config_fields`) on which two configs differ, but those in ``ignore``."""
    skip = set(ignore)
    return [
        (name, getattr(stored, name, None), getattr(requested, name, None))
        for name in config_fields(type(requested))
        if name not in skip and getattr(stored, name, None) != getattr(requested, name, None)
    ]


def read_tokenizer_json(checkpoint: dict) -> Optional[str]:
    """The serialized tokenizer of a checkpoint (None if it holds none): from the data module's
    state (any top-level entry holding :data:`TOKENIZER_KEY`), or the first format's place."""
    for value in checkpoint.values():
        if isinstance(value, dict) and value.get(TOKENIZER_KEY):
            return value[TOKENIZER_KEY]
    return (checkpoint.get(CHECKPOINT_KEY) or {}).get("tokenizer_json")


def read_tokenizer(checkpoint: dict) -> Any:
    """The checkpoint's tokenizer as a ``PreTrainedTokenizerFast`` (None if it holds none)."""
    from .data import tokenizer_from_json

    tokenizer_json = read_tokenizer_json(checkpoint)
    return tokenizer_from_json(tokenizer_json) if tokenizer_json else None


__all__ = [
    "CHECKPOINT_KEY",
    "TOKENIZER_KEY",
    "config_fields",
    "model_state",
    "data_state",
    "tokenizer_json_from_data_state",
    "read_config",
    "stored_config",
    "config_differences",
    "read_tokenizer_json",
    "read_tokenizer",
]
