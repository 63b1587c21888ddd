"""The ZeroS op: the three forms agree, hand over state, respect padding, stay stable, and scale."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zeros_lm import ops
from zeros_lm.ops import ZeroSState, zeros_attention
from zeros_lm.ops_contract import ChunkScalars

FORMS = ("reference", "chunked", "recurrent")
STATEFUL = ("chunked", "recurrent")


def make_inputs(B=2, T=37, H=3, d=8, *, first_layer=False, dtype=torch.float64, seed=0, logit_scale=2.0,
                logit_mean=0.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(rand(B, T, H, d), dim=-1)
    k = F.normalize(rand(B, T, H, d), dim=-1)
    v = rand(B, T, H, d)
    s = logit_mean + logit_scale * rand(B, T, H)
    g1 = torch.sigmoid(rand(B, T, H))
    gh = torch.sigmoid(rand(B, T, H))
    g0 = torch.tanh(rand(B, T, H)) if first_layer else None
    tensors = [q, k, v, s, g1, gh, g0]
    if requires_grad:
        for x in tensors:
            if x is not None:
                x.requires_grad_(True)
    return tensors


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def run(inputs, mode, **kw):
    return zeros_attention(*inputs, mode=mode, **kw)


# ------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("T", [1, 37, 150])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("first_layer", [False, True])
@pytest.mark.parametrize("B,H", [(1, 1), (2, 3)])
def test_forms_agree_float64(T, chunk_size, first_layer, B, H):
    inputs = make_inputs(B, T, H, first_layer=first_layer, seed=T + chunk_size)
    ref, ref_state = run(inputs, "reference", output_final_state=True)
    for mode in STATEFUL:
        out, state = run(inputs, mode, chunk_size=chunk_size, output_final_state=True)
        assert out.dtype == torch.float64
        assert (out - ref).abs().max() <= 1e-9 * max(ref.abs().max().item(), 1.0), mode
        for name in ("kv", "E", "m", "sbar", "n"):
            a, b = getattr(state, name), getattr(ref_state, name)
            assert (a - b).abs().max() <= 1e-9 * max(b.abs().max().item(), 1.0), (mode, name)


def test_float32_matches_float64():
    inputs64 = make_inputs(2, 200, 4, 16, first_layer=True, seed=1)
    ref, _ = run(inputs64, "reference")
    inputs32 = [x.float() if x is not None else None for x in inputs64]
    for mode in FORMS:
        out, _ = run(inputs32, mode, chunk_size=32)
        assert out.dtype == torch.float32
        assert rel_err(out.double(), ref) <= 1e-4, mode


def test_low_precision_inputs_accumulate_in_float32():
    inputs = [x.bfloat16() if x is not None else None for x in make_inputs(1, 50, 2, 8, seed=2)]
    out, state = run(inputs, "chunked", chunk_size=16, output_final_state=True)
    assert out.dtype == torch.bfloat16
    assert state.kv.dtype == torch.float32
    ref, _ = run([x.double() for x in inputs[:6]] + [None], "reference")
    assert rel_err(out.double(), ref) <= 2e-2


@pytest.mark.parametrize("mode", STATEFUL)
def test_autocast_does_not_lower_the_accumulation(mode):
    inputs = [x.float() if x is not None else None for x in make_inputs(2, 70, 2, 16, first_layer=True, seed=16)]
    plain, plain_state = run(inputs, mode, chunk_size=16, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = run(inputs, mode, chunk_size=16, output_final_state=True)
    assert out.dtype == torch.float32 and state.kv.dtype == torch.float32
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state.kv, plain_state.kv, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- state hand-over


@pytest.mark.parametrize("first", FORMS)
@pytest.mark.parametrize("second", STATEFUL)
@pytest.mark.parametrize("split", [1, 20, 64])
def test_state_hand_over(first, second, split):
    inputs = make_inputs(2, 90, 2, first_layer=True, seed=split)
    whole, whole_state = run(inputs, "chunked", chunk_size=16, output_final_state=True)
    head = [x[:, :split] if x is not None else None for x in inputs]
    tail = [x[:, split:] if x is not None else None for x in inputs]
    o1, state = run(head, first, chunk_size=16, output_final_state=True)
    o2, end_state = run(tail, second, chunk_size=16, initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end_state.kv, whole_state.kv, rtol=1e-10, atol=1e-10)


def test_prefill_chunk_by_chunk_then_decode():
    inputs = make_inputs(1, 100, 2, seed=3)
    whole, _ = run(inputs, "reference")
    state, outs = None, []
    for lo, hi in [(0, 30), (30, 61), (61, 95)]:
        o, state = run([x[:, lo:hi] if x is not None else None for x in inputs], "chunked", chunk_size=8,
                       initial_state=state, output_final_state=True)
        outs.append(o)
    for t in range(95, 100):
        o, state = run([x[:, t:t + 1] if x is not None else None for x in inputs], "recurrent",
                       initial_state=state, output_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-10, atol=1e-10)


def test_recurrent_step_without_autograd_equals_the_differentiable_one():
    """Decoding (no autograd) writes the moved state and the token's term into a new buffer in place; it must
    give what the differentiable step gives, padding rows included, and leave the input state untouched."""
    inputs = make_inputs(3, 6, 2, first_layer=True, seed=40)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4] = valid[2, 5] = False
    _, state = run([x[:, :4] for x in inputs], "chunked", chunk_size=4, output_final_state=True)
    before = state.kv.clone()
    tail = [x[:, 4:] for x in inputs]
    with torch.no_grad():
        out, end = run(tail, "recurrent", valid=valid[:, 4:], initial_state=state, output_final_state=True)
    assert torch.equal(state.kv, before)
    grad_tail = [x.detach().requires_grad_(True) for x in tail]
    want, want_end = run(grad_tail, "recurrent", valid=valid[:, 4:], initial_state=state, output_final_state=True)
    assert want.requires_grad
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end.kv, want_end.kv.detach(), rtol=1e-12, atol=1e-12)


def test_recurrent_in_place_writes_the_same_state_over_the_initial_one():
    """in_place=True (a cache that nothing else reads): the same outputs and final state, bit for bit, written
    over the initial state's sums; with a gradient to compute it is ignored and the initial state kept."""
    inputs = make_inputs(3, 7, 2, first_layer=True, seed=41)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[2, 5] = False
    _, state = run([x[:, :4] for x in inputs], "chunked", chunk_size=4, output_final_state=True)
    tail = [x[:, 4:] for x in inputs]
    kw = dict(valid=valid[:, 4:], output_final_state=True)
    with torch.no_grad():
        want, want_end = run(tail, "recurrent", initial_state=state, **kw)
        given = state.clone()
        out, end = run(tail, "recurrent", initial_state=given, in_place=True, **kw)
    assert torch.equal(out, want) and torch.equal(end.kv, want_end.kv)
    assert end.kv.data_ptr() == given.kv.data_ptr() and torch.equal(given.kv, want_end.kv)
    kept = state.clone()
    grad_out, grad_end = run([x.detach().requires_grad_(True) for x in tail], "recurrent", initial_state=kept,
                             in_place=True, **kw)
    assert torch.equal(kept.kv, state.kv) and grad_end.kv.data_ptr() != kept.kv.data_ptr()
    torch.testing.assert_close(grad_out.detach(), want, rtol=1e-12, atol=1e-12)


