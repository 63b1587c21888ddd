"""Generation through Hugging Face interfaces: model.generate, streamers, save/load, pipeline, generate.py."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ATTENTION_TYPES, tiny_model
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TextIteratorStreamer

from zeros_lm import ZeroSCache, ZeroSForCausalLM

REPO = Path(__file__).resolve().parents[1]
GENERATE_PY = REPO / "generate.py"


def _prompts(lengths=(7, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g) for n in lengths]


def _left_pad(prompts, pad_id=1):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# The cost of a decoded token
# ---------------------------------------------------------------------------------------------

# Measured 2026-12-05 (torch 2.13, CPU): the aten ops (views included) that one decoded token dispatches in
# a non-first ZeroS layer, cache read and update included (117 in benchmarks/generation.py's model before a
# profiler range stopped being entered with no profiler and casts to the dtype a tensor already had stopped
# being dispatched; 93 here after, 87 since the step and the logits lost a few scalar ops and a decoded token
# skips the recurrent loop). At batch 1 each op costs about as much as reading its operands (a few
# microseconds), so this count is most of what a ZeroS layer adds to a softmax layer's decode step
# (docs/serving.md). Lower it as the step gets leaner; never raise it.
ZEROS_DECODE_OPS_BOUND = 87


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_decoded_token_of_a_zeros_layer_stays_within_its_op_bound():
    model = tiny_model("zeros")
    layer = model.model.layers[1].attn
    counter = _AtenOps()
    forward = layer.forward

    def counted(*args, **kwargs):
        with counter:
            return forward(*args, **kwargs)

    cache = ZeroSCache(model.config)
    with torch.inference_mode():
        model(_prompts((6,))[0][None], cache=cache, use_cache=True)
        layer.forward = counted
        model(torch.tensor([[5]]), cache=cache, use_cache=True)
    assert counter.names, "the layer's forward was not counted"
    assert len(counter.names) <= ZEROS_DECODE_OPS_BOUND, " ".join(counter.names)
    assert "_record_function_enter_new" not in counter.names  # no profiler range without a profiler


# ---------------------------------------------------------------------------------------------
# model.generate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_greedy_with_cache_equals_without(attention_type):
    model = tiny_model(attention_type)
    ids = _prompts((9,))[0][None]
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (1, 21)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, 9:].tolist())) > 1  # not a degenerate constant stream


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_seeded_sampling_with_cache_equals_without(attention_type):
    model = tiny_model(attention_type)
    ids = _prompts((6,))[0][None].repeat(2, 1)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=1.3)
    torch.manual_seed(123)
    with_cache = model.generate(ids, use_cache=True, **kw)
    torch.manual_seed(123)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    assert not torch.equal(with_cache[0], with_cache[1])  # the rows really sampled


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_left_padded_batch_equals_each_prompt_alone(attention_type):
    model = tiny_model(attention_type)
    prompts = _prompts((8, 3, 5))
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=1)
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(p) :]), f"row {i}"


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_prefill_in_chunks_through_generate(attention_type):
    """generate(prefill_chunk_size=...) with a ZeroSCache: the prompt goes in a few tokens at a time."""
    model = tiny_model(attention_type)
    ids, mask = _left_pad(_prompts((11, 6)))
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    whole = model.generate(ids, **kw)
    cache = ZeroSCache(model.config)
    chunked = model.generate(ids, cache=cache, prefill_chunk_size=4, **kw)
    assert torch.equal(whole, chunked)
    assert cache.get_seq_length() == ids.shape[1] + 5  # the last token is generated, not yet consumed


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_generate_scores_equal_full_forward_logits(attention_type):
    """The logits of every decode step equal those of a full forward over the sequence (float32, 1e-4)."""
    model = tiny_model(attention_type)
    ids, mask = _left_pad(_prompts((6, 4)))
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out.cache, ZeroSCache)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask).logits
    steps = torch.stack(out.logits, dim=1)  # (B, 6, V): predictions for positions width-1 .. width+4
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_beam_search_and_num_return_sequences(attention_type):
    model = tiny_model(attention_type)
    ids, mask = _left_pad(_prompts((5, 3)))
    beams = model.generate(
        ids,
        attention_mask=mask,
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=1,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert beams.sequences.shape[0] == 4
    # beam scores must be those of a fresh forward over each returned sequence (reorder_cache is right)
    with torch.no_grad():
        for row, score in zip(beams.sequences, beams.sequences_scores):
            prompt_row = row[: ids.shape[1]]
            real = prompt_row[prompt_row != 1]
            gen = row[ids.shape[1] :]
            gen = gen[gen != 1]
            seq = torch.cat([real, gen])[None]
            logp = model(seq).logits.log_softmax(-1)[0, len(real) - 1 : -1]
            total = logp.gather(-1, gen[:, None]).sum()
            torch.testing.assert_close(score, total / len(gen), atol=1e-4, rtol=0)  # length_penalty 1.0
    # the two beams returned per prompt: distinct, best first, each continuing its own prompt
    scores = beams.sequences_scores.view(2, 2)
    for i in range(2):
        a, b = beams.sequences[2 * i : 2 * i + 2]
        assert torch.equal(a[: ids.shape[1]], ids[i]) and torch.equal(b[: ids.shape[1]], ids[i])
        assert not torch.equal(a, b) and scores[i, 0] >= scores[i, 1]

    kw = dict(do_sample=True, max_new_tokens=5, min_new_tokens=5, pad_token_id=1)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, num_return_sequences=3, **kw)
    assert sampled.shape == (6, ids.shape[1] + 5)
    for i in range(2):  # three rows per prompt, in order: each continues that prompt, and they differ
        rows = sampled[3 * i : 3 * i + 3]
        assert all(torch.equal(row[: ids.shape[1]], ids[i]) for row in rows)
        assert len({tuple(row[ids.shape[1] :].tolist()) for row in rows}) == 3
    # the same as sampling a batch with each prompt repeated three times, with the same seed
    torch.manual_seed(0)
    repeated = model.generate(ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0), **kw)
    assert torch.equal(sampled, repeated)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_text_iterator_streamer_yields_the_same_text(attention_type, tiny_tokenizer):
    model = tiny_model(attention_type)
    enc = tiny_tokenizer("def wrap(text, width=70):", return_tensors="pt")
    kw = dict(max_new_tokens=15, min_new_tokens=15, do_sample=False)
    reference = model.generate(**enc, **kw)
    expected = tiny_tokenizer.decode(reference[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tiny_tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**enc, **kw, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected
    assert len(pieces) > 1


def test_continuing_from_a_returned_cache_equals_one_long_generation():
    """What generate.py --interactive does: keep the cache, feed only the new tokens."""
    model = tiny_model("zeros")
    first, second = _prompts((6, 4))
    cache = ZeroSCache(model.config)
    out1 = model.generate(first[None], cache=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    # the last generated token has not been through the model yet: it leads the next turn
    turn2 = torch.cat([out1[:, -1:], second[None]], dim=1)
    out2 = model.generate(
        turn2,
        cache=cache,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        attention_mask=torch.ones(1, out1.shape[1] + second.numel(), dtype=torch.long),
    )
    history = torch.cat([out1, second[None]], dim=1)
    reference = model.generate(history, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out2[:, turn2.shape[1] :], reference[:, history.shape[1] :])


# ---------------------------------------------------------------------------------------------
# Save / load / pipeline
# ---------------------------------------------------------------------------------------------

_LOAD_AND_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for path, out_file in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(path, {kwargs})
    assert type(model).__name__ == "ZeroSForCausalLM", type(model)
    print("MODULE", type(model).__module__)
    with torch.no_grad():
        torch.save(model(ids).logits, out_file)
"""

