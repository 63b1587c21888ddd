"""The chunked op's CUDA code path in float32: no float64 op, float64's answer on long, spiky streams."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_ops import make_inputs, rel_err, run
from zeros_lm import ops


class Float64Ops(TorchDispatchMode):
    """Records every op that takes or returns a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
        if any(x.dtype == torch.float64 for x in tensors):
            self.seen.append(str(func))
        return out


def packed_inputs(T=48):
    return make_inputs(1, T, 2, 16, first_layer=True, dtype=torch.float32, seed=5, requires_grad=True)


@pytest.mark.parametrize("packing", ["rows", "shared", "aligned"])
def test_no_float64_op_on_the_float32_path(packing, monkeypatch):
    """Forward and backward of the float32 chunked op (the per-token scalars included) never touch float64:
    the same PyTorch code runs on a GPU, where float64 is slow."""
    inputs = packed_inputs()
    kw = {} if packing == "rows" else dict(cu_seqlens=torch.tensor([0, 5, 30, 48]))
    if packing == "aligned":
        kw["output_final_state"] = True
    with Float64Ops() as mode:
        out, _ = run(inputs, "chunked", chunk_size=16, **kw)
        torch.autograd.grad(out.square().sum(), [x for x in inputs if x is not None])
    assert mode.seen == []


def test_float64_ops_are_seen():
    """The guard above can fail: a float64 op is recorded."""
    with Float64Ops() as mode:
        torch.ones(3, dtype=torch.float64).cumsum(0)
    assert mode.seen


@pytest.mark.parametrize("packed", [False, True])
def test_long_spiky_float32_stream_stays_close_to_float64(packed):
    """20k tokens, mean logit 20 with spikes of +-300: float32 (scalars included) within 1e-4 of float64."""
    T = 20_000
    inputs64 = make_inputs(1, T, 2, 16, seed=12, logit_mean=20.0, logit_scale=1.0)
    g = torch.Generator().manual_seed(3)
    spikes = torch.randint(0, T, (100,), generator=g)
    inputs64[3][0, spikes] += 300.0 * (2 * torch.rand(100, 2, generator=g, dtype=torch.float64) - 1)
    inputs32 = [x.float() if x is not None else None for x in inputs64]
    kw = dict(cu_seqlens=torch.tensor([0, 7, 9_000, T])) if packed else {}
    ref, _ = run(inputs64, "chunked", chunk_size=128, **kw)
    out, _ = run(inputs32, "chunked", chunk_size=128, **kw)
    assert rel_err(out.double(), ref) <= 1e-4


def test_chunk_scan_matches_a_plain_scan():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    flat = x.flatten(2)
    expected = {"sum": flat.cumsum(-1), "max": flat.cummax(-1).values, "lse": flat.logcumsumexp(-1)}
    for op, want in expected.items():
        torch.testing.assert_close(ops._chunk_scan(x, op).flatten(2), want, rtol=1e-12, atol=1e-12)


def test_fused_core_writes_the_inputs_16_bit_dtype(monkeypatch):
    """mode="fused" on float16 inputs: the kernels write o (and dq, dk, dv) in float16, no float32 copy."""
    if ops._load_fused_core() is None:
        pytest.skip("Triton or ops_fused.py is not available")
    from zeros_lm import ops_fused

    seen, real = [], ops_fused.zeros_chunk_fused
    monkeypatch.setattr(ops_fused, "zeros_chunk_fused", lambda *a: seen.append(real(*a)) or seen[-1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [x.to(device) for x in make_inputs(1, 32, 2, 16, dtype=torch.float16, seed=4)[:6]]
    inputs = [x.requires_grad_() for x in inputs]
    out, _ = run(inputs, "fused", chunk_size=16)
    (o, out_states, _), = seen
    assert o.dtype == out.dtype == torch.float16 and out_states.dtype == torch.float32
    grads = torch.autograd.grad(out.float().square().sum(), inputs[:3])
    assert all(g.dtype == torch.float16 for g in grads)