def test_reference_refuses_initial_state():
    inputs = make_inputs(1, 8, 1)
    _, state = run(inputs, "chunked", output_final_state=True)
    with pytest.raises(ValueError, match="reference.*initial_state"):
        run(inputs, "reference", initial_state=state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fast"), "unknown mode"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(valid=torch.ones(3, 8, dtype=torch.bool)), "valid must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zeros_attention(*make_inputs(1, 8, 1), **kwargs)


def test_bad_shapes():
    q, k, v, s, g1, gh, _ = make_inputs(1, 8, 2)
    with pytest.raises(ValueError, match="s must be"):
        zeros_attention(q, k, v, s[..., :1], g1, gh)
    with pytest.raises(ValueError, match="q and k"):
        zeros_attention(q, k[:, :4], v, s, g1, gh)
    _, state = zeros_attention(q, k, v, s, g1, gh, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        zeros_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], s[..., :1], g1[..., :1], gh[..., :1],
                        initial_state=state)


# ------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("mode", FORMS)
def test_left_padding(mode):
    B, T, H, pad = 2, 40, 2, 7
    inputs = make_inputs(B, T, H, first_layer=True, seed=4)
    alone, _ = run([x[1:, pad:] for x in inputs], mode, chunk_size=16)
    garbage = 1e4 if mode == "reference" else float("nan")  # chunked/recurrent never read padding at all
    padded = []
    for x in inputs:
        x = x.clone()
        x[1, :pad] = garbage
        padded.append(x)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    out, _ = run(padded, mode, chunk_size=16, valid=valid)
    assert torch.equal(out[1, :pad], torch.zeros_like(out[1, :pad]))
    torch.testing.assert_close(out[1:, pad:], alone, rtol=1e-10, atol=1e-10)
    full, _ = run(inputs, mode, chunk_size=16)
    torch.testing.assert_close(out[0], full[0], rtol=1e-10, atol=1e-10)


