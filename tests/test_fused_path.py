"""The fused (CUDA) path's kernels beyond the chunk core, against the PyTorch path.

- The per-token scalars (ops_fused's scalars kernels) against ops.py's PyTorch scalars in float64: the fused
  path forms the running count, mean, maximum and E~ and the coefficients a, b, hc by chunk-local scans with
  a carry (float32), and differentiates them by a reverse sweep.
- RoPE + L2 normalisation of q and k in one kernel against modeling_zeros' apply_rope + F.normalize.

The chunk core's kernels are tested in test_fused.py. Without a GPU the kernels run in Triton's interpreter.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.test_ops import make_inputs, offsets, rel_err, run, weighted_sum  # noqa: E402
from zeros_lm import ops, ops_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_and_reference(inputs64, C, *, valid=None, lengths=None, shared=False, state=None):
    """The scalars of the kernel (float32 inputs) and of ops._chunk_scalars (float64), for one layout."""
    q, _, _, s, g1, gh, g0 = inputs64
    B, T, H, d = q.shape
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None], 0.0)  # (as zeros_attention does)
    layout = ops._ChunkLayout.build(B, T, valid, lengths, C, "cpu", shared=shared)
    N = layout.num_chunks

    def aligned(x):
        return layout.pack(x).transpose(1, 2).reshape(layout.rows, H, N, C)

    empty = ops.ZeroSState.empty(layout.num_sequences, H, d, d, dtype=torch.float64)
    ref, final = ops._chunk_scalars(aligned(s), aligned(g1), aligned(gh), None if g0 is None else aligned(g0),
                                    state if state is not None else empty, layout)
    per_token = [None if x is None else x.float() for x in (s, g1, gh, g0)]
    if layout.dest is not None:
        per_token = [None if x is None else layout.pack(x) for x in per_token]
    real = layout.valid.flatten(1) if valid is not None or layout.dest is not None else None
    stats_in = None if state is None else torch.stack([state.E, state.m, state.sbar, state.n]).float()
    got, _, stats = ops_fused.fused_scalars(*(x if x is None else x.to(DEVICE) for x in per_token),
                                            None if real is None else real.to(DEVICE),
                                            None if stats_in is None else stats_in.to(DEVICE), layout.core)
    return got, ref, stats.cpu(), final


def field_errors(got, ref):
    return {n: rel_err(getattr(got, n).double().cpu(), getattr(ref, n)) for n in ("s", "m", "a", "b", "hc", "m0", "m1",
                                                                              "sb0", "sb1")}


@pytest.mark.parametrize("case", ["rows", "padding", "shared", "aligned_with_state"])
def test_scalars_kernel_equals_the_pytorch_scalars(case):
    """Every field of ChunkScalars (and the final statistics) == ops._chunk_scalars in float64, to float32
    rounding: plain rows, left padding, sequences sharing chunks, per-sequence chunks continuing states."""
    lengths, valid, state, shared, B = None, None, None, False, 2
    if case == "padding":
        valid = torch.ones(2, 45, dtype=torch.bool)
        valid[1, :7] = False
        valid[0, 20:23] = False  # padding inside a stream too
    if case == "shared":
        lengths, shared, B = [[5, 20, 1, 19]], True, 1
    if case == "aligned_with_state":
        lengths, B = [[5, 20, 1, 19]], 1
        _, state = run(make_inputs(4, 9, 2, 16, seed=31)[:6] + [None], "chunked", output_final_state=True)
    inputs64 = make_inputs(B, 45, 2, 16, first_layer=True, seed=11, logit_mean=3.0)
    got, ref, stats, final = kernel_and_reference(inputs64, 16, valid=valid, lengths=lengths, shared=shared,
                                                  state=state)
    errors = field_errors(got, ref)
    assert max(errors.values()) <= 1e-6, errors
    if not shared:
        for row, name in zip(stats, ("E", "m", "sbar", "n")):
            assert rel_err(row.double(), getattr(ops.ZeroSState(None, *final), name)) <= 1e-6, name


def test_long_spiky_stream_scalars_stay_close_to_float64():
    """10^5 tokens, mean logit 20, spikes of +-300 (the PyTorch path's long-stream test, here for the kernel's
    scans): the float32 chunk-local scans with a carry keep every scalar within 1e-5 of float64."""
    T, C = 100_000, 256
    inputs64 = make_inputs(1, T, 2, 1, seed=10, logit_mean=20.0, logit_scale=1.0)
    g = torch.Generator().manual_seed(3)
    spikes = torch.randint(0, T, (100,), generator=g)
    inputs64[3][0, spikes] += 300.0 * (2 * torch.rand(100, 2, generator=g, dtype=torch.float64) - 1)
    got, ref, _, _ = kernel_and_reference(inputs64, C)
    errors = field_errors(got, ref)
    print("relative errors against float64:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors


def test_gradients_through_the_handed_over_state():
    """Fused on [0, n) then fused on [n, T) from its final state (kv, E~, sbar carry gradients back), and a
    loss on the final statistics themselves: the gradients of every input == the PyTorch chunked path's."""
    inputs = make_inputs(2, 50, 2, 16, first_layer=True, dtype=torch.float32, seed=7, requires_grad=True)
    inputs = [x.detach().to(DEVICE).requires_grad_() for x in inputs]
    results = {}
    for mode in ("fused", "chunked"):
        o1, state = run([x[:, :23] for x in inputs], mode, chunk_size=16, output_final_state=True)
        o2, end = run([x[:, 23:] for x in inputs], mode, chunk_size=16, initial_state=state, output_final_state=True)
        loss = weighted_sum(torch.cat([o1, o2], dim=1)) + (end.E * end.sbar).sum() + state.sbar.square().sum()
        results[mode] = torch.autograd.grad(loss, inputs)
    for name, a, b in zip(["q", "k", "v", "s", "g1", "gh", "g0"], results["fused"], results["chunked"]):
        assert rel_err(a, b) <= 1e-4, name


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_rope_normalize_kernel_equals_the_pytorch_layer(dtype, tolerance):
    """q and k from the fused projection's (B, T, 4, H, d) view (strided), RoPE at padded positions: values
    and the gradient of the projection == apply_rope then F.normalize (float32)."""
    import torch.nn.functional as F

    from zeros_lm.modeling_zeros import apply_rope, rope_cos_sin

    B, T, H, d = 2, 7, 3, 16
    g = torch.Generator().manual_seed(2)
    qkvu = torch.randn(B, T, 4, H, d, generator=g).to(dtype).to(DEVICE).requires_grad_()
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]], device=DEVICE)
    cos, sin = rope_cos_sin(positions, d, 10_000.0)
    expected = F.normalize(apply_rope(qkvu[:, :, :2].float(), cos, sin), dim=-1)
    got = ops_fused.rope_normalize_fused(qkvu[:, :, :2], cos, sin)
    assert got.shape == expected.shape and got.is_contiguous()
    weight = torch.randn(expected.shape, generator=g).to(DEVICE)
    grad_expected, = torch.autograd.grad((expected * weight).sum(), qkvu)
    grad_got, = torch.autograd.grad((got.float() * weight).sum(), qkvu)
    assert rel_err(got.float(), expected) <= tolerance
    assert rel_err(grad_got.float(), grad_expected.float()) <= tolerance
    assert grad_got[:, :, 2:].abs().max() == 0  # v and u take no gradient from q and k



