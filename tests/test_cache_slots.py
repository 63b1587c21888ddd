"""ZeroSCache's typed per-layer slots: each mixer keeps its own slot type, with named entries that the
state file names too, and each slot selects / repeats its rows itself."""

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

from zeros_lm import ZeroSCache
from zeros_lm.cache_zeros import LinearLayerState, SoftmaxLayerState, ZeroSLayerState
from zeros_lm.ops import ZeroSState

HYBRID = dict(num_hidden_layers=3, conv_size=3, layer_types=["full_attention", "linear_attention", "linear_attention"])


def _ids(B, T, seed):
    return torch.randint(2, 320, (B, T), generator=torch.Generator().manual_seed(seed))


def test_each_layer_keeps_its_named_slot():
    model = tiny_model("zeros", **HYBRID)
    B, T, H, d, C = 2, 7, 4, 16, 64
    with torch.no_grad():
        cache = model(_ids(B, T, 0), use_cache=True).cache
    softmax, zeros, _ = cache.layer_states
    assert isinstance(softmax, SoftmaxLayerState) and isinstance(zeros, ZeroSLayerState)
    assert softmax.keys.shape == softmax.values.shape == (B, H, T, d) and softmax.valid.shape == (B, T)
    assert isinstance(zeros.core, ZeroSState) and zeros.u_sum.shape == (B, H, d)
    assert zeros.conv.shape == (B, HYBRID["conv_size"] - 1, 4 * C)
    linear = tiny_model("linear", conv_size=3)
    with torch.no_grad():
        state = linear(_ids(B, T, 0), use_cache=True).cache.layer_states[0]
    assert isinstance(state, LinearLayerState)
    assert state.kv_sum.shape == (B, H, d, d) and state.k_sum.shape == (B, H, d) and state.conv.shape == (B, 2, 3 * C)


def test_a_layer_refuses_another_kinds_slot():
    model = tiny_model("zeros", **HYBRID)
    with torch.no_grad():
        cache = model(_ids(1, 3, 0), use_cache=True).cache
    with pytest.raises(TypeError, match="SoftmaxLayerState"):
        cache.update_layer_state(0, cache.layer_states[1])
    with pytest.raises(TypeError, match="ZeroSLayerState"):
        cache.update_layer_state(1, tuple(vars(cache.layer_states[1]).values()))


def test_state_file_names_each_entry(tmp_path):
    model = tiny_model("zeros", **HYBRID)
    with torch.no_grad():
        model(_ids(1, 5, 0), use_cache=True).cache.save(tmp_path / "s.state", model)
    with safe_open(tmp_path / "s.state", framework="pt") as f:
        keys = set(f.keys())
    assert {"num_tokens", "layers.0.keys", "layers.0.values", "layers.0.valid", "layers.1.core.kv",
            "layers.1.core.n", "layers.1.u_sum", "layers.1.conv", "layers.2.core.sbar"} <= keys