def test_padding_inside_a_stream_does_not_enter_the_state():
    inputs = make_inputs(1, 30, 2, seed=5)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, 10:14] = False
    for mode in STATEFUL:
        out, state = run(inputs, mode, chunk_size=8, valid=valid, output_final_state=True)
        keep = valid[0]
        alone, alone_state = run([x[:, keep] for x in inputs[:6]] + [None], mode, chunk_size=8,
                                 output_final_state=True)
        torch.testing.assert_close(out[:, keep], alone, rtol=1e-10, atol=1e-10)
        assert state.n[0, 0].item() == 26
        torch.testing.assert_close(state.kv, alone_state.kv, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- gradients


def grads(inputs, mode, **kw):
    out, _ = run(inputs, mode, **kw)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return torch.autograd.grad((out * weight).sum(), [x for x in inputs if x is not None])


@pytest.mark.parametrize("first_layer", [False, True])
@pytest.mark.parametrize("mode", STATEFUL)
def test_gradients_match_reference(first_layer, mode):
    inputs = make_inputs(2, 45, 2, first_layer=first_layer, seed=6, requires_grad=True)
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[1, :5] = False
    expected = grads(inputs, "reference", valid=valid)
    got = grads(inputs, mode, chunk_size=16, valid=valid)
    names = ["q", "k", "v", "s", "g1", "gh", "g0"]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_gradients_through_initial_state():
    inputs = make_inputs(1, 50, 2, first_layer=True, seed=7, requires_grad=True)
    expected = grads(inputs, "reference")
    head = [x[:, :23] for x in inputs]
    tail = [x[:, 23:] for x in inputs]
    o1, state = run(head, "chunked", chunk_size=8, output_final_state=True)
    o2, _ = run(tail, "chunked", chunk_size=8, initial_state=state)
    out = torch.cat([o1, o2], dim=1)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    got = torch.autograd.grad((out * weight).sum(), inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("mode", STATEFUL)
def test_late_spike_leaves_earlier_outputs_unchanged(mode):
    inputs = make_inputs(1, 100, 2, seed=8)
    before, _ = run(inputs, mode, chunk_size=32)
    spiked = list(inputs)
    spiked[3] = inputs[3].clone()
    spiked[3][:, 80] += 120.0
    after, _ = run(spiked, mode, chunk_size=32)
    assert torch.equal(after[:, :80], before[:, :80])
    assert torch.isfinite(after).all()
    ref, _ = run(spiked, "reference")
    torch.testing.assert_close(after, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", FORMS)
def test_extreme_logits_stay_finite(mode):
    inputs = make_inputs(2, 70, 2, first_layer=True, dtype=torch.float32, seed=9, requires_grad=True)
    with torch.no_grad():
        inputs[3].uniform_(-300.0, 300.0)
    out, _ = run(inputs, mode, chunk_size=16)
    assert torch.isfinite(out).all()
    for g in torch.autograd.grad(out.square().sum(), inputs):
        assert torch.isfinite(g).all()


def test_long_float32_stream_stays_close_to_float64():
    """100k tokens, logits of large mean: float32 chunked (and recurrent after a chunked prefix) vs float64."""
    T, prefix, tail = 100_000, 99_500, 200
    inputs64 = make_inputs(1, T, 2, 16, seed=10, logit_mean=20.0, logit_scale=1.0)
    inputs32 = [x.float() if x is not None else None for x in inputs64]
    ref, _ = run(inputs64, "chunked", chunk_size=256)
    out, _ = run(inputs32, "chunked", chunk_size=256)
    assert rel_err(out[:, -tail:].double(), ref[:, -tail:]) <= 1e-3

    head32 = [x[:, :prefix] for x in inputs32[:6]] + [None]
    tail32 = [x[:, prefix:] for x in inputs32[:6]] + [None]
    _, state = run(head32, "chunked", chunk_size=256, output_final_state=True)
    out, _ = run(tail32, "recurrent", initial_state=state)
    assert rel_err(out[:, -tail:].double(), ref[:, -tail:]) <= 1e-3


# ------------------------------------------------------------------------------- zero-sum and contrast


@pytest.mark.parametrize("mode", FORMS)
def test_weights_sum_to_zero(mode):
    """With every q.k = 1 and v = 1, o_t = sum_i r_{t,i}: 0 off the first layer, g0_t on it."""
    B, T, H, d = 2, 40, 2, 4
    _, _, _, s, g1, gh, g0 = make_inputs(B, T, H, d, first_layer=True, seed=11)
    unit = torch.zeros(B, T, H, d, dtype=torch.float64)
    unit[..., 0] = 1.0
    ones = torch.ones(B, T, H, d, dtype=torch.float64)
    out, _ = zeros_attention(unit, unit, ones, s, g1, gh, mode=mode, chunk_size=16)
    assert out.abs().max() <= 1e-12
    out, _ = zeros_attention(unit, unit, ones, s, g1, gh, g0, mode=mode, chunk_size=16)
    torch.testing.assert_close(out, g0.unsqueeze(-1).expand_as(out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", FORMS)
def test_first_output_is_zero_off_the_first_layer(mode):
    out, _ = run(make_inputs(3, 20, 2, seed=12), mode)
    assert out[:, 0].abs().max() <= 1e-15
    out, _ = run(make_inputs(3, 20, 2, first_layer=True, seed=12), mode)
    assert out[:, 0].abs().max() > 1e-3


@pytest.mark.parametrize("mode", FORMS)
def test_one_call_outputs_a_contrast(mode):
    """o_2 = v_1 - v_2 for two tokens: weights (+1, -1), which no convex combination can give.

    With q.k = 1 and logit gap D = s_1 - s_2, r_{2,1} = -r_{2,2} = g1 D/4 + gh (sigmoid(D) - 1/2 - D/4).
    Pick the gates and solve for D so that this is exactly 1.
    """
    g1, gh = 0.9, 0.5
    weight = lambda D: g1 * D / 4 + gh * (1 / (1 + math.exp(-D)) - 0.5 - D / 4)  # noqa: E731
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weight(mid) < 1.0 else (lo, mid)
    gap = (lo + hi) / 2
    d = 4
    q = torch.zeros(1, 2, 1, d, dtype=torch.float64)
    q[..., 0] = 1.0
    v = torch.eye(d, dtype=torch.float64)[:2].reshape(1, 2, 1, d)         # v1 = e1, v2 = e2
    s = torch.tensor([[[gap], [0.0]]], dtype=torch.float64)
    gates = lambda x: torch.full((1, 2, 1), x, dtype=torch.float64)  # noqa: E731
    out, _ = zeros_attention(q, q, v, s, gates(g1), gates(gh), mode=mode)
    torch.testing.assert_close(out[0, 1, 0], v[0, 0, 0] - v[0, 1, 0], rtol=0, atol=1e-12)
    # Coordinates (1, -1) on (v1, v2): a convex combination has both in [0, 1].
    assert out[0, 1, 0, 1] < 0


# ------------------------------------------------------------------------------- memory, state container


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor that any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def saved_bytes(T, chunk_size=32, H=2, d=32):
    """Bytes saved for backward by one chunked call, and the largest tensor made (forward and backward)."""
    inputs = make_inputs(1, T, H, d, dtype=torch.float32, seed=13, requires_grad=True)
    total = 0

    def pack(x):
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out, _ = zeros_attention(*inputs, chunk_size=chunk_size)
        out.sum().backward()
    return total, mode.largest


def test_chunked_memory_is_linear_and_never_per_token_d_by_d():
    T, H, d = 1024, 2, 32
    small, largest_small = saved_bytes(T)
    large, largest_large = saved_bytes(4 * T)
    # The naive prefix-sum form holds a (d, d) matrix per token and head: T * H * d * d numbers.
    assert largest_large < (4 * T) * H * d * d / 8
    # Linear in T: four times the tokens, about four times the saved bytes (not sixteen).
    assert 3.5 <= large / small <= 4.5


def test_state_size_is_independent_of_length():
    sizes = []
    for T in (10, 1000):
        _, state = run(make_inputs(1, T, 2, 8, dtype=torch.float32), "chunked", output_final_state=True)
        sizes.append(state.nbytes)
    assert sizes[0] == sizes[1] == (3 * 8 * 8 + 4) * 2 * 4


def test_state_container_moves_indexes_and_reorders():
    inputs = make_inputs(3, 12, 2, seed=14)
    _, state = run(inputs, "chunked", output_final_state=True)
    order = torch.tensor([2, 0, 0])
    picked = state.index_select(order)
    torch.testing.assert_close(picked.kv, state.kv[order])
    assert state[1].kv.shape[0] == 1
    repeated = state.repeat_interleave(2)
    assert repeated.batch_size == 6 and torch.equal(repeated.m[4], state.m[2])
    assert state.to(torch.float32).kv.dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or float64"):
        state.to(torch.bfloat16)
    # A reordered state continues exactly as the reordered rows would have.
    nxt = make_inputs(3, 5, 2, seed=15)
    out, _ = run(nxt, "recurrent", initial_state=state)
    out_picked, _ = run([x[order] for x in nxt[:6]] + [None], "recurrent", initial_state=picked)
    torch.testing.assert_close(out_picked, out[order])


# ------------------------------------------------------------------------------- packed sequences (cu_seqlens)

# Chunk size 8: segments of 16 then 5 tokens put a boundary on a chunk edge (16) and inside a chunk (21);
# a one-token segment, an empty one, and T = 42 not a multiple of the chunk.
PACKINGS = [[16, 5, 1, 20], [3, 1, 0, 30, 8], [42]]


def offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())


def segments_of(inputs, lengths):
    """The inputs (B = 1) cut into the packed segments."""
    bounds = offsets(lengths).tolist()
    return [[x[:, lo:hi] if x is not None else None for x in inputs] for lo, hi in zip(bounds, bounds[1:])]


def weighted_sum(out):
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return (out * weight).sum()


@pytest.mark.parametrize("lengths", PACKINGS)
@pytest.mark.parametrize("mode", FORMS)
def test_packed_segments_equal_separate_calls(mode, lengths):
    """Outputs, final states (one row per segment) and gradients, against separate reference calls."""
    inputs = make_inputs(1, sum(lengths), 2, first_layer=True, seed=len(lengths), requires_grad=True)
    out, state = run(inputs, mode, chunk_size=8, cu_seqlens=offsets(lengths), output_final_state=True)
    assert state.batch_size == len(lengths)
    got = torch.autograd.grad(weighted_sum(out), inputs)
    empty = ZeroSState.empty(1, 2, 8, 8, dtype=torch.float64)
    alone = [run(piece, "reference", output_final_state=True) if piece[0].shape[1] else (piece[2], empty)
             for piece in segments_of(inputs, lengths)]
    expected_out = torch.cat([o for o, _ in alone], dim=1)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-10)
    expected_state = ZeroSState.cat([st for _, st in alone])
    for name in ("kv", "E", "m", "sbar", "n"):
        torch.testing.assert_close(getattr(state, name), getattr(expected_state, name), rtol=1e-9, atol=1e-10,
                                   msg=name)
    expected = torch.autograd.grad(weighted_sum(expected_out), inputs)
    for name, a, b in zip(["q", "k", "v", "s", "g1", "gh", "g0"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("mode", STATEFUL)
def test_packed_segments_continue_from_initial_state_rows(mode):
    """Each segment starts from its own row of initial_state; gradients reach the rows' own tokens."""
    lengths = [16, 5, 1, 20]
    heads = make_inputs(len(lengths), 11, 2, first_layer=True, seed=20, requires_grad=True)
    tails = make_inputs(1, sum(lengths), 2, first_layer=True, seed=21, requires_grad=True)
    leaves = heads[1:4] + tails  # the state holds the heads' keys, values and logits

    _, state = run(heads, "chunked", chunk_size=8, output_final_state=True)
    out, end = run(tails, mode, chunk_size=8, cu_seqlens=offsets(lengths), initial_state=state,
                   output_final_state=True)
    got = torch.autograd.grad(weighted_sum(out), leaves)

    _, state = run(heads, "chunked", chunk_size=8, output_final_state=True)
    pieces = [run(piece, "chunked", chunk_size=8, initial_state=state[i], output_final_state=True)
              for i, piece in enumerate(segments_of(tails, lengths))]
    expected_out = torch.cat([o for o, _ in pieces], dim=1)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end.kv, torch.cat([st.kv for _, st in pieces]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end.E, torch.cat([st.E for _, st in pieces]), rtol=1e-10, atol=1e-10)
    expected = torch.autograd.grad(weighted_sum(expected_out), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert all(g.abs().max() > 0 for g in got[:3])  # the heads do receive gradient through the states


def test_packed_segments_with_padding_inside():
    lengths = [9, 14, 6]
    inputs = make_inputs(1, sum(lengths), 2, seed=22)
    valid = torch.ones(1, sum(lengths), dtype=torch.bool)
    valid[0, [0, 1, 12, 13, 14, 28]] = False
    ref, ref_state = run(inputs, "reference", valid=valid, cu_seqlens=offsets(lengths), output_final_state=True)
    bounds = offsets(lengths).tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        alone, _ = run([x[:, lo:hi] if x is not None else None for x in inputs], "reference", valid=valid[:, lo:hi])
        torch.testing.assert_close(ref[:, lo:hi], alone, rtol=1e-10, atol=1e-10)
    for mode in STATEFUL:
        out, state = run(inputs, mode, chunk_size=4, valid=valid, cu_seqlens=offsets(lengths), output_final_state=True)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(state.kv, ref_state.kv, rtol=1e-9, atol=1e-10)
        assert state.n[:, 0].tolist() == [7, 11, 5]


@pytest.mark.parametrize("cu_seqlens,match", [
    (torch.tensor([0.0, 4.0, 8.0]), "1-D integer tensor"),
    (torch.tensor([[0, 4, 8]]), "1-D integer tensor"),
    ([0, 4, 8], "1-D integer tensor"),
    (torch.tensor([1, 4, 8]), "start at 0"),
    (torch.tensor([0, 5, 4, 8]), "never decrease"),
    (torch.tensor([0, 4, 7]), "end at T = 8"),
    (torch.tensor([0]), "at least two"),
])
def test_bad_cu_seqlens(cu_seqlens, match):
    with pytest.raises(ValueError, match=match):
        run(make_inputs(1, 8, 1), "chunked", cu_seqlens=cu_seqlens)


def test_cu_seqlens_needs_one_row_and_one_state_row_per_segment():
    with pytest.raises(ValueError, match="B must be 1"):
        run(make_inputs(2, 8, 1), "chunked", cu_seqlens=torch.tensor([0, 4, 8]))
    inputs = make_inputs(1, 8, 1)
    _, state = run(inputs, "chunked", output_final_state=True)
    with pytest.raises(ValueError, match="one row per sequence"):
        run(inputs, "recurrent", cu_seqlens=torch.tensor([0, 4, 8]), initial_state=state)


# ------------------------------------------------------------------------------- fused and auto modes


class SpyCore:
    """Stands in for ops_fused's namespace: the fused entry (the real kernels; Triton's interpreter on CPU),
    recording what ops.py hands it."""

    MIN_CHUNK_SIZE = 16
    MAX_HEAD_DIM = 128

    def __init__(self, real):
        self.real, self.calls, self.segments = real, [], []

    def zeros_chunk_fused(self, *args):
        self.calls.append(args)
        self.segments.append(args[-1].segments)
        return self.real.zeros_chunk_fused(*args)


@pytest.fixture
def spy_core(monkeypatch):
    real = ops._load_fused_core()
    if real is None:
        pytest.skip("Triton or ops_fused.py is not available")
    spy = SpyCore(real)
    monkeypatch.setattr(ops, "_load_fused_core", lambda: spy)
    return spy


def test_fused_mode_runs_the_shared_preparation_through_the_fused_contract(spy_core):
    lengths = [16, 5, 1, 20]
    inputs64 = make_inputs(1, sum(lengths), 2, 16, first_layer=True, seed=30)
    _, state = run(make_inputs(len(lengths), 9, 2, 16, seed=31), "chunked", output_final_state=True)
    ref, ref_state = run(inputs64, "chunked", chunk_size=8, cu_seqlens=offsets(lengths), initial_state=state,
                         output_final_state=True)
    inputs = [x.float() for x in inputs64]
    out, end = run(inputs, "fused", chunk_size=8, cu_seqlens=offsets(lengths), initial_state=state.to(torch.float32),
                   output_final_state=True)
    assert len(spy_core.calls) == 1
    q, k, v, s, g1, gh, g0, valid, stats_in, starts, layout = spy_core.calls[0]
    C, load, num_out = layout.chunk_size, layout.chunk_load, layout.num_out_states
    assert C == 16 and q.shape[1] % C == 0                       # a power of two >= the kernels' minimum
    assert q.dtype == k.dtype == v.dtype == s.dtype == starts.dtype == stats_in.dtype == torch.float32
    assert num_out == len(lengths) and (load >= 0).sum() == len(lengths)
    assert stats_in.shape == (4, len(lengths), 2) and valid.shape == q.shape[:2]  # per-sequence chunks: a valid map
    assert out.dtype == torch.float32 and end.batch_size == len(lengths)
    assert rel_err(out.double(), ref) <= 1e-5
    assert rel_err(end.kv.double(), ref_state.kv) <= 1e-5
    # Mixed dtypes (a model under autocast: float32 q, k and a 16-bit v) reach the kernels as one dtype.
    run(inputs[:2] + [inputs[2].half()] + inputs[3:], "fused", chunk_size=8)
    q, k, v = spy_core.calls[-1][:3]
    assert q.dtype == k.dtype == v.dtype == torch.float32


def test_fused_mode_refuses_float64_and_says_when_triton_is_missing(spy_core, monkeypatch):
    with pytest.raises(ValueError, match="float64"):
        run(make_inputs(1, 8, 1), "fused")
    assert not spy_core.calls
    monkeypatch.setattr(ops, "_load_fused_core", lambda: None)
    with pytest.raises(RuntimeError, match="needs Triton"):
        run(make_inputs(1, 8, 1, dtype=torch.float32), "fused")


def test_auto_picks_chunked_on_cpu(spy_core):
    inputs = make_inputs(2, 40, 2, first_layer=True, dtype=torch.float32, seed=32)
    out, state = run(inputs, "auto", chunk_size=16, output_final_state=True)
    expected, expected_state = run(inputs, "chunked", chunk_size=16, output_final_state=True)
    assert not spy_core.calls
    assert torch.equal(out, expected) and torch.equal(state.kv, expected_state.kv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_fused_on_cuda(spy_core):
    inputs = [x.cuda() for x in make_inputs(1, 40, 2, 16, dtype=torch.float32, seed=33)[:6]]
    run(inputs, "auto", chunk_size=16)
    assert len(spy_core.calls) == 1
    run([x.double() for x in inputs], "auto", chunk_size=16)  # float64: the PyTorch path
    assert len(spy_core.calls) == 1
    wide = [x.cuda() for x in make_inputs(1, 40, 1, 256, dtype=torch.float32, seed=33)[:6]]
    run(wide, "auto", chunk_size=16)  # heads wider than the kernels take: the PyTorch path
    assert len(spy_core.calls) == 1


def test_fused_mode_with_the_real_kernels():
    """zeros_attention(mode="fused") through ops_fused (Triton's interpreter on CPU) == chunked, with gradients."""
    if ops._load_fused_core() is None:
        pytest.skip("Triton or ops_fused.py is not available")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels on a GPU, else the interpreter
    lengths = [20, 1, 11]
    inputs = [x.to(device) for x in make_inputs(1, sum(lengths), 2, 16, first_layer=True, dtype=torch.float32,
                                                 seed=34, requires_grad=True)]
    _, state = run([x.detach().to(device) for x in make_inputs(3, 9, 2, 16, dtype=torch.float32, seed=35)[:6]]
                   + [None], "chunked", output_final_state=True)
    results = {}
    for mode in ("fused", "chunked"):
        out, end = run(inputs, mode, chunk_size=16, cu_seqlens=offsets(lengths), initial_state=state,
                       output_final_state=True)
        results[mode] = (out, end.kv, torch.autograd.grad(weighted_sum(out), inputs))
    (out, kv, got), (ref, ref_kv, expected) = results["fused"], results["chunked"]
    assert rel_err(out, ref) <= 1e-4 and rel_err(kv, ref_kv) <= 1e-4
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-4


# ------------------------------------------------------------------------------- GPU precision of the PyTorch core


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 3e-3), (torch.bfloat16, 1e-2)])
def test_tensor_core_products_stay_accurate_when_logits_are_nearly_uniform(monkeypatch, dtype, tolerance):
    """16-bit q.k and (weights) V (what CUDA gets), here forced on CPU. The weights are formed in float32
    and each row is scaled before rounding, so nearly uniform logits (the cancelling case) at a long-ish
    context stay within 16-bit noise of float64: per-token relative error after the first chunk."""
    inputs = [x.to(dtype) for x in make_inputs(2, 256, 2, 16, seed=36, logit_scale=0.01)[:6]] + [None]
    ref, _ = run([x.double() for x in inputs[:6]] + [None], "reference")
    exact, _ = run(inputs, "chunked", chunk_size=64)
    monkeypatch.setattr(ops, "_tensor_core_products", lambda x: x.dtype in ops._TENSOR_CORE_DTYPES)
    out, _ = run(inputs, "chunked", chunk_size=64)
    assert not torch.equal(out, exact)                           # the 16-bit products did run
    per_token = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_token[:, 64:].max() <= tolerance


# ------------------------------------------------------------------------------- per-row sequences (sequence_starts)


@pytest.mark.parametrize("given", ["tensor", "lengths"])
@pytest.mark.parametrize("mode", FORMS)
def test_sequence_starts_equal_separate_calls(mode, given):
    """Rows of several sequences (a different number per row, so rows get padding chunks at the end),
    from initial_state rows numbered row by row: == one call per sequence, with gradients. The starts
    given as a (B, T) bool tensor or as the rows' lengths (host lists)."""
    T, row_lengths = 30, [[16, 5, 1, 8], [30], [3, 27]]
    starts = torch.zeros(3, T, dtype=torch.bool)
    for r, row in enumerate(row_lengths):
        starts[r, torch.tensor(row).cumsum(0)[:-1]] = True
    inputs = make_inputs(3, T, 2, first_layer=True, seed=40, requires_grad=True)
    S = sum(len(row) for row in row_lengths)
    heads = make_inputs(S, 7, 2, seed=41, requires_grad=True)[1:4] if mode != "reference" else []

    def initial():  # the states after the heads, one row per sequence (a fresh graph each time)
        if not heads:
            return None
        return run([heads[0], heads[0], heads[1], heads[2]] + make_inputs(S, 7, 2, seed=41)[4:6] + [None],
                   "chunked", output_final_state=True)[1]

    out, state = run(inputs, mode, chunk_size=8, sequence_starts=starts if given == "tensor" else row_lengths,
                     initial_state=initial(), output_final_state=True)
    got = torch.autograd.grad(weighted_sum(out), inputs + heads)

    outs, states, i, initial = [], [], 0, initial()
    for r, row in enumerate(row_lengths):
        pieces, lo = [], 0
        for n in row:
            piece = [x[r:r + 1, lo:lo + n] if x is not None else None for x in inputs]
            o, st = run(piece, mode, chunk_size=8, output_final_state=True,
                        initial_state=initial[i] if initial is not None else None)
            pieces.append(o)
            states.append(st)
            lo, i = lo + n, i + 1
        outs.append(torch.cat(pieces, dim=1))
    expected_out = torch.cat(outs)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-10)
    expected_state = ZeroSState.cat(states)
    for name in ("kv", "E", "m", "sbar", "n"):
        torch.testing.assert_close(getattr(state, name), getattr(expected_state, name), rtol=1e-9, atol=1e-10,
                                   msg=name)
    expected = torch.autograd.grad(weighted_sum(expected_out), inputs + heads)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.fixture
def torch_core_calls(monkeypatch):
    """The inputs of every call of the PyTorch chunk core."""
    calls, core = [], ops._chunk_core_torch

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return core(*args, **kwargs)

    monkeypatch.setattr(ops, "_chunk_core_torch", recording)
    return calls


@pytest.mark.parametrize("case", ["rows", "padding", "cu_seqlens", "shared", "starts", "starts_with_states"])
def test_empty_start_states_are_skipped_not_read(case, torch_core_calls):
    """With no initial state the PyTorch core is given no start states (None: every load is a zero state,
    nothing is loaded, moved or read); it answers exactly as when given the zeros themselves (float64):
    outputs, every stored final state, and the gradients. The sequence_starts cases load zero states into
    some rows of a chunk and not others (a sequence starting in one row only)."""
    kw, B, T, final = {}, 2, 37, case not in ("shared", "starts")
    if case == "padding":
        kw["valid"] = torch.ones(B, T, dtype=torch.bool)
        kw["valid"][1, :9] = False
    if case in ("cu_seqlens", "shared"):
        B, lengths = 1, [16, 5, 1, 15]
        kw["cu_seqlens"] = offsets(lengths)
    if case.startswith("starts"):
        kw["sequence_starts"] = [[16, 5, 1, 15], [37]]
    inputs = make_inputs(B, T, 2, first_layer=True, seed=11, requires_grad=True)
    out, state = run(inputs, "chunked", chunk_size=8, output_final_state=final, **kw)
    (args, kwargs), = torch_core_calls
    slot = 3 + len(ChunkScalars.NAMES)
    assert args[slot] is None
    H, d = inputs[0].shape[2:]
    num_out = args[slot + 3]
    zeros = torch.zeros(max(num_out, 1), H, 3, d, d, dtype=torch.float64)
    o_none, states_none = ops._chunk_core_torch(*args, **kwargs)
    o_zeros, states_zeros = ops._chunk_core_torch(*args[:slot], zeros, *args[slot + 1:], **kwargs)
    torch.testing.assert_close(o_none, o_zeros, rtol=0, atol=0)
    torch.testing.assert_close(states_none, states_zeros, rtol=0, atol=0)
    if case in ("rows", "padding", "cu_seqlens"):  # and the final states are those of the other forms
        expected = run(inputs, "reference", output_final_state=True, **kw)[1] if case == "padding" else \
            ZeroSState.cat([run(piece, "recurrent", output_final_state=True)[1]
                            for piece in segments_of(inputs, lengths)]) if case == "cu_seqlens" else \
            run(inputs, "recurrent", output_final_state=True)[1]
        torch.testing.assert_close(state.kv, expected.kv, rtol=1e-9, atol=1e-10)
    grads_none = torch.autograd.grad(weighted_sum(o_none), inputs[:3], allow_unused=True, retain_graph=True)
    grads_zeros = torch.autograd.grad(weighted_sum(o_zeros), inputs[:3], allow_unused=True)
    for a, b in zip(grads_none, grads_zeros):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [4, 8, 64])
@pytest.mark.parametrize("lengths", PACKINGS + [[1] * 9, [7, 9, 3, 13, 2, 8]])
def test_packed_segments_share_chunks_without_states(lengths, chunk_size, torch_core_calls):
    """Training's case (no initial state, no final state): the sequences share chunks, with no alignment
    padding, and the core keeps them apart; outputs and gradients == separate reference calls (float64)."""
    T = sum(lengths)
    inputs = make_inputs(1, T, 2, first_layer=True, seed=T + chunk_size, requires_grad=True)
    out, state = run(inputs, "chunked", chunk_size=chunk_size, cu_seqlens=offsets(lengths))
    assert state is None
    (args, kwargs), = torch_core_calls
    C = min(chunk_size, T)
    assert args[0].shape[1] == -(-T // C) * C and kwargs["segments"] is not None    # the row as it is
    got = torch.autograd.grad(weighted_sum(out), inputs)
    alone = [run(piece, "reference")[0] if piece[0].shape[1] else piece[2]
             for piece in segments_of(inputs, lengths)]
    expected_out = torch.cat(alone, dim=1)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-10)
    expected = torch.autograd.grad(weighted_sum(expected_out), inputs)
    for name, a, b in zip(["q", "k", "v", "s", "g1", "gh", "g0"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("mode", ["chunked", "fused"])
@pytest.mark.parametrize("logit_mean,logit_scale", [(0.0, 2.0), (500.0, 300.0), (-400.0, 300.0)])
def test_shared_chunks_with_padding_and_extreme_logits(logit_mean, logit_scale, mode):
    """Rows of several sequences (sequence_starts) with padding inside, float32, logits far apart across
    the sequences of a chunk: finite, == the float64 reference, and == the chunk-aligned layout (which
    the same call takes when it also returns the final states). The PyTorch core and the fused kernels
    (Triton's interpreter on CPU; their chunk is 16)."""
    if mode == "fused" and ops._load_fused_core() is None:
        pytest.skip("Triton or ops_fused.py is not available")
    device = "cuda" if mode == "fused" and torch.cuda.is_available() else "cpu"
    T, row_lengths = 30, [[16, 5, 1, 8], [12, 18], [3, 27]]
    starts = torch.zeros(3, T, dtype=torch.bool)
    for r, row in enumerate(row_lengths):
        starts[r, torch.tensor(row).cumsum(0)[:-1]] = True
    valid = torch.ones(3, T, dtype=torch.bool)
    valid[0, :3] = valid[1, 10:11] = valid[2, 4] = False
    inputs64 = make_inputs(3, T, 2, first_layer=True, seed=44, logit_mean=logit_mean, logit_scale=logit_scale)
    # Row 1's second sequence starts inside the chunk [8, 16) 1000 below the first one's logits: exp of
    # the difference of their maxima would overflow float32 (and its gradient would be NaN).
    inputs64[3][1, 12:] -= 1000.0
    inputs64 = [x.requires_grad_() if x is not None else None for x in inputs64]
    ref, _ = run(inputs64, "reference", sequence_starts=starts, valid=valid)
    ref_grads = torch.autograd.grad(weighted_sum(ref), inputs64)
    inputs = [x.detach().float().to(device).requires_grad_() for x in inputs64]
    starts, valid = starts.to(device), valid.to(device)
    shared, _ = run(inputs, mode, chunk_size=8, sequence_starts=starts, valid=valid)
    grads = torch.autograd.grad(weighted_sum(shared), inputs)
    assert rel_err(shared.double().cpu(), ref) <= 1e-5
    for name, a, b in zip(["q", "k", "v", "s", "g1", "gh", "g0"], grads, ref_grads):
        assert torch.isfinite(a).all() and rel_err(a.double().cpu(), b) <= 5e-5, name
    aligned, _ = run(inputs, mode, chunk_size=8, sequence_starts=starts, valid=valid, output_final_state=True)
    assert rel_err(shared, aligned) <= 1e-5


@pytest.mark.parametrize("lengths", [[5, 20, 1, 30], [16, 16, 16], [1] * 9 + [30], [40, 3, 17]])
def test_fused_kernels_with_packed_sequences_sharing_chunks(lengths, monkeypatch):
    """The fused kernels' training path (sequences sharing chunks: segments; Triton's interpreter on CPU):
    outputs and gradients of the packed row == separate float64 reference calls, boundaries on and
    inside chunks, one-token sequences."""
    if ops._load_fused_core() is None:
        pytest.skip("Triton or ops_fused.py is not available")
    from zeros_lm import ops_fused

    seen, real = [], ops_fused.zeros_chunk_fused
    monkeypatch.setattr(ops_fused, "zeros_chunk_fused", lambda *a: seen.append(a[-1].segments) or real(*a))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = sum(lengths)
    inputs64 = make_inputs(1, T, 2, 16, first_layer=True, seed=T, requires_grad=True)
    inputs = [x.detach().float().to(device).requires_grad_() for x in inputs64]
    out, state = run(inputs, "fused", chunk_size=16, cu_seqlens=offsets(lengths).to(device))
    assert state is None and seen and seen[0] is not None                    # the shared layout, in the kernels
    got = torch.autograd.grad(weighted_sum(out), inputs)
    expected_out = torch.cat([run(piece, "reference")[0] for piece in segments_of(inputs64, lengths)], dim=1)
    expected = torch.autograd.grad(weighted_sum(expected_out), inputs64)
    assert rel_err(out.double().cpu(), expected_out) <= 1e-5
    for name, a, b in zip(["q", "k", "v", "s", "g1", "gh", "g0"], got, expected):
        assert rel_err(a.double().cpu(), b) <= 5e-5, name


def test_sequence_starts_errors():
    inputs = make_inputs(2, 8, 1)
    with pytest.raises(ValueError, match="sequence_starts must be a"):
        run(inputs, "chunked", sequence_starts=torch.zeros(2, 8))
    for lengths in ([[8]], [[8], [4, 3]], [[8], [8, 0]], [[8], [4.0, 4]], [[8], [True] * 8], [8, 8]):
        with pytest.raises(ValueError, match="sequence_starts as lengths must be B = 2 lists"):
            run(inputs, "chunked", sequence_starts=lengths)
    with pytest.raises(ValueError, match="not both"):
        run(inputs[:6] + [None], "chunked", sequence_starts=torch.zeros(2, 8, dtype=torch.bool),
            cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.parametrize("final_state", [True, False])
def test_sequence_starts_keep_the_rows_parallel_in_the_core(spy_core, final_state):
    """Per-row sequences stay rows in the fused core (its kernels run rows in parallel): chunk-aligned,
    each sequence padded to whole chunks, when a state per sequence comes out; the row as it is, with
    each position's sequence, when none does (training)."""
    starts = torch.zeros(3, 40, dtype=torch.bool)
    starts[:, 17] = True
    inputs = make_inputs(3, 40, 2, 16, dtype=torch.float32, seed=42)
    out, _ = run(inputs[:6] + [None], "fused", chunk_size=16, sequence_starts=starts, output_final_state=final_state)
    q, layout = spy_core.calls[0][0], spy_core.calls[0][-1]
    load, store = layout.chunk_load, layout.chunk_store
    if final_state:
        assert q.shape[0] == 3 and q.shape[1] == 4 * 16                # 17 + 23 tokens: 2 + 2 chunks per row
        assert load.tolist() == [[0, -1, 1, -1], [2, -1, 3, -1], [4, -1, 5, -1]]
        assert store.tolist() == [[-1, 0, -1, 1], [-1, 2, -1, 3], [-1, 4, -1, 5]]
        assert spy_core.segments[0] is None
    else:
        assert q.shape[0] == 3 and q.shape[1] == 3 * 16                # 40 tokens: 3 chunks per row
        assert spy_core.segments[0].tolist() == [[0] * 17 + [1] * 31, [2] * 17 + [3] * 31, [4] * 17 + [5] * 31]
    expected, _ = run(inputs[:6] + [None], "chunked", chunk_size=16, sequence_starts=starts)
    assert rel_err(out, expected) <= 1e-6


def test_chunked_form_traces_as_one_graph():
    """torch.compile(fullgraph=True) of the chunked op: no host synchronisation in the plain path (the
    chunk plan is known on the host), so a compiled model has no graph break in its ZeroS layers."""
    inputs = make_inputs(2, 32, 2, dtype=torch.float32, seed=43)[:6]
    compiled = torch.compile(lambda *x: zeros_attention(*x, chunk_size=16)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs), zeros_attention(*inputs, chunk_size=16)[0], rtol=0, atol=0)


@pytest.mark.parametrize("second", ["fused", "chunked", "recurrent"])
def test_fused_mode_hands_over_state_and_respects_padding(second):
    """Real kernels (Triton's interpreter on CPU): fused on [0, n), then another form on [n, T) == one
    chunked call; left padding gives the unpadded row's outputs on real tokens and 0 elsewhere."""
    if ops._load_fused_core() is None:
        pytest.skip("Triton or ops_fused.py is not available")
    B, T, split, pad = 2, 45, 21, 6
    inputs = make_inputs(B, T, 2, 16, first_layer=True, dtype=torch.float32, seed=44)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    whole, whole_state = run(inputs, "chunked", chunk_size=16, valid=valid, output_final_state=True)
    head = [x[:, :split] for x in inputs]
    tail = [x[:, split:] for x in inputs]
    o1, state = run(head, "fused", chunk_size=16, valid=valid[:, :split], output_final_state=True)
    o2, end = run(tail, second, chunk_size=16, valid=valid[:, split:], initial_state=state, output_final_state=True)
    out = torch.cat([o1, o2], dim=1)
    assert rel_err(out, whole) <= 1e-4 and rel_err(end.kv, whole_state.kv) <= 1e-4
    assert torch.equal(out[1, :pad], torch.zeros_like(out[1, :pad]))
    alone, _ = run([x[1:, pad:] for x in inputs], "chunked", chunk_size=16)
    assert rel_err(out[1:, pad:], alone) <= 1e-4


@pytest.mark.parametrize("T", [1, ops.SCAN_BLOCK - 1, ops.SCAN_BLOCK, ops.SCAN_BLOCK + 1, 3 * ops.SCAN_BLOCK + 7])
def test_blocked_running_sum_equals_cumsum(T):
    """cumsum_tokens' two-level scan (the CUDA path) == cumsum over the tokens, values and gradients;
    integer counts exactly."""
    x = torch.randn(2, T, 3, 5, dtype=torch.float64, requires_grad=True)
    got, expected = ops.cumsum_tokens(x, blocked=True), x.cumsum(1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(expected)
    (g_got,), (g_expected,) = torch.autograd.grad(got, x, w), torch.autograd.grad(expected, x, w)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-12, atol=1e-12)
    counts = torch.randint(0, 2, (2, T))
    assert torch.equal(ops.cumsum_tokens(counts, blocked=True), counts.cumsum(1))
    assert torch.equal(ops.cumsum_tokens(x.detach(), blocked=False), expected.detach())


def test_chunk_layouts_are_built_once_per_batch(monkeypatch):
    """zeros_attention's chunk_layouts: calls on the same batch (B, T, valid tensor, sequences) build the
    chunk layout once; another valid tensor or packing gets its own; a model's forward builds one for all its
    ZeroS layers."""
    from conftest import tiny_model

    built = []
    real = ops._ChunkLayout.build
    monkeypatch.setattr(ops._ChunkLayout, "build", staticmethod(lambda *a, **kw: built.append(a) or real(*a, **kw)))
    inputs = make_inputs(2, 40, 2, dtype=torch.float32, seed=3)
    valid = torch.ones(2, 40, dtype=torch.bool)
    layouts = ops.ChunkLayouts()
    first, _ = run(inputs, "chunked", chunk_size=16, valid=valid, chunk_layouts=layouts)
    again, _ = run(inputs, "chunked", chunk_size=16, valid=valid, chunk_layouts=layouts)
    assert len(built) == 1 and torch.equal(first, again)
    run(inputs, "chunked", chunk_size=16, valid=valid.clone(), chunk_layouts=layouts)
    run(inputs, "chunked", chunk_size=16, sequence_starts=[[10, 30], [40]], chunk_layouts=layouts)
    assert len(built) == 3 and len(layouts) == 3
    built.clear()
    model = tiny_model("zeros", num_hidden_layers=3)
    model(torch.randint(0, model.config.vocab_size, (2, 20)), use_cache=False)
    assert len(built) == 1
