"""zeros-lm linearize: weight mapping, the converted layers' initialisation, the two stages, the command.

Teachers are built here: tiny random Llama models (transformers' own LlamaForCausalLM) and this
framework's tiny softmax model; nothing is downloaded.
"""

import json

import pytest
import torch
from conftest import TOKENIZER_VOCAB, tiny_model

from zeros_lm import ZeroSForCausalLM
from zeros_lm.linearize import (
    DistillLitModule,
    LinearizeError,
    LowRankAdapters,
    TransferLitModule,
    choose_softmax_layers,
    convert,
    load_teacher,
    relative_mse,
    revert_to_softmax,
    student_config,
    teacher_spec,
    transfer_errors,
)


def llama_teacher(seed=0, sharpen=1.0, **overrides):
    """A tiny random Llama. ``sharpen`` scales q and k: random attention is nearly uniform, a trained
    model's is not; a sharper one is the fairer test of how near a converted layer starts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=96, rope_theta=500.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model.requires_grad_(False)


def tokens(seed, shape=(2, 48)):
    return torch.randint(2, TOKENIZER_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("llama")
    llama_teacher(seed=3, sharpen=3.0, initializer_range=0.1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# -- weight mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("tied, kv_heads", [(False, 4), (True, 2)])
def test_every_layer_softmax_reproduces_the_llama_teacher(tied, kv_heads):
    teacher = llama_teacher(tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    student = convert(teacher, softmax_layers=range(3))
    assert student.config.mixer_types == ("softmax",) * 3
    assert student.config.rms_norm_eps == 1e-5 and student.config.rope_theta == 500.0
    ids = tokens(0)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_every_layer_softmax_reproduces_a_zeros_lm_softmax_teacher():
    teacher = tiny_model("softmax", seed=2).requires_grad_(False)
    student = convert(teacher, softmax_layers=range(teacher.config.num_hidden_layers))
    ids = tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, use_cache=False).logits,
                                   teacher(input_ids=ids, use_cache=False).logits, atol=1e-6, rtol=0)


def test_a_hybrid_keeps_its_softmax_layers_and_the_mlps_exactly():
    teacher = llama_teacher()
    student = convert(teacher, softmax_layers=[1])
    assert student.config.mixer_types == ("zeros", "softmax", "zeros")
    t, s = teacher.model.layers, student.model.layers
    assert torch.equal(s[1].attn.qkv_proj.weight, torch.cat([t[1].self_attn.q_proj.weight, t[1].self_attn.k_proj.weight,
                                                             t[1].self_attn.v_proj.weight]))
    for i in range(3):
        assert torch.equal(s[i].mlp.gate_up_proj.weight, torch.cat([t[i].mlp.gate_proj.weight, t[i].mlp.up_proj.weight]))
        assert torch.equal(s[i].mlp_norm.weight, t[i].post_attention_layernorm.weight)
    # q, k, v are the teacher's; u starts as the key
    q, k, v, u = s[0].attn.qkvu_proj.weight.chunk(4)
    assert torch.equal(q, t[0].self_attn.q_proj.weight) and torch.equal(v, t[0].self_attn.v_proj.weight)
    assert torch.equal(u, k) and torch.equal(k, t[0].self_attn.k_proj.weight)


def test_grouped_kv_heads_and_a_free_head_dim_map_onto_the_students_own():
    """A GQA teacher whose head_dim is not hidden / heads: the student has the same K/V heads (not repeated)
    and head dimension, its softmax layers reproduce the teacher, and its ZeroS layers keep one state per
    K/V head."""
    teacher = llama_teacher(num_key_value_heads=2, head_dim=24)  # 4 heads x 24 = 96 != hidden 64
    exact = convert(teacher, softmax_layers=range(3))
    ids = tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(exact(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    student = convert(teacher, softmax_layers=[2], calibration_ids=tokens(7))
    assert (student.config.num_key_value_heads, student.config.head_dim) == (2, 24)
    attn, t = student.model.layers[0].attn, teacher.model.layers[0].self_attn
    q, k, v, u = attn.qkvu_proj.weight.split(attn.qkvu_sizes)
    assert torch.equal(k, t.k_proj.weight) and torch.equal(v, t.v_proj.weight) and torch.equal(u, k)
    assert attn.mu.shape == (2, 24)
    with torch.no_grad():
        cache = student(input_ids=ids, use_cache=True).cache
    assert cache.layer_states[0].core.kv.shape[1] == 2 and cache.layer_states[2].keys.shape[1] == 2


# -- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_converted_layer_starts_nearer_its_teacher_than_a_random_one(kv_heads):
    teacher = llama_teacher(seed=0, sharpen=3.0, initializer_range=0.1, num_key_value_heads=kv_heads)
    calibration, held_out = tokens(10, (4, 64)), tokens(11, (4, 64))
    converted = convert(teacher, calibration_ids=calibration)
    torch.manual_seed(1)
    random_layers = ZeroSForCausalLM(student_config(teacher_spec(teacher))).eval()
    copied_only = convert(teacher)  # q, k, v, o copied, no calibration: the output scale is not fitted
    errors = transfer_errors(teacher, converted, [held_out])
    random_errors = transfer_errors(teacher, random_layers, [held_out])
    for i in range(3):
        assert errors[i] < 0.95, errors  # 1 = no better than an output of zeros
        assert errors[i] < random_errors[i] - 0.05, (errors, random_errors)
    assert sum(errors.values()) < sum(transfer_errors(teacher, copied_only, [held_out]).values())


def test_keep_softmax_picks_the_worst_layers_and_reverting_restores_them():
    assert choose_softmax_layers({0: 0.2, 1: 0.9, 2: 0.5, 3: 0.9}, 2) == [1, 3]
    assert choose_softmax_layers({0: 0.2, 1: 0.9}, 1, given=[0]) == [0, 1]
    teacher = llama_teacher()
    student = convert(teacher, calibration_ids=tokens(3))
    reverted = revert_to_softmax(teacher, student, [0, 1, 2])
    ids = tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(reverted(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    partly = revert_to_softmax(teacher, student, [2])
    assert partly.config.mixer_types == ("zeros", "zeros", "softmax")
    assert torch.equal(partly.model.layers[0].attn.qkvu_proj.weight, student.model.layers[0].attn.qkvu_proj.weight)


# -- the two stages ---------------------------------------------------------------------------------


def _student_dir(tmp_path, teacher_dir, softmax_layers=()):
    teacher, tokenizer = load_teacher(teacher_dir)
    student = convert(teacher, softmax_layers, calibration_ids=tokens(5))
    path = tmp_path / "student"
    student.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _train(module, batch, steps, lr):
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _quiet_log(module):
    module.log = lambda *args, **kwargs: None
    return module


def test_stage1_trains_only_the_converted_mixers_and_lowers_the_transfer_error(tmp_path, llama_dir):
    module = _quiet_log(TransferLitModule(str(llama_dir), str(_student_dir(tmp_path, llama_dir, [1]))))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.model.layers.0.attn.", "model.model.layers.2.attn."))
                             for name in trainable), trainable
    assert not any(name.startswith("teacher") for name, _ in module.named_parameters())
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    losses = _train(module, tokens(6, (2, 33)), steps=15, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)


def test_stage2_lowers_the_kl_and_low_rank_adapters_merge_exactly(tmp_path, llama_dir):
    module = _quiet_log(DistillLitModule(str(llama_dir), str(_student_dir(tmp_path, llama_dir)), trainable="lora",
                                         lora_rank=4))
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if n.endswith("proj.weight"))
    batch = tokens(7, (4, 33))
    losses = _train(module, batch, steps=20, lr=3e-3)
    assert losses[-1] < 0.9 * losses[0], losses
    ids = batch[:, :-1]
    with torch.no_grad():
        before = module.model(input_ids=ids, use_cache=False).logits
        merged = module.merged_model()
        torch.testing.assert_close(merged(input_ids=ids, use_cache=False).logits, before, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(ZeroSForCausalLM(merged.config).state_dict())


def test_low_rank_adapters_start_as_the_model():
    model = tiny_model("zeros")
    ids = tokens(8, (1, 12))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        LowRankAdapters(model, ["model.layers.0.attn.o_proj"], rank=2)
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, reference)


def test_relative_mse_is_scale_free():
    t = torch.randn(2, 5, 8)
    assert float(relative_mse(torch.zeros_like(t), t)) == pytest.approx(1.0)
    assert float(relative_mse(3 * t, 3 * t)) == 0.0
    assert float(relative_mse(10 * (t + 0.1), 10 * t)) == pytest.approx(float(relative_mse(t + 0.1, t)), rel=1e-5)


# -- the command ------------------------------------------------------------------------------------


def _cli(argv):
    from zeros_lm.cli import main

    return main(["linearize", *argv])


@pytest.mark.parametrize("batch_size", [1, 3, 8, 40])
def test_the_command_evaluates_the_same_blocks_whatever_the_batch_size(batch_size):
    """Held-out perplexities, transfer errors (which --keep-softmax chooses by) and the init's calibration read a
    fixed number of validation blocks: the same blocks, in order, at any --data.batch_size."""
    from zeros_lm.cli.linearize import CALIBRATION_BLOCKS, EVAL_BLOCKS, _blocks

    blocks = torch.arange(50 * 3).view(50, 3)
    loader = list(blocks.split(batch_size))
    val = _blocks(loader, EVAL_BLOCKS)
    assert torch.equal(torch.cat(val), blocks[:EVAL_BLOCKS])
    assert all(len(b) <= batch_size for b in val)
    assert torch.equal(torch.cat(val)[:CALIBRATION_BLOCKS], blocks[:CALIBRATION_BLOCKS])
    assert torch.equal(torch.cat(_blocks(list(blocks[:10].split(batch_size)), EVAL_BLOCKS)), blocks[:10])  # fewer: all


def test_the_command_writes_a_directory_that_loads_and_generates(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    status = _cli([str(llama_dir), "--out", str(out), "--tokens", "256", "--keep-softmax", "1",
                   "--data.train_files", "stdlib:json", "--data.seq_len", "16", "--data.batch_size", "2",
                   "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"])
    assert status == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    record = json.loads((out / "config.json").read_text())["linearized_from"]
    assert record["teacher"] == str(llama_dir) and record["tokens"] == 256 and len(record["softmax_layers"]) == 1
    assert set(record["transfer_error"]) == {"0", "1", "2"}
    assert model.config.mixer_types.count("softmax") == 1
    assert (out / "generation_config.json").is_file()
    ids = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert (tmp_path / "out.work" / "stage2" / "checkpoints" / "last.ckpt").exists()
    # a second run into the same place is refused (one line, exit 2), nothing lost
    assert _cli([str(llama_dir), "--out", str(out)]) == 2
    assert (out / "model.safetensors").is_file()


def test_bad_teachers_are_one_line_errors(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert _cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: teacher") and "does not exist" in err and "\n" not in err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    capsys.readouterr()
    assert _cli([str(gpt2), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unsupported teacher architecture 'gpt2'") and "\n" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(LinearizeError, match="softmax attention in every layer"):
        teacher_spec(tiny_model("zeros"))


# -- the evidence script's recall probe ------------------------------------------------------------


class _Lookup(torch.nn.Module):
    """A causal LM that knows the answers: at every position it predicts the token that followed the
    current token's previous occurrence (an ideal induction head), or token 0 if it has none."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        for b in range(batch):
            seen = {}
            for t in range(length - 1):
                token = int(input_ids[b, t])
                logits[b, t, seen.get(token, 0)] = 1.0
                seen[token] = int(input_ids[b, t + 1])  # known from position t + 1 on: causal
        return SimpleNamespace(logits=logits)