def test_selected_and_repeated_rows_continue_as_those_rows_alone():
    """batch_select_indices / batch_repeat_interleave move every slot's rows (KV, ZeroS state, running
    sum of u, convolution history, token counts) together."""
    model = tiny_model("zeros", **HYBRID)
    prompt, mask = _ids(3, 6, 0), torch.ones(3, 6, dtype=torch.long)
    mask[2, :2] = 0  # a left-padded row
    nxt = _ids(3, 2, 1)
    with torch.no_grad():
        cache = model(prompt, attention_mask=mask, use_cache=True).cache
        order = torch.tensor([2, 0])
        cache.batch_select_indices(order)
        cache.batch_repeat_interleave(2)
        rows = order.repeat_interleave(2)
        full_mask = torch.cat([mask[rows], torch.ones(4, 2, dtype=torch.long)], dim=1)
        logits = model(nxt[rows], attention_mask=full_mask, cache=cache).logits
        ref = model(torch.cat([prompt, nxt], 1)[rows], attention_mask=full_mask).logits[:, -2:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_taken_rows_are_exactly_those_rows_in_any_order():
    """take_rows copies runs of consecutive rows on the CPU: any order, repeats, gaps and no rows give what
    index_select gives, for every entry of every slot."""
    model = tiny_model("zeros", **HYBRID)
    with torch.no_grad():
        cache = model(_ids(6, 5, 0), use_cache=True).cache
    for rows in ([0, 1, 2, 3, 4, 5], [5, 4, 3], [1, 2, 4, 5], [3, 3, 0, 1, 1], [2], []):
        index = torch.tensor(rows, dtype=torch.long)
        taken = cache.take_rows(rows)
        for got, want in zip(taken.layer_states, cache.layer_states, strict=True):
            got_tensors, want_tensors = [], []
            got.map(lambda x: got_tensors.append(x) or x)
            want.map(lambda x: want_tensors.append(x.index_select(0, index)) or x)
            for a, b in zip(got_tensors, want_tensors, strict=True):
                if not rows:  # (no row uses any key column: they are dropped too)
                    assert a.shape[0] == 0
                    continue
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_empty_cache_is_all_none():
    cache = ZeroSCache(tiny_model("zeros", **HYBRID).config)
    assert cache.layer_states == [None] * 3 and cache.nbytes == 0


@pytest.mark.parametrize("kind, extra", [("zeros", HYBRID), ("linear", dict(conv_size=3)), ("softmax", {})])
def test_stacked_streams_of_different_lengths_continue_as_each_alone(kind, extra):
    """ZeroSCache.stack joins caches that read different numbers of tokens (softmax keys left-padded and
    masked), take_rows takes rows back out (dropping key columns no kept row uses): every row continues
    exactly as its stream would alone."""
    model = tiny_model(kind, **extra)
    lengths, nxt = (5, 2, 9), _ids(3, 3, 7)
    prompts = [_ids(1, n, i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        alone = [model(p, use_cache=True).cache for p in prompts]
        refs = [model(torch.cat([p, nxt[i : i + 1]], 1)).logits[:, -3:] for i, p in enumerate(prompts)]
        batch = ZeroSCache.stack(alone)
        assert batch.num_tokens.tolist() == list(lengths) and batch.seen_tokens == max(lengths)
        for t in range(2):  # two steps of all three rows together
            logits = model(nxt[:, t : t + 1], cache=batch, use_cache=True).logits
            for i in range(3):
                torch.testing.assert_close(logits[i, -1], refs[i][0, t], rtol=1e-5, atol=1e-5)
        kept = batch.take_rows([1])  # the shortest row: the longer rows' leading columns go
        assert kept.seen_tokens == lengths[1] + 2 and batch.num_tokens.shape == (3,)
        for s in kept.layer_states:
            if isinstance(s, SoftmaxLayerState):
                assert s.keys.shape[2] == kept.seen_tokens and bool(s.valid.all())
        logits = model(nxt[1:2, 2:3], cache=kept, use_cache=True).logits
    torch.testing.assert_close(logits[0, -1], refs[1][0, 2], rtol=1e-5, atol=1e-5)


def test_stack_refuses_an_empty_cache():
    model = tiny_model("zeros", **HYBRID)
    with torch.no_grad():
        full = model(_ids(1, 3, 0), use_cache=True).cache
    with pytest.raises(ValueError, match="no token"):
        ZeroSCache.stack([full, ZeroSCache(model.config)])


@pytest.mark.parametrize("overrides", [HYBRID, dict(num_key_value_heads=2)], ids=["hybrid+conv", "grouped K/V"])
def test_a_cache_updated_in_place_decodes_exactly_as_one_that_is_not(overrides):
    """``in_place_updates``: each decoded token's ZeroS state is written over the last one's sums (the same
    tensors throughout), the logits bit for bit those of a cache updated into new tensors; the caches made
    from it start without the flag (their tensors may be shared)."""
    model = tiny_model("zeros", **overrides)
    zeros_layer = model.config.mixer_types.index("zeros")
    plain, owned = ZeroSCache(model.config), ZeroSCache(model.config)
    owned.in_place_updates = True
    ids = _ids(2, 6, 3)
    with torch.inference_mode():
        model(ids, cache=plain, use_cache=True)
        model(ids, cache=owned, use_cache=True)
        kv = owned.layer_states[zeros_layer].core.kv
        before = plain.layer_states[zeros_layer].core.kv
        for token in _ids(2, 5, 4).unbind(dim=1):
            want = model(token[:, None], cache=plain, use_cache=True).logits
            got = model(token[:, None], cache=owned, use_cache=True).logits
            assert torch.equal(got, want)
        assert torch.equal(owned.layer_states[zeros_layer].core.kv, plain.layer_states[zeros_layer].core.kv)
    if overrides.get("num_key_value_heads") is None:  # (grouped heads repeat the state into a new tensor first)
        assert owned.layer_states[zeros_layer].core.kv is kv
    assert plain.layer_states[zeros_layer].core.kv is not before
    assert not any(c.in_place_updates for c in (owned.take_rows([1]), owned.copy(), ZeroSCache.stack([owned, plain])))


def _entries(cache: ZeroSCache) -> list[torch.Tensor]:
    """Every tensor of the cache, in slot and field order, the token counts last."""
    out = []
    for s in cache.layer_states:
        s.map(lambda x: out.append(x) or x)
    return out + [cache.num_tokens]


def _assert_same_rows(got: ZeroSCache, want: ZeroSCache):
    assert got.seen_tokens == want.seen_tokens
    for a, b in zip(_entries(got), _entries(want), strict=True):
        assert torch.equal(a, b)


def test_rows_dropped_and_joined_in_place_are_the_rows_taken_and_stacked():
    """The served batch's leaves and joins: drop_rows is take_rows of the rows it reports, made over the
    cache's own tensors (the rows that stay where they were keep their memory); stack with capacity is stack,
    the joining rows written after the batch's in its buffers (a join copies only them). Both only for a
    cache with in_place_updates; then every row decodes as the copies do."""
    model = tiny_model("zeros", **HYBRID)
    zeros_layer = 1
    with torch.inference_mode():
        batch = ZeroSCache.stack([model(_ids(1, n, i), use_cache=True).cache for i, n in enumerate((5, 2, 9, 4, 7, 3))])
        with pytest.raises(ValueError, match="in_place_updates"):
            batch.drop_rows([1])
        batch.in_place_updates = True
        before, memory = batch.copy(), batch.layer_states[zeros_layer].core.kv.data_ptr()
        dropped, order = batch.drop_rows([1, 4, 5])
        assert sorted(order) == [0, 2, 3] and dropped.in_place_updates
        _assert_same_rows(dropped, before.take_rows(order))
        assert dropped.layer_states[zeros_layer].core.kv.data_ptr() == memory  # (row 0 stayed: nothing moved it)

        kept = dropped.copy()
        joining = ZeroSCache.stack([model(_ids(1, n, 10 + n), use_cache=True).cache for n in (6, 1)])
        joined = ZeroSCache.stack([dropped, joining], capacity=8)
        _assert_same_rows(joined, ZeroSCache.stack([kept, joining]))
        assert joined.layer_states[zeros_layer].core.kv.data_ptr() == memory  # (3 + 2 rows fit where 6 were)
        assert not joined.in_place_updates

        plain = ZeroSCache.stack([kept, joining], capacity=8)  # kept has no in_place_updates: left as it is
        assert plain.layer_states[zeros_layer].core.kv.data_ptr() != kept.layer_states[zeros_layer].core.kv.data_ptr()

        reference = ZeroSCache.stack([kept, joining])
        joined.in_place_updates = True
        token = _ids(5, 1, 3)
        torch.testing.assert_close(model(token, cache=joined, use_cache=True).logits,
                                   model(token, cache=reference, use_cache=True).logits, rtol=0, atol=0)
