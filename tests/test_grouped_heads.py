"""Grouped K/V heads (``num_key_value_heads``) and a head dimension independent of hidden / heads
(``head_dim``): every mixer reads a prompt and streams token by token identically, the cache keeps one
state (ZeroS, linear) or one K/V cache (softmax) per K/V head, and a grouped model is exactly the
ungrouped model whose K/V heads (and ZeroS's u, mu, tau) are repeated over each group: sharing the
key-side state loses nothing."""

from __future__ import annotations

import pytest
import torch

from zeros_lm import ZeroSConfig, ZeroSForCausalLM
from zeros_lm.cache_zeros import ZeroSCache

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 6, 2, 10, 48  # head_dim * heads = 60 != hidden
GROUPS = HEADS // KV_HEADS


def grouped_config(attention_type="zeros", **overrides) -> ZeroSConfig:
    fields = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, attention_type=attention_type, chunk_size=8)
    fields.update(overrides)
    return ZeroSConfig(**fields)


def random_model(config: ZeroSConfig, seed: int = 0) -> ZeroSForCausalLM:
    torch.manual_seed(seed)
    model = ZeroSForCausalLM(config).double().eval()
    with torch.no_grad():  # non-trivial logit priors and gates
        for name, p in model.named_parameters():
            if name.endswith(("mu", "log_tau", "gate_proj.bias")):
                p.normal_(0.0, 0.5)
    return model


MIXERS = [
    pytest.param(dict(attention_type="zeros"), id="zeros"),
    pytest.param(dict(attention_type="zeros", conv_size=3, logit_type="norm"), id="zeros-conv-norm"),
    pytest.param(dict(attention_type="softmax"), id="softmax"),
    pytest.param(dict(attention_type="linear", conv_size=3), id="linear-conv"),
    pytest.param(dict(attention_type="zeros", softmax_every=2), id="hybrid"),
]


@pytest.mark.parametrize("overrides", MIXERS)
def test_prompt_then_stream_equals_one_pass_with_left_padding(overrides):
    model = random_model(grouped_config(**overrides))
    ids = torch.randint(0, 64, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    full = model(ids, attention_mask=mask, use_cache=False).logits
    out = model(ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(11, 19):
        logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("attention_type", ["zeros", "softmax", "linear"])
def test_the_cache_keeps_one_state_per_kv_head(attention_type):
    model = random_model(grouped_config(attention_type))
    cache = model(torch.randint(0, 64, (3, 13)), use_cache=True).cache
    for state in cache.layer_states:
        if attention_type == "zeros":
            assert state.core.kv.shape == (3, KV_HEADS, 3, HEAD_DIM, HEAD_DIM)
            assert state.core.E.shape == state.core.m.shape == state.core.n.shape == (3, KV_HEADS)
            assert state.u_sum.shape == (3, KV_HEADS, HEAD_DIM)
            assert state.core.kv.untyped_storage().nbytes() == state.core.kv.numel() * state.core.kv.element_size()
        elif attention_type == "softmax":
            assert state.keys.shape == state.values.shape == (3, KV_HEADS, 13, HEAD_DIM)
        else:
            assert state.kv_sum.shape == (3, KV_HEADS, HEAD_DIM, HEAD_DIM)
            assert state.k_sum.shape == (3, KV_HEADS, HEAD_DIM)


def test_the_zeros_state_shrinks_by_the_group_size():
    sizes = {}
    for kv_heads in (HEADS, KV_HEADS):
        model = random_model(grouped_config(num_key_value_heads=kv_heads))
        cache = model(torch.randint(0, 64, (1, 13)), use_cache=True).cache
        sizes[kv_heads] = sum(s.nbytes for s in cache.layer_states)
    assert sizes[KV_HEADS] * GROUPS == sizes[HEADS]


def _repeat_rows(weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """A fused projection's rows (q, then the key-side blocks of Hkv heads) with every key-side head
    repeated over its group: the same projection for a model with one K/V head per query head."""
    q, *kv = weight.split(sizes)
    return torch.cat([q] + [b.unflatten(0, (KV_HEADS, HEAD_DIM)).repeat_interleave(GROUPS, 0).flatten(0, 1) for b in kv])


@pytest.mark.parametrize("attention_type", ["zeros", "softmax", "linear"])
def test_a_grouped_model_is_the_ungrouped_model_with_repeated_kv_heads(attention_type):
    grouped = random_model(grouped_config(attention_type))
    full = ZeroSForCausalLM(grouped_config(attention_type, num_key_value_heads=HEADS)).double().eval()
    state = grouped.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("qkvu_proj.weight", "qkv_proj.weight")):
            attn = grouped.get_submodule(key.rsplit(".", 1)[0].rsplit(".", 1)[0])
            state[key] = _repeat_rows(value, getattr(attn, "qkvu_sizes", None) or attn.qkv_sizes)
        elif key.endswith(("attn.mu", "attn.log_tau")):
            state[key] = value.repeat_interleave(GROUPS, 0)
    full.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 21))
    torch.testing.assert_close(grouped(ids, use_cache=False).logits, full(ids, use_cache=False).logits,
                               atol=1e-10, rtol=1e-10)
    assert grouped.get_submodule("model.layers.0.attn.o_proj").in_features == HEADS * HEAD_DIM


