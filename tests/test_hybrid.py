"""Hybrid layer stacks (layer_types / softmax_every) and short causal convolutions (conv_size).

Everything that works for a plain stack must work for these: generate with and without cache, sampling,
beam search, left padding, prefill in pieces, state files, save/load, packed documents, gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from zeros_lm import ZeroSCache, ZeroSConfig, ZeroSForCausalLM
from zeros_lm.modeling_zeros import ShortConvolution, SoftmaxAttention, ZeroSAttention

VARIANTS = {
    "zeros+conv": dict(conv_size=3),
    "hybrid": dict(softmax_every=2),
    "hybrid+conv": dict(softmax_every=2, conv_size=3),
    "linear+conv": dict(attention_type="linear", conv_size=4),
}


def _model(name, seed=0, **extra):
    overrides = dict(VARIANTS[name], **extra)
    return tiny_model(overrides.pop("attention_type", "zeros"), seed=seed, **overrides)


def _ids(n, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (batch, n), generator=g)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_layer_types_follow_the_transformers_vocabulary_and_the_shorthand():
    config = tiny_config(num_hidden_layers=8, softmax_every=4)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert config.mixer_types == ("zeros",) * 3 + ("softmax",) + ("zeros",) * 3 + ("softmax",)
    config.validate_layer_type()  # stock transformers accepts the list
    reloaded = ZeroSConfig.from_dict(config.to_dict())
    assert reloaded.layer_types == config.layer_types and reloaded.mixer_types == config.mixer_types
    linear = tiny_config("linear", layer_types=["full_attention", "linear_attention"])
    assert linear.mixer_types == ("softmax", "linear")


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_types=["linear_attention"]), "must list 2 entries"),
    (dict(layer_types=["linear_attention", "mamba"]), "must list 2 entries"),
    (dict(attention_type="softmax", layer_types=["full_attention", "linear_attention"]), "set attention_type"),
    (dict(softmax_every=2, layer_types=["full_attention", "linear_attention"]), "disagree"),
    (dict(conv_size=1), "at least 2"),
    (dict(conv_size=-3), "integer >= 0"),
    (dict(conv_size=65), "conv_size must be at most 64"),
    (dict(softmax_every=True), "integer >= 0"),
    (dict(num_hidden_layers=2, softmax_every=3), "softmax_every \\(3\\) is larger than num_hidden_layers \\(2\\)"),
])
def test_bad_hybrid_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_zero_order_term_sits_on_the_first_zeros_layer():
    model = tiny_model(num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "linear_attention"])
    mixers = [block.attn for block in model.model.layers]
    assert isinstance(mixers[0], SoftmaxAttention)
    assert isinstance(mixers[1], ZeroSAttention) and mixers[1].has_zero_order and mixers[1].num_gates == 3
    assert not mixers[2].has_zero_order and mixers[2].num_gates == 2


# ---------------------------------------------------------------------------------------------
# The short convolution against torch's own conv1d
# ---------------------------------------------------------------------------------------------


def test_short_convolution_is_a_causal_depthwise_conv1d_then_silu():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4).double()
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    y, state = conv(x)
    ref = F.silu(F.conv1d(x.transpose(1, 2), conv.weight[:, None, :], padding=3, groups=6)[..., :9].transpose(1, 2))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(state, x[:, -3:].detach())
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gref, rtol=1e-12, atol=1e-12)
    # in pieces, through the state == at once
    y1, s1 = conv(x[:, :5])
    y2, _ = conv(x[:, 5:], state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)


def test_short_convolution_state_holds_the_last_real_inputs():
    conv = ShortConvolution(2, 3)
    x = torch.arange(1.0, 13.0).view(1, 6, 2)
    valid = torch.tensor([[True, True, True, False, True, False]])
    _, state = conv(x, valid=valid)
    assert torch.equal(state, x[:, [2, 4]])  # padding never enters the state
    _, state = conv(x[:, :1], state=torch.full((1, 2, 2), 7.0))
    assert torch.equal(state, torch.tensor([[[7.0, 7.0], [1.0, 2.0]]]))


# ---------------------------------------------------------------------------------------------
# Generation parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_in_pieces_then_decode_equals_one_forward(name):
    model = _model(name)
    ids = _ids(14, batch=2)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        pieces = [out.logits, model(ids[:, 5:9], cache=out.cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_generate_with_cache_equals_without(name):
    model = _model(name)
    ids = _ids(7)
    kw = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=1)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, do_sample=False, **kw), model.generate(ids, do_sample=False, use_cache=False, **kw))
        torch.manual_seed(3)
        sampled = model.generate(ids.repeat(2, 1), do_sample=True, top_k=20, **kw)
        torch.manual_seed(3)
        sampled_nc = model.generate(ids.repeat(2, 1), do_sample=True, top_k=20, use_cache=False, **kw)
        beams = model.generate(ids, num_beams=3, do_sample=False, **kw)
        beams_nc = model.generate(ids, num_beams=3, do_sample=False, use_cache=False, **kw)
    assert torch.equal(sampled, sampled_nc) and not torch.equal(sampled[0], sampled[1])
    assert torch.equal(beams, beams_nc)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = _model(name)
    prompts = [_ids(7, 1)[0], _ids(3, 2)[0]]
    ids = torch.ones(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 7 - len(p):], mask[row, 7 - len(p):] = p, 1
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], **kw)
            assert torch.equal(batch[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("name", ["hybrid+conv", "linear+conv"])
def test_state_files_and_save_pretrained_round_trip(name, tmp_path):
    model = _model(name)
    a, b = _ids(9, 1), _ids(4, 2)
    with torch.no_grad():
        model(a, use_cache=True).cache.save(tmp_path / "a.state", model)
        loaded = ZeroSCache.load(tmp_path / "a.state", model)
        torch.testing.assert_close(model(b, cache=loaded).logits, model(torch.cat([a, b], 1)).logits[:, 9:],
                                   rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "model")
    again = ZeroSForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert again.config.layer_types == model.config.layer_types and again.config.conv_size == model.config.conv_size
    with torch.no_grad():
        assert torch.equal(again(a).logits, model(a).logits)
    with pytest.raises(ValueError, match="different model.*conv_size"):
        ZeroSCache.load(tmp_path / "a.state", _model(name, conv_size=2))


def test_cache_grows_with_the_context_only_through_softmax_layers():
    model = tiny_model(num_hidden_layers=4, softmax_every=4, conv_size=3)  # 3 ZeroS layers, 1 softmax layer
    H, d = model.config.num_attention_heads, model.config.head_dim
    with torch.no_grad():
        short = model(_ids(10), use_cache=True).cache
        long = model(_ids(30), use_cache=True).cache
    per_token = 2 * H * d * 4 + 1  # keys and values in float32, plus one validity flag, for the one softmax layer
    assert long.nbytes - short.nbytes == 20 * per_token
    zeros_only = tiny_model(num_hidden_layers=4, conv_size=3)
    with torch.no_grad():
        assert zeros_only(_ids(10), use_cache=True).cache.nbytes == zeros_only(_ids(30), use_cache=True).cache.nbytes


# ---------------------------------------------------------------------------------------------
# Packed documents: nothing crosses a document start (the convolution's window included)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_documents_equal_each_document_alone(name):
    model = _model(name).double()
    lengths = [5, 1, 6]  # a boundary inside a chunk (chunk_size 4), a one-token document
    docs = [_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = model(packed, position_ids=position_ids).logits
    alone = torch.cat([model(doc).logits for doc in docs], 1)
    torch.testing.assert_close(logits, alone, rtol=1e-9, atol=1e-9)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.square().sum(), params, allow_unused=True)
    grads_alone = torch.autograd.grad(alone.square().sum(), params, allow_unused=True)
    for g, ga in zip(grads, grads_alone):
        if g is not None or ga is not None:
            torch.testing.assert_close(g, ga, rtol=1e-8, atol=1e-10)


def test_conv_size_is_bounded_by_a_named_limit():
    from zeros_lm.configuration_zeros import MAX_CONV_SIZE

    assert tiny_config(conv_size=MAX_CONV_SIZE).conv_size == MAX_CONV_SIZE
    with pytest.raises(ValueError, match=f"at most {MAX_CONV_SIZE}"):
        tiny_config(conv_size=MAX_CONV_SIZE + 1)


@pytest.mark.parametrize("overrides, described", [
    (dict(), "zeros attention"),
    (dict(attention_type="linear"), "linear attention"),
    (dict(attention_type="softmax"), "softmax attention"),
    (dict(layer_types=["full_attention"] * 4), "softmax attention"),
    (dict(softmax_every=4), "zeros attention + 1 softmax layer in 4"),
    (dict(softmax_every=2, attention_type="linear"), "linear attention + 2 softmax layers in 4"),
    (dict(softmax_every=4, num_hidden_layers=8), "zeros attention + 2 softmax layers in 8"),
])
def test_the_training_model_line_names_the_real_layer_mix(overrides, described):
    from zeros_lm.cli.train import layer_mix

    config = tiny_config(**{"num_hidden_layers": 4, **overrides})
    assert layer_mix(config) == described


@pytest.mark.parametrize("name", ["hybrid+conv", "linear+conv"])
def test_a_float32_state_continues_in_a_bfloat16_model(name, tmp_path):
    """States do not depend on the weights' dtype (the same checkpoint in float32 or bfloat16): a file
    saved by the float32 model loads into the bfloat16 one, its softmax keys / values and convolution
    inputs in bfloat16 (the recurrent sums stay float32), and continues as the bfloat16 model would."""
    model = _model(name)
    a, b = _ids(9, 1), _ids(4, 2)
    with torch.no_grad():
        model(a, use_cache=True).cache.save(tmp_path / "a.state", model)
        half = _model(name).to(torch.bfloat16)
        loaded = ZeroSCache.load(tmp_path / "a.state", half)
        for state in loaded.layer_states:
            for field in type(state).MODEL_DTYPE:
                assert getattr(state, field) is None or getattr(state, field).dtype == torch.bfloat16
        continued = half(b, cache=loaded).logits.float()
        whole = half(torch.cat([a, b], 1)).logits[:, 9:].float()
    assert torch.isfinite(continued).all()
    torch.testing.assert_close(continued, whole, rtol=0.05, atol=0.05)