# Makes zeros_lm unimportable even where it is pip-installed (editable or not), then checks it is.
_BLOCK_ZEROS_LM = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "zeros_lm" or name.startswith("zeros_lm."):
            raise ModuleNotFoundError("zeros_lm is blocked in this test", name=name)
sys.meta_path.insert(0, _Block())
try:
    import zeros_lm
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("zeros_lm must not be importable here")
"""


def test_save_pretrained_round_trip_in_fresh_processes(saved_models, tmp_path, clean_env):
    """(a) after import zeros_lm, (b) with zeros_lm unimportable, via trust_remote_code: identical logits."""
    ids = torch.randint(2, 320, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    expected = {}
    for attention_type, path in saved_models.items():
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "modeling_zeros.py", "configuration_zeros.py", "ops.py"} <= files
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "zeros" and config["attention_type"] == attention_type
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_zeros.ZeroSForCausalLM"
        assert config["auto_map"]["AutoConfig"] == "configuration_zeros.ZeroSConfig"
        model = ZeroSForCausalLM.from_pretrained(path)
        stored = load_file(path / "model.safetensors")
        loaded = model.state_dict()
        for key, tensor in stored.items():  # every stored tensor was loaded, not re-initialised
            assert torch.equal(loaded[key], tensor), key
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == (attention_type == "softmax")
        with torch.no_grad():
            expected[attention_type] = model(ids).logits

    runs = {
        # (a) a plain process in the repository, which imports zeros_lm first
        "registered": ([sys.executable, "-c", "import zeros_lm\n" + _LOAD_AND_RUN.format(kwargs="")], REPO),
        # (b) isolated mode (-I: neither the cwd nor PYTHON* variables), outside the repository, zeros_lm blocked
        "remote_code": (
            [sys.executable, "-I", "-c", _BLOCK_ZEROS_LM + _LOAD_AND_RUN.format(kwargs="trust_remote_code=True")],
            tmp_path,
        ),
    }
    for name, (cmd, cwd) in runs.items():
        outs = {t: tmp_path / f"{t}-{name}.pt" for t in saved_models}
        args = [str(tmp_path / "ids.pt")] + [str(x) for t in saved_models for x in (saved_models[t], outs[t])]
        res = subprocess.run(cmd + args, cwd=cwd, env=clean_env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{name}:\n{res.stdout}\n{res.stderr}"
        modules = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("MODULE")]
        assert len(modules) == len(saved_models)
        for module in modules:
            if name == "registered":
                assert module == "zeros_lm.modeling_zeros"
            else:
                assert module.startswith("transformers_modules.") and module.endswith("modeling_zeros")
        for attention_type, out_file in outs.items():
            torch.testing.assert_close(torch.load(out_file), expected[attention_type], atol=1e-5, rtol=0)


def test_pipeline_and_auto_tokenizer_load_from_the_directory(saved_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = saved_models["zeros"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    text = "return text.strip()"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, ZeroSForCausalLM)

    generator = pipeline("text-generation", model=str(path), device="cpu")
    out = generator("def fill(text, width):", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("def fill(text, width):")
    expected = model.generate(
        **tokenizer("def fill(text, width):", return_tensors="pt"), max_new_tokens=8, do_sample=False
    )
    assert out[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# generate.py
# ---------------------------------------------------------------------------------------------


def _cli(args, env, stdin=None, timeout=300):
    """Run generate.py; stdout/stderr decoded without newline translation (a random model may emit \\r)."""
    res = subprocess.run(
        [sys.executable, str(GENERATE_PY), *map(str, args)],
        input=None if stdin is None else stdin.encode(),
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    res.stdout = res.stdout.decode("utf-8", errors="replace")
    res.stderr = res.stderr.decode("utf-8", errors="replace")
    return res


def test_generate_cli_streams_the_same_text_as_generate(saved_models, tiny_tokenizer, clean_env, tmp_path):
    path = saved_models["zeros"]
    prompt = "def shorten(text, width, **kwargs):"
    model = ZeroSForCausalLM.from_pretrained(path)
    enc = tiny_tokenizer(prompt, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)
    expected = tiny_tokenizer.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)

    res = _cli([path, "--prompt", prompt, "--max-new-tokens", 12, "--greedy", "--stats"], clean_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert "tokens/s" in res.stderr and "prompt" in res.stderr and "cache" in res.stderr
    prompt_tokens = enc.input_ids.shape[1]
    assert f"prompt: {prompt_tokens} tokens" in res.stderr

    # the same prompt from a file and from stdin; sampling with a seed is reproducible
    (tmp_path / "prompt.txt").write_text(prompt)
    sample = [
        "--max-new-tokens",
        10,
        "--seed",
        7,
        "--temperature",
        0.9,
        "--top-k",
        40,
        "--top-p",
        0.9,
        "--repetition-penalty",
        1.1,
    ]
    from_file = _cli([path, "--prompt-file", tmp_path / "prompt.txt", *sample], clean_env)
    from_stdin = _cli([path, *sample], clean_env, stdin=prompt)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout and from_file.stdout.strip()


@pytest.mark.parametrize("attention_type", ["zeros", "softmax"])
def test_generate_cli_interactive_keeps_the_state(saved_models, tiny_tokenizer, clean_env, attention_type):
    """Two turns through --interactive equal one generate() over the whole history."""
    path = saved_models[attention_type]
    turns = ["class TextWrapper:", "def fill(self, text):"]
    res = _cli(
        [path, "--interactive", "--greedy", "--max-new-tokens", 6, "--stats", "--prefill-chunk-size", 3],
        clean_env,
        stdin="\n".join(turns) + "\n",
    )
    assert res.returncode == 0, res.stderr
    model = ZeroSForCausalLM.from_pretrained(path)
    history = torch.empty(1, 0, dtype=torch.long)
    replies = []
    for turn in turns:
        ids = tiny_tokenizer(turn + "\n", return_tensors="pt").input_ids
        history = torch.cat([history, ids], dim=1)
        out = model.generate(history, max_new_tokens=6, do_sample=False)
        replies.append(tiny_tokenizer.decode(out[0, history.shape[1] :], skip_special_tokens=True))
        history = out
    assert res.stdout == "".join(reply + "\n" for reply in replies)
    assert res.stderr.count("cache:") == 2  # --stats: one line per turn


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_dir", "does not exist"),
        ("not_a_model_dir", "no config.json"),
        ("other_model_type", "model_type 'gpt2'"),
        ("empty_prompt", "empty prompt"),
        ("zero_tokens", "--max-new-tokens must be a positive integer"),
        ("negative_tokens", "--max-new-tokens must be a positive integer"),
        ("bad_top_p", "--top-p"),
        ("no_weights", "could not load"),
    ],
)
def test_generate_cli_errors(case, expected, saved_models, tmp_path, clean_env):
    good = saved_models["zeros"]
    args = {
        "missing_dir": [tmp_path / "nope", "--prompt", "x"],
        "not_a_model_dir": [tmp_path, "--prompt", "x"],
        "other_model_type": [tmp_path / "gpt2", "--prompt", "x"],
        "empty_prompt": [good, "--prompt", "   "],
        "zero_tokens": [good, "--prompt", "x", "--max-new-tokens", 0],
        "negative_tokens": [good, "--prompt", "x", "--max-new-tokens", -3],
        "bad_top_p": [good, "--prompt", "x", "--top-p", 1.5],
        "no_weights": [tmp_path / "noweights", "--prompt", "x"],
    }[case]
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((good / "config.json").read_text())
    res = _cli(args, clean_env, stdin="")
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], res.stderr


def test_generate_cli_help():
    res = subprocess.run([sys.executable, str(GENERATE_PY), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in (
        "--prompt",
        "--prompt-file",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--repetition-penalty",
        "--seed",
        "--greedy",
        "--interactive",
        "--stats",
    ):
        assert flag in res.stdout


def test_generation_benchmark_runs(capsys):
    """benchmarks/generation.py at toy contexts: it prints the markdown table and the target lines."""
    from benchmarks import generation as bench

    assert bench.main(["--contexts", "8", "24", "--steps", "2", "--warmup", "1", "--prefill-chunk", "16"]) == 0
    out = capsys.readouterr().out
    assert "| context | zeros ms/token | zeros cache | softmax ms/token | softmax cache |" in out
    assert "| 24 |" in out and "ZeroS cache, largest" in out
