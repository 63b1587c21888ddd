"""Shared fixtures: tiny models of the three attention types, a tiny tokenizer, saved model directories."""

import os
import pathlib
import sysconfig

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported (transformers imports it through
# torch._dynamo): without a GPU the fused kernels' tests need its CPU interpreter, so set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ATTENTION_TYPES = ("zeros", "softmax", "linear")
TOKENIZER_VOCAB = 320
EOS, PAD = "<|endoftext|>", "<|pad|>"


def tiny_config(attention_type="zeros", **overrides):
    """A model small enough for CPU tests; chunk_size 4 so that prompts span several chunks.

    Untied embeddings: a random model with a tied head mostly repeats its last input token, which
    would make the generation tests weak.
    """
    from zeros_lm import ZeroSConfig

    kwargs = dict(
        vocab_size=TOKENIZER_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        chunk_size=4,
        attention_type=attention_type,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return ZeroSConfig(**kwargs)


def tiny_model(attention_type="zeros", seed=0, **overrides):
    from zeros_lm import ZeroSForCausalLM

    torch.manual_seed(seed)
    return ZeroSForCausalLM(tiny_config(attention_type, **overrides)).eval()


def _corpus() -> str:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py"))


def build_tiny_tokenizer():
    """A ByteLevel BPE trained here (offline), wrapped as a transformers fast tokenizer.

    Special tokens: id 0 = <|endoftext|> (eos), id 1 = <|pad|>, matching tiny_config().
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    assert tok.get_vocab_size() <= TOKENIZER_VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    assert fast.eos_token_id == 0 and fast.pad_token_id == 1
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tiny_tokenizer):
    """{attention_type: directory} with save_pretrained weights + tokenizer for each attention type.

    The softmax one has tied embeddings, so that the round trip of tied weights is covered too. The
    parameters that start as constants (norm weights, gate biases, mu, log tau) are randomised, so
    that a loader which re-initialised them instead of loading them would be caught.
    """
    root = tmp_path_factory.mktemp("saved")
    dirs = {}
    for attention_type in ATTENTION_TYPES:
        path = root / attention_type
        model = tiny_model(attention_type, seed=1, tie_word_embeddings=attention_type == "softmax")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("norm.weight", "gate_proj.bias", ".mu", ".log_tau")):
                    param.add_(0.3 * torch.randn_like(param))
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[attention_type] = path
    return dirs


@pytest.fixture
def clean_env(tmp_path):
    """Environment for subprocesses: offline, a private HF cache, no stray PYTHON* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env
