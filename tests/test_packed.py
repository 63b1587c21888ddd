"""Packed documents: position_ids that restart at 0 keep every attention type inside its document."""

import itertools

import pytest
import torch
from conftest import ATTENTION_TYPES, tiny_model

from zeros_lm import ZeroSCache, ZeroSConfig, ops_softmax
from zeros_lm.modeling_zeros import PackedDocuments, packed_position_ids

# chunk_size 4 (tiny_config): in row 0 the documents 4 | 3 | 1 | 6 put a boundary on a chunk edge (4),
# inside a chunk (7) and a one-token document (at 7); row 1 is two documents after two padding tokens
# (or, unpadded, a third document of two tokens: without an attention mask softmax takes its varlen path).
ROWS = [[4, 3, 1, 6], [7, 5]]
LEFT_PAD = [0, 2]
UNPADDED_ROWS = [[4, 3, 1, 6], [7, 5, 2]]
WIDTH = 14


def packed_batch(seed=0, rows=ROWS, left_pad=LEFT_PAD):
    """input_ids, attention_mask, position_ids (B, WIDTH) and, per row, (column, length, ids) of its documents."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(len(rows), WIDTH, dtype=torch.long)                 # pad id 1
    mask = torch.zeros(len(rows), WIDTH, dtype=torch.long)
    positions = torch.zeros(len(rows), WIDTH, dtype=torch.long)          # padding at 0, as generate() numbers it
    documents = []
    for row, (lengths, pad) in enumerate(zip(rows, left_pad)):
        column, docs = pad, []
        for n in lengths:
            doc = torch.randint(2, 320, (n,), generator=g)
            ids[row, column:column + n] = doc
            mask[row, column:column + n] = 1
            positions[row, column:column + n] = torch.arange(n)
            docs.append((column, n, doc))
            column += n
        assert column == WIDTH
        documents.append(docs)
    return ids, mask, positions, documents


def logits_and_grads(model, weight, **inputs):
    logits = model(**inputs, use_cache=False).logits
    params = [p for p in model.parameters() if p.requires_grad]
    return logits, torch.autograd.grad((logits * weight).sum(), params, allow_unused=True)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_packed_documents_equal_each_document_alone(attention_type, padded, monkeypatch):
    """Logits of every real token and the gradients of every parameter, float64. Softmax: padded rows
    take the block-diagonal mask, unpadded ones (made to) one SDPA call per document."""
    monkeypatch.setattr(ops_softmax, "_SDPA_CALL_PAIRS", 0)
    model = tiny_model(attention_type).double()
    ids, mask, positions, documents = packed_batch() if padded else packed_batch(rows=UNPADDED_ROWS, left_pad=[0, 0])
    weight = torch.randn(len(ROWS), WIDTH, model.config.vocab_size, dtype=torch.float64)
    weight = weight * mask[..., None]                                    # padding's logits are not compared
    packed, packed_grads = logits_and_grads(model, weight, input_ids=ids, attention_mask=mask if padded else None,
                                            position_ids=positions)

    grads = None
    for row, docs in enumerate(documents):
        for column, n, doc in docs:
            piece = slice(column, column + n)
            alone, alone_grads = logits_and_grads(model, weight[row:row + 1, piece], input_ids=doc[None])
            torch.testing.assert_close(packed[row, piece], alone[0], rtol=0, atol=1e-10)
            grads = alone_grads if grads is None else [
                a if b is None else (b if a is None else a + b) for a, b in zip(grads, alone_grads)]
    for got, expected in zip(packed_grads, grads):
        if expected is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_position_ids_without_restarts_change_nothing(attention_type):
    """Plain positions, and the left-padded numbering generate() passes, are not document boundaries."""
    model = tiny_model(attention_type)
    ids = torch.randint(2, 320, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    generate_style = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, use_cache=False).logits
        numbered = model(ids, attention_mask=mask, position_ids=generate_style, use_cache=False).logits
    assert torch.equal(plain, numbered)
    with torch.no_grad():  # and generation keeps its cache
        assert model(ids, attention_mask=mask, position_ids=generate_style).cache is not None


def test_packed_documents_refuse_a_cache_and_return_none():
    model = tiny_model("zeros")
    ids, mask, positions, _ = packed_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions)           # eval mode: use_cache by default
        assert out.cache is None
        with pytest.raises(ValueError, match="packed documents"):
            model(ids, attention_mask=mask, position_ids=positions, cache=ZeroSCache(model.config))
        with pytest.raises(ValueError, match="position_ids must have shape"):
            model(ids, position_ids=positions[:, :5])


def test_torch_backend_is_the_pytorch_path():
    """attention_backend="torch" forces the PyTorch chunked form; on CPU "auto" picks it too."""
    auto = tiny_model("zeros")
    torch_backend = tiny_model("zeros", attention_backend="torch")
    ids, mask, positions, _ = packed_batch()
    with torch.no_grad():
        for inputs in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask, position_ids=positions)):
            assert torch.equal(auto(**inputs).logits, torch_backend(**inputs).logits)
    with pytest.raises(ValueError, match="attention_backend"):
        ZeroSConfig(attention_backend="triton")


def test_documents_stay_in_their_rows():
    """Boundaries per row (padding before a row's first document belongs to it), counts restart."""
    ids, mask, positions, _ = packed_batch()
    documents = PackedDocuments.from_position_ids(positions, mask.bool(), *ids.shape, "cpu")
    assert documents.row_lengths == [[4, 3, 1, 6], [9, 5]]
    assert documents.counts[0].tolist() == [1, 2, 3, 4, 1, 2, 3, 1, 1, 2, 3, 4, 5, 6]
    assert documents.counts[1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_position_ids_from_separators(attention_type):
    """A pre-training block (doc SEP doc SEP ...): each separator opens the next document."""
    eos = 0
    block = torch.tensor([[5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, eos, 14]])
    positions = packed_position_ids(block, eos)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    model = tiny_model(attention_type).double()
    with torch.no_grad():
        packed = model(block, position_ids=positions, use_cache=False).logits
        for lo, hi in [(0, 3), (3, 6), (6, 11), (11, 13)]:
            alone = model(block[:, lo:hi], use_cache=False).logits
            torch.testing.assert_close(packed[:, lo:hi], alone, rtol=0, atol=1e-10)


def test_softmax_packed_kernel_choice():
    """Packed softmax: on a CPU long rows of short documents go per document, short rows keep the mask; on
    CUDA half precision at a flash head size takes varlen attention, anything else the mask."""
    choose = ops_softmax._packed_softmax_kernel
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long_row, short_rows = [[200] * 10 + [48]], [[200, 56]] * 8
    assert choose(long_row, 2048, cpu, torch.float32, 64) == "per_document"
    assert choose(short_rows, 256, cpu, torch.float32, 64) == "mask"
    assert choose([[2048]], 2048, cpu, torch.float32, 64) == "mask"          # one document: nothing to save
    assert choose(short_rows, 256, cuda, torch.bfloat16, 64) == "varlen"
    assert choose(long_row, 2048, cuda, torch.float16, 128) == "varlen"
    assert choose(long_row, 2048, cuda, torch.float32, 64) == "mask"         # flash takes half precision only
    assert choose(long_row, 2048, cuda, torch.bfloat16, 12) == "mask"        # head size not a multiple of 8
    assert choose(long_row, 2048, cuda, torch.bfloat16, 512) == "mask"       # beyond flash's head sizes
    assert choose(long_row, 2048, torch.device("mps"), torch.float16, 64) == "mask"


def reference_varlen(calls):
    """A stand-in for torch's varlen_attn (CUDA only) with its newer signature: per document of the flattened
    (N, H, d) tokens, explicit causal softmax attention; records each call's arguments in ``calls``."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        calls.append({"window_size": window_size, "cu": cu_seq_q.tolist(), "max": (max_q, max_k),
                      "dtype": cu_seq_q.dtype, "shape": tuple(query.shape)})
        assert torch.equal(cu_seq_q, cu_seq_k)
        bounds, pieces = cu_seq_q.tolist(), []
        for lo, hi in zip(bounds, bounds[1:]):
            scores = torch.einsum("ihd,jhd->hij", query[lo:hi], key[lo:hi]) / query.shape[-1] ** 0.5
            future = torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1) & (window_size[1] == 0)  # (-1, 0): causal
            weights = scores.masked_fill(future, float("-inf")).softmax(-1)
            pieces.append(torch.einsum("hij,jhd->ihd", weights, value[lo:hi]))
        return torch.cat(pieces)
    return varlen_attn


@pytest.fixture
def fresh_varlen():
    ops_softmax._varlen_causal_attention.cache_clear()
    yield
    ops_softmax._varlen_causal_attention.cache_clear()


def test_softmax_varlen_path_equals_each_document_alone(monkeypatch, fresh_varlen):
    """The varlen route's layout (rows laid end to end, cu_seqlens over every row's documents, int32, the
    longest document as max length, the causal switch of this torch's signature), checked on the CPU
    through a stand-in for the CUDA kernel: packed logits and gradients equal each document alone."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen(calls))
    monkeypatch.setattr(ops_softmax, "_packed_softmax_kernel", lambda *args: "varlen")
    model = tiny_model("softmax").double()
    ids, _, positions, documents = packed_batch(rows=UNPADDED_ROWS, left_pad=[0, 0])
    weight = torch.randn(len(UNPADDED_ROWS), WIDTH, model.config.vocab_size, dtype=torch.float64)
    packed, packed_grads = logits_and_grads(model, weight, input_ids=ids, position_ids=positions)
    assert len(calls) == model.config.num_hidden_layers
    lengths = [n for row in UNPADDED_ROWS for n in row]
    assert calls[0]["cu"] == [0, *itertools.accumulate(lengths)] and calls[0]["dtype"] == torch.int32
    assert calls[0]["max"] == (max(lengths), max(lengths)) and calls[0]["window_size"] == (-1, 0)
    assert calls[0]["shape"] == (len(UNPADDED_ROWS) * WIDTH, model.config.num_attention_heads, model.config.head_dim)

    monkeypatch.setattr(ops_softmax, "_packed_softmax_kernel", lambda *args: "mask")
    masked, masked_grads = logits_and_grads(model, weight, input_ids=ids, position_ids=positions)
    torch.testing.assert_close(packed, masked, rtol=0, atol=1e-10)
    for got, expected in zip(packed_grads, masked_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)
    for row, docs in enumerate(documents):
        for column, n, doc in docs:
            alone = model(doc[None], use_cache=False).logits
            torch.testing.assert_close(packed[row, column:column + n], alone[0], rtol=0, atol=1e-10)


def test_varlen_is_used_only_in_its_window_size_form(monkeypatch, fresh_varlen):
    """varlen_attn with window_size is called causal (-1, 0); the first release's is_causal form is not used
    (None: the mask instead), nor a torch without the module."""
    import torch.nn.attention.varlen as varlen

    seen = {}

    def newer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        seen.update(window_size=window_size, max=(max_q, max_k))
        return query

    def first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("the is_causal form must not be called")

    monkeypatch.setattr(varlen, "varlen_attn", newer)
    q = torch.zeros(5, 2, 8)
    ops_softmax._varlen_causal_attention()(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5)
    assert seen == {"window_size": (-1, 0), "max": (5, 5)}
    ops_softmax._varlen_causal_attention.cache_clear()
    monkeypatch.setattr(varlen, "varlen_attn", first)
    assert ops_softmax._varlen_causal_attention() is None
    assert ops_softmax._packed_softmax_kernel([[4, 4]], 8, torch.device("cuda"), torch.bfloat16, 64) == "mask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen flash attention)")
def test_softmax_varlen_on_cuda_within_bf16_noise_of_the_mask():
    """On a GPU under bf16 autocast, the varlen route's logits and gradients against the float32 masked
    route are as close as the bf16 masked route's own."""
    if ops_softmax._varlen_causal_attention() is None:
        pytest.skip("this torch has no varlen_attn with window_size: packed softmax keeps the mask")
    torch.manual_seed(0)
    model = tiny_model("softmax").cuda()
    ids, _, positions, _ = packed_batch(rows=UNPADDED_ROWS, left_pad=[0, 0])
    ids, positions = ids.cuda(), positions.cuda()
    weight = torch.randn(len(UNPADDED_ROWS), WIDTH, model.config.vocab_size, device="cuda")
    exact, exact_grads = logits_and_grads(model, weight, input_ids=ids, position_ids=positions)
    errors = {}
    for kernel in ("varlen", "mask"):
        with pytest.MonkeyPatch.context() as mp, torch.autocast("cuda", dtype=torch.bfloat16):
            if kernel == "mask":
                mp.setattr(ops_softmax, "_packed_softmax_kernel", lambda *args: "mask")
            logits, grads = logits_and_grads(model, weight, input_ids=ids, position_ids=positions)
        errors[kernel] = (float((logits.float() - exact).abs().max()),
                          max(float((g - e).abs().max()) for g, e in zip(grads, exact_grads) if e is not None))
    assert ops_softmax._packed_softmax_kernel(UNPADDED_ROWS, WIDTH, torch.device("cuda"), torch.bfloat16,
                                                 model.config.head_dim) == "varlen"
    assert errors["varlen"][0] <= 2 * errors["mask"][0] + 1e-3, errors
    assert errors["varlen"][1] <= 2 * errors["mask"][1] + 1e-3, errors

@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_compiled_blocks_do_not_recompile_for_each_packing(attention_type):
    """torch.compile'd blocks (as --model.compile) over batches whose documents fall differently: once
    the first batches have compiled, a new packing compiles nothing more (the host-planned packed paths
    run outside the graph instead of being specialised on the documents' lengths), and the logits are
    eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(attention_type, conv_size=4)
    compiled = tiny_model(attention_type, conv_size=4)
    for block in compiled.model.layers:
        block.compile(backend="eager")                      # dynamo's tracing and guards, no code generation
    g = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(6):
        ids = torch.randint(2, 320, (2, 48), generator=g)
        ids[torch.rand(ids.shape, generator=g) < 0.08] = 0   # separators at random: a new packing every batch
        positions = packed_position_ids(ids, 0)
        got = compiled(ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, eager(ids, position_ids=positions, use_cache=False).logits)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2:] == [graphs[2]] * 4, graphs
    assert not any("recompile" in reason.lower() for reason in counters["unimplemented"])
    torch._dynamo.reset()
