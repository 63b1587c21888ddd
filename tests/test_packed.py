"""Packed documents: position_ids that restart at 0 keep every attention type inside its document."""

import pytest
import torch
from conftest import ATTENTION_TYPES, tiny_model

from zeros_lm import ZeroSCache, ZeroSConfig, modeling_zeros
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
    monkeypatch.setattr(modeling_zeros, "_SDPA_CALL_PAIRS", 0)
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


def test_softmax_calls_sdpa_per_document_where_that_is_cheaper():
    """The CPU choice between per-document calls and one masked call: long rows of short documents go per
    document, short rows keep the mask, and off the CPU the mask always stays."""
    cheaper = modeling_zeros._per_document_is_cheaper
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cheaper([[200] * 10 + [48]], 2048, cpu)
    assert not cheaper([[200, 56]] * 8, 256, cpu)
    assert not cheaper([[2048]], 2048, cpu)                      # one document: nothing to save
    assert not cheaper([[200] * 10 + [48]], 2048, cuda)
