"""The fused Triton chunk core (zeros_lm/ops_fused.py) against a float64 PyTorch reference of its contract.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (ops_fused picks it by
itself, so no environment variable leaks into other test files). The interpreter gets bfloat16
wrong, so CPU tests cover float32 and float16; bfloat16 is tested on a GPU only.
"""

import dataclasses
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from zeros_lm import ops_fused  # noqa: E402
from zeros_lm.ops_fused import MIN_CHUNK_SIZE, chunk_core_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_NO_MAX = -1e30
F32_TOL, F16_TOL = 1e-4, 5e-3
TOLERANCE = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: 4e-2}
LOGITS = {  # (mean, spread) of the key logits
    "normal": lambda g, n: torch.randn(n, generator=g, dtype=torch.float64),
    "uniform": lambda g, n: 0.01 * torch.randn(n, generator=g, dtype=torch.float64),   # the cancellation case
    "spread": lambda g, n: 500.0 + 300.0 * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1),
}
CORE_ARGS = ("q", "k", "v", "s", "m", "a", "b", "hc", "m0", "m1", "sb0", "sb1", "start_states",
             "chunk_load", "chunk_store")
DIFFERENTIABLE = ("q", "k", "v", "s", "a", "b", "hc", "sb0", "sb1", "start_states")


# ----------------------------------------------------------------------------------------------
# The contract, literally: a loop over chunks in float64
# ----------------------------------------------------------------------------------------------