class _Constant(_Lookup):
    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., int(self.constant)] = 1.0
        return SimpleNamespace(logits=logits)


def test_the_recall_probe_scores_a_model_that_knows_the_answers_1_and_a_constant_one_chance(tiny_tokenizer):
    from benchmarks.linearize import recall_probe, recall_sequences, recall_token_ids

    keys, values = recall_token_ids(tiny_tokenizer, size=40)
    special = set(tiny_tokenizer.all_special_ids)
    assert len(set(keys.tolist()) | set(values.tolist())) == 80 and not special & set(keys.tolist() + values.tolist())
    ids, positions, answers = recall_sequences(keys, values, pairs=16, sequences=4, seed=1)
    assert ids.shape == (4, 64) and positions.shape == (16,) and answers.shape == (4, 16)
    assert torch.equal(ids[:, positions + 1], answers)  # the value follows its queried key
    again, _, _ = recall_sequences(keys, values, pairs=16, sequences=4, seed=1)
    assert torch.equal(ids, again)  # a fixed seed: every model sees the same sequences

    vocab = len(tiny_tokenizer)
    assert recall_probe(_Lookup(vocab), keys, values, (4, 16), sequences=6, batch=4) == {4: 1.0, 16: 1.0}
    constant = _Constant(vocab)
    constant.constant = values[0]
    scores = recall_probe(constant, keys, values, (16,), sequences=64, batch=16)
    assert abs(scores[16] - 1 / len(values)) < 0.02  # it is right only where the value happens to be values[0]
    constant.constant = keys[0]
    assert recall_probe(constant, keys, values, (16,), sequences=8)[16] == 0.0
