"""The model: config validation, forward passes, the cache, RoPE, padding, ablation switches."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTENTION_TYPES, tiny_config, tiny_model

from zeros_lm import ZeroSCache, ZeroSConfig, ZeroSForCausalLM, ZeroSModel
from zeros_lm.modeling_zeros import apply_rope, rope_cos_sin

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=64, num_attention_heads=5), "must divide"),
        (dict(hidden_size=36, num_attention_heads=12), "must be even"),
        (dict(attention_type="flash"), "attention_type"),
        (dict(logit_type="cosine"), "logit_type"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(use_gates="yes"), "use_gates"),
        (dict(zero_init_residual=1), "zero_init_residual"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZeroSConfig(**kwargs)


def test_config_defaults_and_round_trip(tmp_path):
    config = ZeroSConfig()
    # the embedded default run's model (configs/default.yaml)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 256, 4, 4)
    assert config.intermediate_size == 704 and config.head_dim == 64
    assert config.attention_type == "zeros" and config.first_layer_zero_order and config.tie_word_embeddings
    assert config.logit_type == "deviation" and config.use_gates and config.use_output_norm
    assert not config.zero_order_all_layers
    config = tiny_config("linear", chunk_size=8)
    config.save_pretrained(tmp_path)
    loaded = ZeroSConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_auto_classes_are_registered():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model("zeros", hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    assert isinstance(config, ZeroSConfig)
    assert type(AutoModel.from_config(config)) is ZeroSModel
    assert type(AutoModelForCausalLM.from_config(config)) is ZeroSForCausalLM


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def _incremental_logits(model, ids, pieces, attention_mask=None):
    """Run ids through the model piece by piece with a cache; return concatenated logits and the cache."""
    cache, out, start = None, [], 0
    for size in pieces:
        stop = start + size
        mask = None if attention_mask is None else attention_mask[:, :stop]
        res = model(ids[:, start:stop], attention_mask=mask, cache=cache, use_cache=True)
        cache = res.cache
        out.append(res.logits)
        start = stop
    assert start == ids.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_loss_is_shifted_cross_entropy(attention_type):
    model = tiny_model(attention_type)
    ids = torch.randint(2, 320, (2, 11))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "lm_head.weight")


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_decode_steps_and_chunked_prefill_match_full_forward(attention_type):
    model = tiny_model(attention_type)
    ids = torch.randint(2, 320, (3, 13))  # chunk_size 4: several full chunks and a partial one
    with torch.no_grad():
        full = model(ids).logits
        steps, _ = _incremental_logits(model, ids, [1] * 13)
        pieces, _ = _incremental_logits(model, ids, [5, 1, 6, 1])
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(pieces, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_float64_decode_matches_full_forward_tightly(attention_type):
    """In float64 the chunked, recurrent and piecewise paths agree to rounding, not just to 1e-4."""
    model = tiny_model(attention_type).double()
    ids = torch.randint(2, 320, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        steps, cache = _incremental_logits(model, ids, [3, 1, 1, 5])
    assert full.dtype == torch.float64
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_left_padding_matches_unpadded_rows(attention_type):
    """Left padding: outputs of real tokens equal those of the row alone, during prefill and decoding."""
    model = tiny_model(attention_type)
    lengths = [9, 4, 6]
    width = max(lengths)
    rows = [torch.randint(2, 320, (n + 3,)) for n in lengths]  # prompt + 3 decoded tokens
    ids = torch.ones(len(rows), width + 3, dtype=torch.long)  # pad id 1
    mask = torch.zeros_like(ids)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, width - n :] = row
        mask[i, width - n :] = 1
    with torch.no_grad():
        batched, _ = _incremental_logits(model, ids, [width, 1, 1, 1], attention_mask=mask)
        assert torch.isfinite(batched).all()
        for i, (row, n) in enumerate(zip(rows, lengths)):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched[i, width - n :], alone, atol=1e-4, rtol=0)


def test_padding_in_the_middle_of_a_prompt_is_skipped():
    model = tiny_model("zeros")
    ids = torch.randint(2, 320, (1, 8))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        holed = model(ids, attention_mask=mask).logits[0, mask[0].bool()]
        dense = model(ids[:, mask[0].bool()]).logits[0]
    torch.testing.assert_close(holed, dense, atol=1e-4, rtol=0)


def test_rope_is_a_rotation_at_real_token_positions():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 1000, 5, 0]])
    cos, sin = rope_cos_sin(positions, 8, 10000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # norms kept
    torch.testing.assert_close(y[0, 0], x[0, 0])  # position 0: identity
    # relative: <R(m) a, R(n) b> depends on m - n only
    a, b = torch.randn(8), torch.randn(8)

    def rot(v, p):
        c, s = rope_cos_sin(torch.tensor([[p]]), 8, 10000.0)
        return apply_rope(v.view(1, 1, 1, 8), c, s).view(8)

    torch.testing.assert_close(rot(a, 10) @ rot(b, 3), rot(a, 107) @ rot(b, 100), atol=1e-5, rtol=1e-5)


def test_zeros_first_token_output_is_zero_off_the_first_layer():
    """o_1 = 0 on every ZeroS layer except the first (docs/method.md section 2)."""
    model = tiny_model("zeros", num_hidden_layers=3)
    seen = {}
    for i, block in enumerate(model.model.layers):
        block.attn.o_proj.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0]))
    with torch.no_grad():
        model(torch.randint(2, 320, (2, 6)))
    assert seen[0][:, 0].abs().max() > 1e-3  # g0/t term on layer 0
    for i in (1, 2):
        assert seen[i][:, 0].abs().max() < 1e-4
        assert seen[i][:, 1:].abs().max() > 1e-3


def test_zeros_deviation_logit_matches_definition():
    """s_t = -(u_t . ubar_t)/sqrt(d), ubar_t = (tau mu + sum_{j<=t} u_j)/(tau + t)."""
    model = tiny_model("zeros", num_hidden_layers=1)
    attn = model.model.layers[0].attn
    with torch.no_grad():
        attn.mu.normal_()
        attn.log_tau.normal_()
    B, T, H, d = 2, 6, 4, 16
    u = torch.randn(B, T, H, d)
    counts = torch.arange(1, T + 1).expand(B, T)
    s, usum = attn._logits(u, None, counts, None)
    tau = attn.log_tau.exp()
    for t in range(T):
        ubar = (tau[:, None] * attn.mu + u[:, : t + 1].sum(1)) / (tau[:, None] + t + 1)
        torch.testing.assert_close(s[:, t], -(u[:, t] * ubar).sum(-1) / math.sqrt(d))
    torch.testing.assert_close(usum, u.sum(1))


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_cache_size_and_batch_operations(attention_type):
    model = tiny_model(attention_type)
    ids = torch.randint(2, 320, (3, 40))
    with torch.no_grad():
        short = model(ids[:, :8], use_cache=True).cache
        long = model(ids, use_cache=True).cache
    assert isinstance(long, ZeroSCache) and long.get_seq_length() == 40 and long.batch_size == 3
    if attention_type == "softmax":
        assert long.nbytes > 4 * short.nbytes
    else:  # a recurrent state: the size does not depend on the context length
        assert long.nbytes == short.nbytes
        assert long.nbytes < 2 * 2 * 3 * 4 * 3 * 16 * 16 * 4  # layers x batch x heads x (3 d x d) float32, x2

    # select / reorder / repeat rows, then continue: equal to running those rows from the start
    nxt = torch.randint(2, 320, (3, 1))
    with torch.no_grad():
        order = torch.tensor([2, 0])
        long.reorder_cache(order)
        got = model(nxt[order], cache=long).logits
        want = model(torch.cat([ids, nxt], 1)[order]).logits[:, -1:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

        cache = model(ids, use_cache=True).cache
        cache.batch_select_indices(torch.tensor([1]))
        cache.batch_repeat_interleave(2)
        assert cache.batch_size == 2
        got = model(nxt[[1, 1]], cache=cache).logits
        want = model(torch.cat([ids, nxt], 1)[[1, 1]]).logits[:, -1:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(10)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


def test_zeros_cache_is_small_for_the_benchmark_config():
    """6 layers x 6 heads x d=64: 3*H*d*d float32 per layer, far below 2 MiB, whatever the context."""
    config = ZeroSConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, vocab_size=512)
    model = ZeroSForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 512, (1, 3)), use_cache=True).cache
    assert 6 * 3 * 6 * 64 * 64 * 4 <= cache.nbytes <= 2 * 2**20


def test_past_key_values_is_an_alias_for_cache():
    model = tiny_model("zeros")
    ids = torch.randint(2, 320, (1, 7))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
        a = model(ids[:, 6:], past_key_values=cache).logits
        b = model(ids).logits[:, 6:]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Parameters, init, ablations, training features
# ---------------------------------------------------------------------------------------------


def test_tied_embeddings_and_scaled_init():
    model = tiny_model("zeros", num_hidden_layers=4, hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std_in = model.model.layers[1].attn.qkvu_proj.weight.std().item()
    std_out = model.model.layers[1].attn.o_proj.weight.std().item()
    std_down = model.model.layers[1].mlp.down_proj.weight.std().item()
    assert abs(std_in - 0.02) < 0.002
    for std in (std_out, std_down):
        assert abs(std - 0.02 / math.sqrt(8)) < 0.001
    untied = tiny_model("zeros")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("overrides", [dict(attention_type="zeros"), dict(attention_type="softmax"),
                                       dict(attention_type="linear", conv_size=4),
                                       dict(attention_type="zeros", softmax_every=2)],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_zero_init_residual_starts_every_block_as_the_identity(overrides):
    """zero_init_residual: every attention / MLP output projection starts at zero, so the last hidden
    state is the final norm of the embeddings; the other weights keep their init, and one optimizer
    step moves the projections off zero (the blocks can learn)."""
    torch.manual_seed(0)
    model = tiny_model(num_hidden_layers=4, zero_init_residual=True, **overrides)
    outputs = [m for m in model.modules() if getattr(m, "_is_residual_output", False)]
    assert len(outputs) == 2 * 4 and all(not m.weight.any() for m in outputs)
    assert abs(model.model.layers[1].mlp.gate_up_proj.weight.std().item() - 0.02) < 0.005
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden, model.model.norm(model.model.embed_tokens(ids)))
    default = tiny_model(num_hidden_layers=4, **overrides)
    assert all(m.weight.any() for m in default.modules() if getattr(m, "_is_residual_output", False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(m.weight.any() for m in outputs)


def reference_zeros_layer(attn, x):
    """The ZeroS layer's output before o_proj (B, T, H, d), straight from docs/method.md section 2, with
    every sum written out over i <= t. x (B, T, hidden) is the layer's input; positions 0..T-1."""
    config = attn.config
    B, T, _ = x.shape
    H, d = config.num_attention_heads, config.head_dim
    qkvu = (x @ attn.qkvu_proj.weight.T).view(B, T, 4, H, d)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), d, config.rope_theta)
    q, k = (F.normalize(apply_rope(qkvu[:, :, i], cos, sin), dim=-1) for i in (0, 1))
    v, u = qkvu[:, :, 2], qkvu[:, :, 3]
    t = torch.arange(1, T + 1, dtype=x.dtype)
    if config.logit_type == "norm":
        s = (u * u).sum(-1) / d
    else:
        tau = attn.log_tau.exp()[:, None]
        ubar = (tau * attn.mu + u.cumsum(1)) / (tau + t[None, :, None, None])
        s = -(u * ubar).sum(-1) / math.sqrt(d)
    zero_order = config.zero_order_all_layers or (config.first_layer_zero_order and attn.layer_idx == 0)
    if config.use_gates:
        gl = (x @ attn.gate_proj.weight.T + attn.gate_proj.bias).view(B, T, H, -1)
        g1, gh = torch.sigmoid(gl[..., 0]), torch.sigmoid(gl[..., 1])
        g0 = torch.tanh(gl[..., 2]) if zero_order else torch.zeros_like(g1)
    else:  # every gate is the constant 1
        g1 = gh = torch.ones(B, T, H, dtype=x.dtype)
        g0 = torch.ones_like(g1) if zero_order else torch.zeros_like(g1)
    o = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            for tt in range(T):
                n = tt + 1
                si = s[b, : n, h]
                p = torch.softmax(si, 0)
                first = si / n - si.sum() / n**2
                higher = p - 1 / n - first
                r = g1[b, tt, h] * first + gh[b, tt, h] * higher + g0[b, tt, h] / n
                cosines = k[b, :n, h] @ q[b, tt, h]
                o[b, tt, h] = ((r * cosines)[:, None] * v[b, :n, h]).sum(0)
    if config.use_output_norm:
        o = F.layer_norm(o, (d,), eps=1e-5)
    return o


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(use_gates=False),
        dict(use_gates=False, use_output_norm=False),
        dict(use_output_norm=False),
        dict(logit_type="norm", use_output_norm=False),
        dict(zero_order_all_layers=True, use_output_norm=False),
        dict(first_layer_zero_order=False, use_output_norm=False),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default",
)
def test_ablation_switches_compute_what_they_claim(overrides):
    """Each switch changes exactly what docs/method.md and ZeroSConfig say: the output LayerNorm on/off,
    s = |u|^2/d for the "norm" logit, constant gates of 1 (g0 = 1 where the zero-order term is on:
    plain softmax weights there), the g0 term on the first layer only, on all layers, or on none."""
    model = tiny_model("zeros", num_hidden_layers=2, **overrides).double()
    with torch.no_grad():  # move the parameters that start as constants away from them
        for name, param in model.named_parameters():
            if name.endswith(("gate_proj.bias", ".mu", ".log_tau")):
                param.add_(0.5 * torch.randn_like(param))
    inputs, outputs = {}, {}
    for block in model.model.layers:
        attn = block.attn
        attn.register_forward_pre_hook(lambda m, a, kw: inputs.__setitem__(m.layer_idx, a[0]), with_kwargs=True)
        attn.o_proj.register_forward_hook(lambda m, a, out, i=attn.layer_idx: outputs.__setitem__(i, a[0]))
    B, T, H, d = 2, 7, 4, 16
    with torch.no_grad():
        model(torch.randint(2, 320, (B, T)))
        for block in model.model.layers:
            i = block.attn.layer_idx
            expected = reference_zeros_layer(block.attn, inputs[i])
            torch.testing.assert_close(outputs[i].view(B, T, H, d), expected, atol=1e-9, rtol=1e-7)
            if not model.config.use_output_norm:  # the check above must be able to tell norm from no norm
                assert (expected.std(-1) - 1).abs().max() > 0.1


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_gates=False),
        dict(zero_order_all_layers=True),
        dict(use_output_norm=False),
        dict(first_layer_zero_order=False),
        dict(logit_type="norm"),
    ],
    ids=lambda d: next(iter(d)),
)
def test_ablation_switches(overrides):
    model = tiny_model("zeros", num_hidden_layers=3, **overrides)
    attn = [block.attn for block in model.model.layers]
    if overrides.get("use_gates") is False:
        assert not any(hasattr(a, "gate_proj") for a in attn)
    elif overrides.get("zero_order_all_layers"):
        assert all(a.gate_proj.out_features == 3 * 4 for a in attn)
    elif overrides.get("first_layer_zero_order") is False:
        assert all(a.gate_proj.out_features == 2 * 4 for a in attn)
    else:
        assert [a.gate_proj.out_features for a in attn] == [12, 8, 8]
    if overrides.get("logit_type") == "norm":
        assert not hasattr(attn[0], "mu")
    ids = torch.randint(2, 320, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        steps, cache = _incremental_logits(model, ids[:, :9], [4, 1, 1, 3])
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(ids[[1, 0], 9:], cache=cache).logits
    assert torch.isfinite(full).all()
    torch.testing.assert_close(steps, full[:, :9], atol=1e-4, rtol=0)
    torch.testing.assert_close(swapped, full[[1, 0], 9:], atol=1e-4, rtol=0)


def count_block_calls(model, ids):
    """Calls of each block's MLP during a training forward and during the backward pass after it.

    With activation checkpointing every block is run once more in backward (its activations were
    not kept); without, never.
    """
    calls = {"n": 0}

    def counted(forward):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return forward(*args, **kwargs)

        return wrapper

    # An instance attribute, not a forward hook: the recomputation in backward skips module hooks.
    mlps = [block.mlp for block in model.model.layers]
    for mlp in mlps:
        mlp.forward = counted(mlp.forward)
    try:
        loss = model(ids, labels=ids).loss
        forward = calls["n"]
        loss.backward()
        return forward, calls["n"] - forward
    finally:
        for mlp in mlps:
            del mlp.forward


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(attention_type):
    ids = torch.randint(2, 320, (2, 10))
    grads, recomputed = [], []
    for checkpointing in (False, True):
        model = tiny_model(attention_type).train()
        if checkpointing:  # transformers >= 5.x renamed gradient_checkpointing_enable
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        assert [getattr(b, "gradient_checkpointing", False) for b in model.model.layers] == [checkpointing] * 2
        forward, backward = count_block_calls(model, ids)
        assert forward == model.config.num_hidden_layers
        recomputed.append(backward)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert recomputed == [0, model.config.num_hidden_layers]  # every block recomputed in backward, once
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_bfloat16_forward_is_finite_and_close(attention_type):
    model = tiny_model(attention_type)
    ids = torch.randint(2, 320, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_inputs_embeds_and_tuple_outputs():
    model = tiny_model("zeros")
    ids = torch.randint(2, 320, (2, 5))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        c = model(ids, return_dict=False, use_cache=False)
        hidden = model.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a, b)
    assert isinstance(c, tuple) and torch.equal(c[0], a)
    assert len(hidden) == 3
    with pytest.raises(ValueError, match="exactly one"):
        model()