def core_reference(q, k, v, s, m, a, b, hc, m0, m1, sb0, sb1, start_states, chunk_load, chunk_store,
                   num_out_states, chunk_size):
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))       # (B, H, T, d)
    s, m, a, b, hc, m0, m1, sb0, sb1, start_states = (
        x.double() for x in (s, m, a, b, hc, m0, m1, sb0, sb1, start_states))
    B, H, T, _ = q.shape
    C = chunk_size
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    outputs, out_states = [], {}
    for row in range(B):
        chunks = []
        for j in range(T // C):
            if chunk_load[row, j] >= 0:
                state = start_states[chunk_load[row, j]]           # (H, 3, d_k, d_v)
            F_, G_, H_ = state.unbind(1)
            c = slice(j * C, (j + 1) * C)
            qj, kj, vj = q[row, :, c], k[row, :, c], v[row, :, c]    # (H, C, d)
            sj, mj, aj, bj, hj = (x[row, :, c] for x in (s, m, a, b, hc))
            m0j, m1j, sb0j, sb1j = (x[row, :, j, None] for x in (m0, m1, sb0, sb1))  # (H, 1)
            e = torch.exp((sj[:, None, :] - mj[:, :, None]).clamp(max=0.0))
            r = aj[..., None] * e + bj[..., None] * (sj - sb0j)[:, None, :] + hj[..., None]
            w = (qj @ kj.transpose(-1, -2)) * r * causal
            readout = ((aj * torch.exp(m0j - mj))[..., None, None] * F_[:, None] + bj[..., None, None] * G_[:, None]
                       + hj[..., None, None] * H_[:, None])          # (H, C, d_k, d_v)
            chunks.append(w @ vj + torch.einsum("hck,hckv->hcv", qj, readout))
            kv = lambda coef: torch.einsum("hc,hck,hcv->hkv", coef, kj, vj)  # noqa: E731
            state = torch.stack([torch.exp(m0j - m1j)[..., None] * F_ + kv(torch.exp((sj - m1j).clamp(max=0.0))),
                                 G_ + (sb0j - sb1j)[..., None] * H_ + kv(sj - sb1j),
                                 H_ + kv(torch.ones_like(sj))], dim=1)
            if chunk_store[row, j] >= 0:
                out_states[int(chunk_store[row, j])] = state
        outputs.append(torch.cat(chunks, dim=1))
    o = torch.stack(outputs).transpose(1, 2)
    zero = torch.zeros_like(start_states[0])
    return o, torch.stack([out_states.get(i, zero) for i in range(num_out_states)]) if num_out_states else \
        start_states.new_zeros(0, *start_states.shape[1:])


# ----------------------------------------------------------------------------------------------
# Realistic inputs: the per-token scalars of a ZeroS layer (ops.py's docstring), segment by segment
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Segment:
    length: int
    start: str = "empty"    # "empty": loads the all-zero row 0; "prefix": a state built from earlier tokens
    store: bool = True      # its final state goes to out_states


def _prefix_state(g, n, d_k, d_v, H, logits):
    """The state (kv, E, m, sbar, count) after n random earlier tokens, from its definition, float64."""
    k = F.normalize(torch.randn(H, n, d_k, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(H, n, d_v, generator=g, dtype=torch.float64)
    s = torch.stack([LOGITS[logits](g, n) for _ in range(H)])
    m = s.amax(-1)
    sbar = s.mean(-1)
    e = torch.exp(s - m[:, None])
    kv = torch.stack([torch.einsum("ht,htk,htv->hkv", coef, k, v)
                      for coef in (e, s - sbar[:, None], torch.ones_like(s))], dim=1)
    return kv, e.sum(-1), m, sbar, float(n)


def make_case(rows, *, chunk_size, d_k, d_v, heads=2, dtype=torch.float32, logits="normal", first_layer=False,
              seed=0):
    """Chunk-aligned inputs for chunk_core_fused: each row a list of ``Segment``s, each segment starting
    on a chunk edge and padded to whole chunks; shorter rows end with padding chunks."""
    g = torch.Generator().manual_seed(seed)
    C, H = chunk_size, heads
    n_chunks = [sum(-(-seg.length // C) for seg in row) for row in rows]
    N = max(n_chunks)
    B, T = len(rows), N * C
    q = F.normalize(torch.randn(B, T, H, d_k, generator=g, dtype=torch.float64), dim=-1)
    k = torch.zeros(B, T, H, d_k, dtype=torch.float64)
    v = torch.zeros(B, T, H, d_v, dtype=torch.float64)
    s, m, a, b, hc = (torch.zeros(B, H, T, dtype=torch.float64) for _ in range(5))
    m0, m1, sb0, sb1 = (torch.zeros(B, H, N, dtype=torch.float64) for _ in range(4))
    chunk_load = torch.full((B, N), -1, dtype=torch.int64)
    chunk_store = torch.full((B, N), -1, dtype=torch.int64)
    start_states = [torch.zeros(H, 3, d_k, d_v, dtype=torch.float64)]     # row 0: the empty state
    num_out = 0
    for row, segments in enumerate(rows):
        j = 0
        for seg in segments:
            if seg.start == "prefix":
                kv0, E, m_run, sbar, n0 = _prefix_state(g, 5 + seg.length % 7, d_k, d_v, H, logits)
                chunk_load[row, j] = len(start_states)
                start_states.append(kv0)
            else:
                chunk_load[row, j] = 0
                E, m_run, sbar, n0 = torch.zeros(H, dtype=torch.float64), torch.full((H,), _NO_MAX), torch.zeros(H), 0.0
            L = seg.length
            t0 = j * C
            seg_chunks = -(-L // C)
            tok = slice(t0, t0 + L)
            k[row, tok] = F.normalize(torch.randn(L, H, d_k, generator=g, dtype=torch.float64), dim=-1)
            v[row, tok] = torch.randn(L, H, d_v, generator=g, dtype=torch.float64)
            s_seg = torch.stack([LOGITS[logits](g, L) for _ in range(H)])   # (H, L)
            m_seg = torch.maximum(s_seg.cummax(-1).values, m_run[:, None])
            n_seg = n0 + torch.arange(1, L + 1, dtype=torch.float64)
            sbar_seg = (n0 * sbar[:, None] + s_seg.cumsum(-1)) / n_seg
            E_seg = torch.stack([E[h] * torch.exp(m_run[h] - m_seg[h]) + torch.stack(
                [torch.exp(s_seg[h, :i + 1] - m_seg[h, i]).sum() for i in range(L)]) for h in range(H)])
            g1, gh = (torch.sigmoid(torch.randn(H, L, generator=g, dtype=torch.float64)) for _ in range(2))
            g0 = torch.tanh(torch.randn(H, L, generator=g, dtype=torch.float64)) if first_layer else 0.0
            b_seg = (g1 - gh) / n_seg
            c_seg = (g0 - gh) / n_seg
            # Per token with padding carried forward to the segment's chunk end.
            pad = seg_chunks * C - L
            ext = lambda x: torch.cat([x, x[:, -1:].expand(H, pad)], dim=-1)  # noqa: E731
            m_ext, sbar_ext = ext(m_seg), ext(sbar_seg)
            span = slice(t0, t0 + seg_chunks * C)
            s[row, :, tok] = s_seg
            m[row, :, span] = m_ext
            a[row, :, span] = ext(gh / E_seg)
            b[row, :, span] = ext(b_seg)
            for jj in range(seg_chunks):
                first = t0 + jj * C
                m0[row, :, j + jj] = m_run if jj == 0 else m[row, :, first - 1]
                sb0[row, :, j + jj] = sbar if jj == 0 else sbar_ext[:, jj * C - 1]
                m1[row, :, j + jj] = m_ext[:, (jj + 1) * C - 1]
                sb1[row, :, j + jj] = sbar_ext[:, (jj + 1) * C - 1]
                c = slice(jj * C, (jj + 1) * C)
                hc[row, :, first:first + C] = ext(b_seg)[:, c] * (sb0[row, :, j + jj, None] - sbar_ext[:, c]) + ext(c_seg)[:, c]
            j += seg_chunks
            if seg.store:
                chunk_store[row, j - 1] = num_out
                num_out += 1
        for jj in range(j, N):   # trailing padding chunks continue the row's last state
            m0[row, :, jj] = m1[row, :, jj] = m[row, :, j * C - 1]
            sb0[row, :, jj] = sb1[row, :, jj] = sb1[row, :, j - 1]
            m[row, :, jj * C:(jj + 1) * C] = m[row, :, j * C - 1, None]
    args = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), s=s, m=m, a=a, b=b, hc=hc, m0=m0, m1=m1, sb0=sb0,
                sb1=sb1, start_states=torch.stack(start_states), chunk_load=chunk_load, chunk_store=chunk_store)
    args = {name: (x if x.dtype in (torch.int64, dtype) else x.float()).to(DEVICE) for name, x in args.items()}
    return args, num_out


# Tokens whose reference is this far below the largest (o_1 = 0 off the first layer, padding) are
# measured against this fraction of the largest instead.
FLOOR = 1e-3


def _rel(x, ref):
    """Relative error, per token for (B, T, H, d) tensors (norm over d) and per entry for (B, H, T)
    and (B, H, N) ones, so that a small output (the cancelling case) is held to the same standard as a
    large one; states (5 dims) against their largest entry."""
    err, ref = (x.double() - ref).abs(), ref.abs()
    if x.dim() == 4:
        err, ref = err.norm(dim=-1), ref.norm(dim=-1)
    top = ref.max().clamp(min=1e-30)
    if x.dim() == 5:
        return (err.max() / top).item()
    return (err / ref.clamp(min=FLOOR * top)).max().item()


def check_against_reference(rows, *, chunk_size, dtype=torch.float32, tol=None, **kwargs):
    """Outputs, out_states and the gradients of every differentiable input agree with float64."""
    args, num_out = make_case(rows, chunk_size=chunk_size, dtype=dtype, **kwargs)
    tol = TOLERANCE[dtype] if tol is None else tol
    g = torch.Generator().manual_seed(1)
    o_shape = (*args["q"].shape[:3], args["v"].shape[-1])
    do = torch.randn(o_shape, generator=g).to(DEVICE)
    d_out = torch.randn(num_out, *args["start_states"].shape[1:], generator=g).to(DEVICE)

    fused_in = {n: x.detach().clone().requires_grad_(n in DIFFERENTIABLE) for n, x in args.items()}
    o, out = chunk_core_fused(*(fused_in[n] for n in CORE_ARGS), num_out, chunk_size)
    ((o * do).sum() + (out * d_out).sum()).backward()

    ref_in = {n: x.detach().cpu().double().requires_grad_(n in DIFFERENTIABLE) if x.is_floating_point() else x.cpu()
              for n, x in args.items()}
    o_ref, out_ref = core_reference(*(ref_in[n] for n in CORE_ARGS), num_out, chunk_size)
    ((o_ref * do.cpu().double()).sum() + (out_ref * d_out.cpu().double()).sum()).backward()

    assert o.dtype == torch.float32 and o.shape == o_ref.shape and out.shape == out_ref.shape
    errors = {"o": _rel(o.cpu(), o_ref), "out_states": _rel(out.cpu(), out_ref)}
    for n in DIFFERENTIABLE:
        assert fused_in[n].grad.dtype == fused_in[n].dtype, n
        errors["d" + n] = _rel(fused_in[n].grad.cpu(), ref_in[n].grad)
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


# ----------------------------------------------------------------------------------------------
# Agreement with the reference
# ----------------------------------------------------------------------------------------------

def test_plain_rows_float32():
    """B = 2 rows of one sequence each, several chunks, every state stored."""
    check_against_reference([[Segment(64)], [Segment(64)]], chunk_size=16, d_k=16, d_v=16)


def test_one_token_float32():
    """T = 1: one chunk that is almost all padding, first layer (g0) on."""
    check_against_reference([[Segment(1)]], chunk_size=16, d_k=32, d_v=16, first_layer=True)


@pytest.mark.parametrize("split_block", [None, 16])
def test_varlen_float32(monkeypatch, split_block):
    """Packed rows: a loaded prefix state, a reset mid-row, a one-token segment, an unstored
    segment, a row shorter than the other (padding chunks), and the empty row loaded several times;
    d_k = 32 and d_v = 48 in one block each (the backward's d_v loop in blocks of 16), and everything in
    blocks of 16 (2 x 3 programs per row and head for the states kernels, 3 output programs per chunk)."""
    if split_block:
        monkeypatch.setattr(ops_fused, "STATE_TILE", split_block)
        monkeypatch.setattr(ops_fused, "CHUNK_BWD_BLOCK_V", split_block)
    rows = [[Segment(40, "prefix"), Segment(1), Segment(20, store=False)],
            [Segment(33, "prefix"), Segment(16, "prefix")]]
    check_against_reference(rows, chunk_size=32, d_k=32, d_v=48, heads=1, first_layer=True)


@pytest.mark.parametrize("logits", ["normal", "uniform", "spread"])
def test_float16(logits):
    """fp16 q/k/v against float64, including nearly uniform logits (the three terms of R cancel; by
    t ~ 150 their weights ~ 0.01 / t are fp16 subnormals unless scaled) and logits with a large mean
    and a +-300 spread."""
    rows = [[Segment(20, "prefix"), Segment(150)], [Segment(170)]]
    check_against_reference(rows, chunk_size=32, d_k=16, d_v=16, dtype=torch.float16, logits=logits)


def test_float16_wide_heads():
    check_against_reference([[Segment(50, "prefix")]], chunk_size=32, d_k=64, d_v=64, heads=1,
                            dtype=torch.float16, logits="uniform")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU (the interpreter computes it wrong)")
@pytest.mark.parametrize("logits", ["normal", "uniform"])
def test_bfloat16_gpu(logits):
    rows = [[Segment(300, "prefix"), Segment(100)], [Segment(400)]]
    check_against_reference(rows, chunk_size=64, d_k=64, d_v=64, heads=4, dtype=torch.bfloat16, logits=logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_long_float16_gpu():
    """Long rows (weights ~ 1/t get small) in fp16 on the compiled kernels."""
    check_against_reference([[Segment(4000)]], chunk_size=64, d_k=64, d_v=64, heads=2, dtype=torch.float16)


# ----------------------------------------------------------------------------------------------
# Refusals and misc
# ----------------------------------------------------------------------------------------------

def _small_args(dtype=torch.float32):
    return make_case([[Segment(16)]], chunk_size=16, d_k=16, d_v=16, heads=1, dtype=dtype)


def test_float64_is_refused():
    args, num_out = _small_args()
    args.update(q=args["q"].double(), k=args["k"].double(), v=args["v"].double())
    with pytest.raises(ValueError, match="float64"):
        chunk_core_fused(*(args[n] for n in CORE_ARGS), num_out, 16)


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE // 2, 24])
def test_bad_chunk_size_is_refused(chunk_size):
    args, num_out = _small_args()
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_core_fused(*(args[n] for n in CORE_ARGS), num_out, chunk_size)


def test_bad_shape_is_refused():
    args, num_out = _small_args()
    args["m0"] = args["m0"][..., :0]
    with pytest.raises(ValueError, match="m0"):
        chunk_core_fused(*(args[n] for n in CORE_ARGS), num_out, 16)


def test_no_out_states_and_no_grad():
    """num_out_states = 0 and a forward without autograd both work; the result matches the reference."""
    args, _ = _small_args()
    with torch.no_grad():
        o, out = chunk_core_fused(*(args[n] for n in CORE_ARGS), 0, 16)
    o_ref, _ = core_reference(*(args[n].cpu() for n in CORE_ARGS), 0, 16)
    assert out.shape == (0, 1, 3, 16, 16)
    assert _rel(o.cpu(), o_ref) <= F32_TOL
    assert not math.isnan(o.sum().item())


# ----------------------------------------------------------------------------------------------
# The compiled (GPU) kernels, built without a GPU
# ----------------------------------------------------------------------------------------------

# benchmarks/kernel_stats.py, in a fresh interpreter without TRITON_INTERPRET, compiles each kernel for
# sm_90 (ptxas included) at the largest supported head dimension, bf16, the default chunk, with the
# launchers' block sizes and launch options, and prints each kernel's shared memory. Exit 3: this
# Triton's compile API differs.
# A100's shared memory per block (H100 / H200 have more): the kernels must fit the smaller.
MAX_SHARED_BYTES = 163 * 1024


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests run the compiled kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs kernels as Python and misses what only the compiler rejects (tl.dot shapes,
    loop-carried types, shared memory); Triton's ahead-of-time compiler checks them on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "kernel_stats.py"), "--no-ptxas",
                           "--head-dim", str(ops_fused.MAX_HEAD_DIM)], capture_output=True, text=True, env=env, cwd=repo)
    if proc.returncode == 3:
        pytest.skip("this Triton version's ahead-of-time compile API differs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = {row[0]: row[2] for row in (line.strip("| ").split(" | ") for line in proc.stdout.splitlines())
              if row[0].startswith("_") and row[0].endswith("_kernel")}
    assert len(shared) == 11, proc.stdout  # scalars (2), core (5), RoPE + L2 norm (2) and logit (2) kernels
    assert all(int(x) <= MAX_SHARED_BYTES for x in shared.values()), shared


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests run the compiled kernels")
def test_no_register_spills_at_head_dim_64():
    """Issue 26's target for the kernels' tiles: compiled for sm_90 (bf16, d = 64, the default chunk, the
    launchers' tiles and launch options), ptxas reports no spill stores or loads in any kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "kernel_stats.py"), "--head-dim", "64"],
                          capture_output=True, text=True, env=env, cwd=repo)
    if proc.returncode == 3:
        pytest.skip("this Triton version's ahead-of-time compile API differs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for row in (line.strip("| ").split(" | ") for line in proc.stdout.splitlines())
            if row[0].startswith("_") and row[0].endswith("_kernel")]
    if any(row[3] == "-" for row in rows):
        pytest.skip("no ptxas next to this Triton")
    assert len(rows) == 11 and all(row[4] == row[5] == "0" for row in rows), proc.stdout


# ----------------------------------------------------------------------------------------------
# torch.library registration: one opaque node for torch.compile, forward and backward
# ----------------------------------------------------------------------------------------------

def _compile_case(dtype=torch.float32):
    """The core's inputs with the per-token scalars (B, H, T) as transposed views of (B, T, H) tensors, as
    the model passes them (the op's fake kernels must give the strides its real kernels return)."""
    args, num_out = make_case([[Segment(20, "prefix"), Segment(30)]], chunk_size=16, d_k=16, d_v=16, heads=2,
                              dtype=dtype)
    per_token = ("s", "m", "a", "b", "hc")
    inputs = [args[n].transpose(1, 2).contiguous().transpose(1, 2) if n in per_token else args[n].clone()
              for n in CORE_ARGS]
    assert not inputs[CORE_ARGS.index("s")].is_contiguous()
    return [x.requires_grad_(n in DIFFERENTIABLE) for n, x in zip(CORE_ARGS, inputs)], num_out


def _num_loads(inputs):
    """The custom ops' num_loads argument: how many chunks load a start state."""
    return int((inputs[CORE_ARGS.index("chunk_load")] >= 0).sum())


def test_custom_op_registration():
    """torch.library's own checks: schema, fake (meta) kernel, autograd registration (fp16 inputs, so
    that the fake kernel's float32 outputs are checked against the real ones)."""
    inputs, num_out = _compile_case(torch.float16)
    torch.library.opcheck(ops_fused._chunk_core_op, (*inputs, num_out, 16, _num_loads(inputs), None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    """A compiled function around the op has no graph break (fullgraph) and gives eager's values
    and gradients."""
    results = []
    for compiled in (False, True):
        inputs, num_out = _compile_case()
        plan = tuple(inputs[CORE_ARGS.index(n)].tolist() for n in ("chunk_load", "chunk_store"))  # as ops.py passes it

        def loss(*xs):
            o, out = chunk_core_fused(*xs, num_out, 16, plan=plan)
            return (o * o).sum() + out.sum()

        fn = torch.compile(loss, fullgraph=True) if compiled else loss
        # Compiled afresh: inductor's on-disk caches key a graph by its source, not by the custom ops' schemas,
        # so code cached before a schema change would be reused.
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            value = fn(*inputs)
        value.backward()
        results.append([value.detach()] + [x.grad for x in inputs if x.requires_grad])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)  # (inductor reorders the sums)


# ----------------------------------------------------------------------------------------------
# A whole model: the fused path (attention_backend="auto" on CUDA) against the PyTorch path
# ----------------------------------------------------------------------------------------------

def _logits_and_grads(model, ids, mask, autocast_dtype=None, position_ids=None):
    """Logits (B, T, V) and the flattened parameter gradients of a next-token loss over real tokens."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float() * mask[..., None], grads


def _norm_rel(x, ref):
    """||x - ref|| / ||ref|| over the whole tensor (a model's logits or all its gradients at once)."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _model_case(device, hidden, heads, chunk_size, T):
    from conftest import tiny_model

    model = tiny_model("zeros", hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden,
                       chunk_size=chunk_size).to(device).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, model.config.vocab_size, (2, T), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, : T // 3] = 0  # row 1 left-padded
    return model, ids, mask


def _count_fused_calls(monkeypatch):
    calls = []
    real = ops_fused.zeros_chunk_fused

    def counted(*args):
        calls.append(args[-1].segments)  # (per call: the packed sequences' ids, or None)
        return real(*args)

    monkeypatch.setattr(ops_fused, "zeros_chunk_fused", counted)
    return calls


@pytest.mark.parametrize("packed", [False, True])
def test_model_fused_matches_torch_backend(monkeypatch, packed):
    """A 2-layer model with left padding (and packed documents: position_ids restarting inside a chunk),
    float32: logits and every parameter gradient of the fused path == the PyTorch chunked path (on CPU
    the fused path is forced and runs in the interpreter)."""
    from zeros_lm import ops

    model, ids, mask = _model_case(DEVICE, hidden=32, heads=2, chunk_size=MIN_CHUNK_SIZE, T=40)
    position_ids = None
    if packed:  # row 0: documents of 7, 16 and 17 tokens; row 1 (left-padded): one document
        mask[:] = 1
        position_ids = torch.cat([torch.arange(n) for n in (7, 16, 17)])[None].repeat(2, 1).to(DEVICE)
        position_ids[1] = torch.arange(40)
    model.config.attention_backend = "torch"
    ref_logits, ref_grads = _logits_and_grads(model, ids, mask, position_ids=position_ids)
    model.config.attention_backend = "auto"
    calls = _count_fused_calls(monkeypatch)
    if DEVICE == "cpu":  # (the op's choice, and the layer's for RoPE + L2 norm)
        from zeros_lm import modeling_zeros
        for module in (ops, modeling_zeros):
            monkeypatch.setattr(module, "fused_applies", lambda q, v: True)
    logits, grads = _logits_and_grads(model, ids, mask, position_ids=position_ids)
    assert len(calls) == model.config.num_hidden_layers
    assert all((segments is not None) == packed for segments in calls)
    assert _norm_rel(logits, ref_logits) <= F32_TOL
    assert _norm_rel(grads, ref_grads) <= F32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 model activations need a GPU")
def test_model_fused_bfloat16_within_bf16_noise(monkeypatch):
    """bf16 autocast (as training runs): the fused path's logits and gradients are as close to the float32
    PyTorch path as the PyTorch path's own bf16 run is (within 1.5x of its error, plus a floor)."""
    model, ids, mask = _model_case(DEVICE, hidden=256, heads=4, chunk_size=64, T=300)
    model.config.attention_backend = "torch"
    ref = _logits_and_grads(model, ids, mask)
    torch_bf16 = _logits_and_grads(model, ids, mask, torch.bfloat16)
    model.config.attention_backend = "auto"
    calls = _count_fused_calls(monkeypatch)
    fused_bf16 = _logits_and_grads(model, ids, mask, torch.bfloat16)
    assert len(calls) == model.config.num_hidden_layers
    for what, got, noise, exact in zip(("logits", "gradients"), fused_bf16, torch_bf16, ref):
        err, noise_err = _norm_rel(got, exact), _norm_rel(noise, exact)
        print(f"bf16 {what}: fused {err:.2e}, PyTorch path {noise_err:.2e} (relative to the float32 PyTorch path)")
        assert err <= 1.5 * noise_err + 1e-3, (what, err, noise_err)


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_fake_kernels_give_the_real_strides(op):
    """Shapes, dtypes and strides of the ops' fake (meta) kernels == what the real kernels return, for
    inputs with the model's strides: compiled code asserts them (a mismatch fails every compiled step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs, num_out = _compile_case(torch.float16)
    inputs = [x.detach() for x in inputs]
    if op == "forward":
        fn, args = ops_fused._chunk_core_op, (*inputs, num_out, 16, _num_loads(inputs), None)
    else:
        o, out = chunk_core_fused(*inputs, num_out, 16)
        fn, args = ops_fused._chunk_core_backward_op, (torch.randn_like(o), torch.randn_like(out), *inputs, 16,
                                                      _num_loads(inputs), None)
    real = fn(*args)
    with FakeTensorMode() as mode:
        fake = fn(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args))
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
