"""generate.py's options, run in-process: each sampling option reaches model.generate, --dtype loads
the weights in that dtype, text is streamed while the model is still generating, and --interactive
feeds every token through the model once (the state is kept, the history is not re-read)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import AutoTokenizer, GenerationConfig

from zeros_lm import ZeroSCache, ZeroSForCausalLM
from zeros_lm.cli import generate as cli  # what generate.py and zeros-lm generate run

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def wrap(text, width=70, **kwargs):"
LOGIT_SCALE = 40.0  # sharpens the random model's next-token distribution, so every option matters


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny ZeroS model whose logits span a few units (not the near-uniform ones of a fresh init)."""
    path = tmp_path_factory.mktemp("peaked")
    model = tiny_model("zeros", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
        model.lm_head.weight[model.config.eos_token_id].zero_()  # no early stop: every run has text
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    # what the export writes: sampling by default, so each option has a default to differ from
    GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=200,
                     eos_token_id=0, pad_token_id=1).save_pretrained(path)
    return path


def run_cli(args, capsys, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def reference(path: Path, max_new_tokens: int, seed: int | None = None, dtype=torch.float32, **options) -> str:
    """model.generate on PROMPT with these options (the model's generation_config for the rest)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = ZeroSForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    if seed is not None:
        transformers.set_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=ZeroSCache(model.config),
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **options)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


BASE = ["--prompt", PROMPT, "--max-new-tokens", 16, "--seed", 5]


@pytest.mark.parametrize(
    "option, kwargs",
    [
        (["--temperature", 3.0], dict(temperature=3.0)),
        (["--top-k", 2], dict(top_k=2)),
        (["--top-p", 0.3], dict(top_p=0.3)),
        (["--repetition-penalty", 3.0], dict(repetition_penalty=3.0)),
    ],
    ids=lambda o: o[0] if isinstance(o, list) else "",
)
def test_each_sampling_option_reaches_generate(option, kwargs, model_dir, capsys):
    """The CLI's text equals model.generate's with the same option and seed, and the option matters
    (generate without it gives other text), so an option the CLI dropped would be caught."""
    expected = reference(model_dir, 16, seed=5, **kwargs)
    assert expected != reference(model_dir, 16, seed=5), "the option must change the output for this check to bite"
    assert run_cli([model_dir, *BASE, *option], capsys) == expected + "\n"


def test_dtype_loads_the_weights_in_that_dtype(model_dir, capsys, monkeypatch):
    seen = []
    forward = ZeroSForCausalLM.forward

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ZeroSForCausalLM, "forward", spy)
    out = run_cli([model_dir, "--prompt", PROMPT, "--max-new-tokens", 8, "--greedy", "--dtype", "bfloat16"], capsys)
    assert seen and set(seen) == {torch.bfloat16}
    monkeypatch.undo()
    assert out == reference(model_dir, 8, dtype=torch.bfloat16, do_sample=False) + "\n"


def test_text_is_streamed_while_generating(model_dir, capsys, monkeypatch):
    """Each piece of text written to stdout is stamped with the number of model forwards done by
    then: text must arrive after the first tokens, long before the last forward."""
    forwards = {"n": 0}
    pieces = []
    forward = ZeroSForCausalLM.forward

    def counting(self, *args, **kwargs):
        forwards["n"] += 1
        return forward(self, *args, **kwargs)

    class Recorder(io.StringIO):
        def write(self, text):
            if text:
                pieces.append((forwards["n"], text))
            return super().write(text)

    monkeypatch.setattr(ZeroSForCausalLM, "forward", counting)
    monkeypatch.setattr(sys, "stdout", Recorder())
    code = cli.main([str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "24", "--greedy"])
    monkeypatch.undo()
    assert code == 0
    total = forwards["n"]
    text = [(n, t) for n, t in pieces if t.strip()]
    assert total >= 24 and text
    assert text[0][0] <= total // 2  # the first words came out in the first half of the generation
    assert len({n for n, _ in text}) >= 3  # and more kept coming as it went on
    assert "".join(t for _, t in pieces) == reference(model_dir, 24, do_sample=False) + "\n"


def test_interactive_feeds_each_token_through_the_model_once(model_dir, capsys, monkeypatch):
    """Three turns: the model sees only each turn's new tokens (and the one token generated last),
    never the history again: tokens through forward = conversation length - 1."""
    widths = []
    forward = ZeroSForCausalLM.forward

    def spy(self, input_ids=None, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(ZeroSForCausalLM, "forward", spy)
    turns = ["class TextWrapper:", "def fill(self, text):", "return text"]
    new_tokens = 5
    out = run_cli([model_dir, "--interactive", "--greedy", "--max-new-tokens", new_tokens], capsys,
                  stdin="\n".join(turns) + "\n", monkeypatch=monkeypatch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    conversation = sum(len(tok(t + "\n").input_ids) for t in turns) + new_tokens * len(turns)
    assert sum(widths) == conversation - 1
    assert out.count("\n") == len(turns)
