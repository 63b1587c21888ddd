"""The tokenizer: a byte-level BPE trained on the corpus (``<|endoftext|>`` separates documents,
``<|pad|>`` pads), or any fast Hugging Face tokenizer loaded from a directory."""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Optional

from .errors import DataError
from .sources import describe_value

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# A byte-level BPE starts from the 256 byte symbols; the special tokens come on top.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000_000,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_from_json(tokenizer_json: str):
    """A ``PreTrainedTokenizerFast`` from a serialized ``tokenizers.Tokenizer`` (as stored in our
    checkpoints)."""
    from tokenizers import Tokenizer

    return _wrap_tokenizer(Tokenizer.from_str(tokenizer_json))


# The data module's state in a checkpoint (Lightning saves ``TextDataModule.state_dict()``): the
# tokenizer, serialized, so that an export of the checkpoint ships it (read back by
# :func:`zeros_lm.checkpoint.read_tokenizer`).
TOKENIZER_KEY = "zeros_lm_tokenizer_json"


def data_state(tokenizer) -> dict:
    """The data module's ``state_dict()``: its tokenizer (what an export of the checkpoint ships)."""
    return {TOKENIZER_KEY: tokenizer.backend_tokenizer.to_str() if tokenizer is not None else None}


def tokenizer_json_from_data_state(state: dict) -> Optional[str]:
    return state.get(TOKENIZER_KEY)


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"tokenizer_vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} entries (256 bytes + {len(SPECIAL_TOKENS)} special tokens); 4096 or more is usual"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: Optional[int] = None):
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens ``<|endoftext|>`` and
    ``<|pad|>`` included) and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _wrap_tokenizer(tok)


def load_tokenizer(path: str):
    """Load a tokenizer from a directory (ours or any fast HF tokenizer). It needs an EOS token;
    a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory not found: {path!r}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load a tokenizer from {path!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer in {path!r} is not a fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {path!r} has no EOS token; documents are separated by EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if len(tok) < MIN_VOCAB_SIZE:
        raise DataError(f"the tokenizer in {path!r} has only {len(tok)} entries; at least {MIN_VOCAB_SIZE} are needed")
    return tok


def check_texts(texts: Iterable[Any]) -> None:
    """Raise :class:`DataError` for a text that is neither a string nor null (files are checked row by
    row when they are loaded; this catches what streams in from elsewhere)."""
    for t in texts:
        if t is not None and not isinstance(t, str):
            raise DataError(f"the text column holds {describe_value(t)}, not a string; set --data.text_column")


def text_sample(ds, max_chars: int, batch: int = 256) -> Iterator[list[str]]:
    """Batches of document texts from ``ds`` (map-style or iterable) up to about ``max_chars``."""
    total = 0
    if hasattr(ds, "__len__"):
        for start in range(0, len(ds), batch):
            texts = ds[start : start + batch]["text"]
            check_texts(texts)
            texts = [t for t in texts if t]
            yield texts
            total += sum(len(t) for t in texts)
            if total >= max_chars:
                return
    else:
        buf = []
        for row in ds:
            t = row["text"]
            check_texts([t])
            if t:
                buf.append(t)
                total += len(t)
            if len(buf) >= batch:
                yield buf
                buf = []
            if total >= max_chars:
                break
        if buf:
            yield buf


def train_tokenizer_on(ds, vocab_size: int, max_chars: int):
    """:func:`train_tokenizer` on about the first ``max_chars`` characters of the documents ``ds``."""
    sample = (t for batch in text_sample(ds, max_chars) for t in batch)
    return train_tokenizer(sample, vocab_size)


__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "MIN_VOCAB_SIZE",
    "tokenizer_from_json",
    "TOKENIZER_KEY",
    "data_state",
    "tokenizer_json_from_data_state",
    "check_vocab_size",
    "train_tokenizer",
    "load_tokenizer",
    "check_texts",
    "text_sample",
    "train_tokenizer_on",
]