def test_cancelling_readout_in_float16_stays_within_1e_3_of_float64():
    """The kernels' readout of a chunk's start state (16-bit q as it is, the state split into high + low parts,
    the coefficients a, b, hc applied after the products) at nearly uniform logits (spread 0.01: the three
    terms cancel ~180x), float16 inputs: the last chunk's keys are zero, so its outputs are the readout alone;
    within 1e-3 of float64 on the same (float16) inputs."""
    C, T = 16, 128
    inputs = make_inputs(1, T, 2, 16, seed=21, logit_scale=0.01, dtype=torch.float16)[:6] + [None]
    inputs[1][:, -C:] = 0.0                                      # no key inside the last chunk
    ref, _ = run([x.double() for x in inputs[:6]] + [None], "reference")
    out, _ = run([x.to(DEVICE) for x in inputs[:6]] + [None], "fused", chunk_size=C)
    last = slice(T - C, T)
    err = ((out[:, last].double().cpu() - ref[:, last]).norm() / ref[:, last].norm()).item()
    assert err <= 1e-3, err


def _logits_reference(u, mu, log_tau, counts, valid, documents):
    """ZeroSAttention._logits' PyTorch form (deviation logit, no cache)."""
    uf = u.float()
    um = uf if valid is None else uf * valid[:, :, None, None]
    csum = um.cumsum(1) if documents is None else documents.running_sum(um)
    tau = log_tau.exp()
    ubar = (tau[:, None] * mu + csum) / (tau[:, None] + counts[:, :, None, None].float())
    return -(uf * ubar).sum(-1) / u.shape[-1] ** 0.5


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float16, 1e-4)])
@pytest.mark.parametrize("case", ["rows", "padding", "documents"])
def test_deviation_logit_kernel_equals_the_pytorch_layer(dtype, tolerance, case):
    """The logit s in one kernel (a running sum of u over blocks of tokens with a carry, restarting at each
    document): s and the gradients of the projection's u (strided), mu and log_tau == the layer's PyTorch
    form, over more than two token blocks, with padding inside and at the start of rows, and with
    documents starting inside and on the edge of a block."""
    from zeros_lm.packing import PackedDocuments

    B, T, H, d = 2, 150, 3, 16
    g = torch.Generator().manual_seed(4)
    qkvu = torch.randn(B, T, 4, H, d, generator=g).to(dtype).requires_grad_()
    mu = torch.randn(H, d, generator=g).requires_grad_()
    log_tau = torch.randn(H, generator=g).requires_grad_()
    valid, documents, counts = None, None, torch.arange(1, T + 1).expand(B, T)
    if case == "padding":
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, :7] = False
        valid[0, 70:75] = False
        counts = valid.long().cumsum(1)
    if case == "documents":
        positions = torch.cat([torch.arange(n) for n in (7, 57, 86)])[None].repeat(B, 1)  # (a start at 64)
        positions[1] = torch.arange(T)
        documents = PackedDocuments.from_position_ids(positions, None, B, T, "cpu")
        counts = documents.counts
    u = qkvu[:, :, 3]
    expected = _logits_reference(u, mu, log_tau, counts, valid, documents)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    got = ops_fused.deviation_logits_fused(dev(u), dev(mu), dev(log_tau), dev(counts), dev(valid),
                                           None if documents is None else dev(documents.segment)).cpu()
    real = torch.ones(B, T, 1, dtype=torch.bool) if valid is None else valid[:, :, None]
    weight = torch.randn(B, T, H, generator=g) * real
    for name, a, b in zip(("u", "mu", "log_tau"), torch.autograd.grad((got * weight).sum(), [qkvu, mu, log_tau]),
                          torch.autograd.grad((expected * weight).sum(), [qkvu, mu, log_tau])):
        assert rel_err(a.float(), b.float()) <= tolerance, name
    assert rel_err(got * real, expected * real) <= 1e-6