def test_a_grouped_state_file_round_trips_and_refuses_another_grouping(tmp_path):
    model = random_model(grouped_config())
    ids = torch.randint(0, 64, (1, 12))
    cache = model(ids[:, :9], use_cache=True).cache
    cache.save(tmp_path / "s.safetensors", model=model)
    expected = model(ids[:, 9:], cache=cache).logits
    loaded = ZeroSCache.load(tmp_path / "s.safetensors", model)
    torch.testing.assert_close(model(ids[:, 9:], cache=loaded).logits, expected, atol=0, rtol=0)
    other = random_model(grouped_config(num_key_value_heads=HEADS))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ZeroSCache.load(tmp_path / "s.safetensors", other, check_weights=False)


def test_defaults_are_one_kv_head_per_query_head_and_hidden_over_heads():
    config = ZeroSConfig(hidden_size=96, num_attention_heads=3)
    assert (config.num_key_value_heads, config.head_dim, config.num_key_value_groups) == (3, 32, 1)
    reloaded = ZeroSConfig(**config.to_dict())
    assert (reloaded.num_key_value_heads, reloaded.head_dim) == (3, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_key_value_heads=4), "num_key_value_heads \\(4\\) must divide num_attention_heads \\(6\\)"),
        (dict(head_dim=7), "head_dim = 7 must be even"),
        (dict(head_dim=0), "head_dim must be a positive integer"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    ],
)
def test_bad_grouping_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        grouped_config(**overrides)


@pytest.mark.parametrize("overrides", MIXERS)
def test_packed_documents_equal_separate_rows(overrides):
    model = random_model(grouped_config(**overrides))
    first, second = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    packed = model(torch.cat([first, second], dim=1), position_ids=position_ids, use_cache=False).logits
    separate = torch.cat([model(doc, use_cache=False).logits for doc in (first, second)], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-10, rtol=1e-10)


def test_the_state_table_measures_shared_states_and_kv_caches():
    from benchmarks.linearize import state_table

    layers, heads, kv_heads, d = 4, 4, 2, 8
    rows = {r["model"].split(",")[0] + ("" if "shared" in r["model"] else " repeated"): r
            for r in state_table(layers, heads, kv_heads, d, softmax_every=2, contexts=(64,))}
    teacher, shared = rows["teacher (softmax repeated"], rows["pure ZeroS"]
    # keys and values (float32) of the K/V heads, and a byte per key saying it is real
    assert teacher["bytes_per_token"] == layers * (2 * kv_heads * d * 4 + 1)
    assert shared["bytes_per_token"] == 0
    counter = 8  # the cache's count of the row's tokens (one int64), beside the layers' states
    assert (shared["state_bytes_64"] - counter) * (heads // kv_heads) == rows["pure ZeroS repeated"]["state_bytes_64"] - counter
    assert rows["hybrid 1 in 2"]["bytes_per_token"] == teacher["bytes_per_token"] // 2


def test_a_resume_names_a_derived_field_only_where_it_was_set(tmp_path):
    """Resuming with another hidden_size names hidden_size, not the head_dim it derives; a run trained with
    an explicit head_dim, resumed without it, is refused naming head_dim."""
    from zeros_lm.checkpoint import CHECKPOINT_KEY, model_state
    from zeros_lm.cli.train import check_resume_model
    from zeros_lm.rundir import RunError

    def checkpoint(**fields) -> str:
        path = tmp_path / "step=0000001.ckpt"
        torch.save({CHECKPOINT_KEY: model_state(ZeroSConfig(**fields))}, path)
        return str(path)

    unset = dict(head_dim=None, num_key_value_heads=None, intermediate_size=None)
    with pytest.raises(RunError) as error:
        check_resume_model(checkpoint(hidden_size=64), str(tmp_path), dict(unset, hidden_size=128))
    assert "hidden_size 128 asked for" in str(error.value) and "head_dim" not in str(error.value)
    with pytest.raises(RunError, match="--model.head_dim 16 asked for, 32 in the checkpoint"):
        check_resume_model(checkpoint(hidden_size=64, head_dim=32), str(tmp_path), dict(unset, hidden_size=64))
    check_resume_model(checkpoint(hidden_size=64), str(tmp_path), dict(unset, hidden_size=64))  # the same model
