"""Data pipeline: sources, tokenizer, tokenising and packing, cache, validation split, streaming,
the resumable sampler, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zeros_lm import data as D
from zeros_lm.data import DataError, TextDataModule

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(0, n_words, 12):
        lines.append(" ".join(rng.choice(WORDS, size=12)))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Six small text documents in a directory tree."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        (root / f"doc{i}.txt").write_text(make_text(300, i))
    for i in range(2):
        (root / "sub" / f"more{i}.md").write_text(make_text(300, 10 + i))
    (root / ".hidden.txt").write_text("should be ignored")
    return root


def dm_kwargs(tmp_path: Path, **kw) -> dict:
    base = dict(
        tokenizer_vocab_size=300,
        seq_len=32,
        batch_size=4,
        val_fraction=0.1,
        num_proc=1,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return base


def token_ids(tokenizer, text: str) -> list[int]:
    """The ids of one document, as the pipeline tokenises it (no special tokens)."""
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def packed(tokenizer, texts, block: int) -> list[tuple]:
    """Reference packing: each non-empty document's ids then EOS, cut into whole blocks."""
    stream = []
    for text in texts:
        ids = token_ids(tokenizer, text)
        if ids:
            stream += ids + [tokenizer.eos_token_id]
    return [tuple(stream[i : i + block]) for i in range(0, len(stream) - block + 1, block)]


def block_rows(blocks) -> list[tuple]:
    """The blocks of a loader (batches of blocks) or of a datasets column, as tuples of ids."""
    out = []
    for b in blocks:
        b = torch.as_tensor(np.asarray(b))
        out.extend(tuple(r) for r in (b if b.dim() == 2 else b[None]).tolist())
    return out


def complete_documents(blocks, eos: int) -> list[tuple]:
    """The EOS-terminated pieces of the packed stream (the last, cut-off document left out)."""
    stream = np.asarray(blocks).reshape(-1)
    pieces = np.split(stream, np.where(stream == eos)[0] + 1)
    return [tuple(p[:-1].tolist()) for p in pieces if len(p) and p[-1] == eos]


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
def test_stdlib_source_excludes_tests_and_site_packages():
    files = D.resolve_files("stdlib")
    stdlib = sysconfig.get_paths()["stdlib"]
    assert len(files) > 300
    assert all(f.endswith(".py") and f.startswith(stdlib) for f in files)
    for f in files:
        parts = Path(f).relative_to(stdlib).parts
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), f
    part = D.resolve_files("stdlib:json")
    assert part and all("/json/" in f for f in part)


def test_files_dirs_and_globs(corpus: Path):
    all_files = D.resolve_files([str(corpus)])
    assert len(all_files) == 6  # hidden file skipped, recursive
    assert D.resolve_files([str(corpus / "*.txt")]) == sorted(str(corpus / f"doc{i}.txt") for i in range(4))
    assert len(D.resolve_files([str(corpus / "**" / "*.md")])) == 2
    assert len(D.resolve_files([str(corpus)], extensions=[".md"])) == 2
    assert D.resolve_files([str(corpus / "doc0.txt"), str(corpus / "doc0.txt")]) == [str(corpus / "doc0.txt")]


def test_missing_path_is_one_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match="no such file or directory.*nope"):
        D.resolve_files([str(tmp_path / "nope")])
    with pytest.raises(DataError, match="no such file or directory"):
        TextDataModule(train_files=str(tmp_path / "nope.txt"), **dm_kwargs(tmp_path))


def test_glob_without_match_is_one_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match=r"no file matched the pattern .*\*\.zzz"):
        D.resolve_files([str(tmp_path / "*.zzz")])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no file found in the directory"):
        D.resolve_files([str(tmp_path / "emptydir")])


def test_empty_corpus(tmp_path: Path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("   \n\n")
    with pytest.raises(DataError, match="empty corpus"):
        TextDataModule(train_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], **dm_kwargs(tmp_path))


def test_undecodable_bytes_name_the_file(tmp_path: Path, corpus: Path):
    bad = corpus / "bad.txt"
    bad.write_bytes(b"valid start \xff\xfe\x00 then garbage")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8.*offset 12"):
        TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path))


def test_corpus_smaller_than_one_block(tmp_path: Path):
    (tmp_path / "tiny.txt").write_text("alpha beta gamma delta")
    with pytest.raises(DataError, match=r"corpus too small: \d+ tokens in 1 documents make no block of seq_len \+ 1 = 513"):
        TextDataModule(train_files=str(tmp_path / "tiny.txt"), **dm_kwargs(tmp_path, seq_len=512))


def test_corpus_too_small_for_a_validation_split(tmp_path: Path):
    (tmp_path / "t.txt").write_text(make_text(30, 0))
    with pytest.raises(DataError, match="cannot be split into training and validation"):
        TextDataModule(train_files=str(tmp_path / "t.txt"), **dm_kwargs(tmp_path, seq_len=32, val_fraction=0.5))


def test_vocabulary_too_small(tmp_path: Path, corpus: Path):
    with pytest.raises(DataError, match="tokenizer_vocab_size=100 is too small.*at least 258"):
        TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path, tokenizer_vocab_size=100))


def test_missing_tokenizer_dir(tmp_path: Path, corpus: Path):
    with pytest.raises(DataError, match="tokenizer directory not found"):
        TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path, tokenizer=str(tmp_path / "none")))


# ------------------------------------------------------------------------------------------
# Tokenizer, packing, cache
# ------------------------------------------------------------------------------------------
def test_tokenizer_trains_and_round_trips(tmp_path: Path):
    texts = [make_text(200, i) for i in range(5)] + ["def f(x):\n    return x ** 2  # ünïcödé ✓\n"]
    tok = D.train_tokenizer(iter(texts), vocab_size=320)
    assert len(tok) <= 320 and tok.eos_token == D.EOS_TOKEN and tok.pad_token == D.PAD_TOKEN
    for t in texts:
        assert tok.decode(tok(t)["input_ids"]) == t
    tok.save_pretrained(tmp_path / "tok")
    again = D.load_tokenizer(str(tmp_path / "tok"))
    assert again(texts[-1])["input_ids"] == tok(texts[-1])["input_ids"]
    assert again.eos_token_id == tok.eos_token_id


def test_pack_puts_eos_between_documents_and_loses_nothing_but_the_tail(tmp_path: Path, corpus: Path):
    dm = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path, val_fraction=0.0))
    tok = dm.tokenizer
    block = dm.seq_len + 1
    blocks = np.asarray(dm.corpus.train.with_format("numpy")["input_ids"])
    assert blocks.shape[1] == block
    assert dm.corpus.train.features["input_ids"].feature.dtype == "int32"  # half the disk of int64
    stream = blocks.reshape(-1)
    eos = tok.eos_token_id
    # The packed stream is the documents (in their shuffled order), each followed by EOS.
    docs = [Path(f).read_text() for f in D.resolve_files(str(corpus))]
    encoded = {tuple(tok(d, add_special_tokens=False)["input_ids"]) for d in docs}
    pieces = np.split(stream, np.where(stream == eos)[0] + 1)
    complete = [tuple(p[:-1].tolist()) for p in pieces if len(p) and p[-1] == eos]
    assert len(complete) == len(docs) - 0 or len(complete) == len(docs) - 1
    assert all(c in encoded for c in complete)
    total = sum(len(e) + 1 for e in encoded)
    assert total - block < len(stream) <= total


def special_token_texts(tokenizer) -> list[str]:
    """The text of every special token of ``tokenizer`` (``<|endoftext|>``, ``<|pad|>``, ...)."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special})


@pytest.mark.parametrize("streaming", [False, True], ids=["packed", "streaming"])
def test_special_token_text_in_a_document_is_ordinary_text(tmp_path: Path, streaming: bool):
    """A document that writes ``<|endoftext|>`` or ``<|pad|>`` as text is one document: EOS comes only
    after each document (never from its text), no pad id enters the blocks, and every complete piece
    of the stream decodes to a whole document."""
    specials = [D.EOS_TOKEN, D.PAD_TOKEN]
    docs = [
        f"{make_text(24, i).strip()} {specials[0]} then{specials[1]}more {make_text(12, 50 + i)}{''.join(specials)}"
        for i in range(30)
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kw = dict(val_docs=0, shuffle_buffer=0) if streaming else dict(val_fraction=0.0)
    dm = TextDataModule(train_files=str(path), streaming=streaming, **dm_kwargs(tmp_path, seq_len=16, **kw))
    tok = dm.tokenizer
    assert set(special_token_texts(tok)) == set(specials)  # the corpus holds every special token's text
    if streaming:
        rows = [row["input_ids"] for row in dm.pipeline.blocks(dm.pipeline.documents(), 0, 1)]
    else:
        rows = dm.corpus.train.with_format("numpy")["input_ids"]
    stream = np.asarray(rows).reshape(-1)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert pad not in stream
    # Every document is longer than a block, so only the last one's EOS can fall in the cut-off tail.
    assert int((stream == eos).sum()) == len(docs) - (0 if stream[-1] == eos else 1)
    pieces = complete_documents(stream, eos)
    assert len(pieces) >= len(docs) - 1
    assert all(tok.decode(list(p)) in docs for p in pieces)


def test_special_tokens_in_text_on_request(tmp_path: Path):
    """``split_special_tokens=False`` (asked for) reads a special token's text as the token."""
    docs = [f"{make_text(24, i).strip()} {D.EOS_TOKEN} {make_text(24, 50 + i)}" for i in range(10)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dm = TextDataModule(train_files=str(tmp_path / "docs.jsonl"),
                        **dm_kwargs(tmp_path, seq_len=16, val_fraction=0.0, split_special_tokens=False))
    stream = np.asarray(dm.corpus.train.with_format("numpy")["input_ids"]).reshape(-1)
    assert int((stream == dm.tokenizer.eos_token_id).sum()) >= 2 * len(docs) - 2


def test_statistics_count_only_documents_with_text(tmp_path: Path):
    """Empty, blank and null texts are no documents: the statistics count the others."""
    texts = [make_text(30, i) for i in range(6)]
    rows = [{"text": t} for t in texts] + [{"text": ""}, {"text": "  \n\t"}, {"text": None}] * 2
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": ""}) + "\n")
    dm = TextDataModule(train_files=str(tmp_path / "docs.jsonl"), val_files=str(tmp_path / "val.jsonl"),
                        **dm_kwargs(tmp_path, seq_len=8))
    assert dm.corpus.stats["documents"] == len(texts)
    assert dm.corpus.stats["val_documents"] == 1


def test_second_run_loads_from_cache(tmp_path: Path, corpus: Path, monkeypatch):
    first = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path))
    assert not first.from_cache

    def boom(*a, **k):
        raise AssertionError("the second run must not tokenise or train a tokenizer again")

    monkeypatch.setattr(D.corpus, "_tokenize_batch", boom)  # where the pipeline looks them up
    monkeypatch.setattr(D.tokenizer, "train_tokenizer", boom)
    second = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path))
    assert second.from_cache
    assert len(second.corpus.train) == len(first.corpus.train)
    a = np.asarray(first.corpus.train.with_format("numpy")["input_ids"])
    b = np.asarray(second.corpus.train.with_format("numpy")["input_ids"])
    assert np.array_equal(a, b)
    monkeypatch.undo()
    # Changing a source file invalidates the cache.
    (corpus / "doc0.txt").write_text(make_text(310, 99))
    third = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path))
    assert not third.from_cache


def test_validation_by_fraction_and_by_files(tmp_path: Path, corpus: Path):
    dm = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path, val_fraction=0.2))
    n_train, n_val = len(dm.corpus.train), len(dm.corpus.val)
    assert n_val == round(0.2 * (n_train + n_val))
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val_text = " ".join(["omega upsilon chi psi"] * 60) + "\n"  # words the training files never use
    (val_dir / "v.txt").write_text(val_text)
    dm2 = TextDataModule(train_files=str(corpus), val_files=str(val_dir), **dm_kwargs(tmp_path))
    assert len(dm2.corpus.train) == n_train + n_val  # nothing held out of the training files
    val_blocks = block_rows(dm2.corpus.val.with_format("numpy")["input_ids"])
    assert val_blocks == packed(dm2.tokenizer, [val_text], dm2.seq_len + 1)  # exactly the named file's tokens
    assert block_rows(dm2.val_dataloader()) == val_blocks
    train_docs = complete_documents(dm2.corpus.train.with_format("numpy")["input_ids"], dm2.tokenizer.eos_token_id)
    assert tuple(token_ids(dm2.tokenizer, val_text)) not in train_docs
    nothing = TextDataModule(train_files=str(corpus), **dm_kwargs(tmp_path, val_fraction=0.0))
    assert nothing.corpus.val is None and nothing.val_dataloader() == []


def test_jsonl_and_parquet_with_a_text_column(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": make_text(120, i)} for i in range(6)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "body": [r["body"] for r in rows]}), tmp_path / "d.parquet")
    a = TextDataModule(train_files=str(jl), text_column="body", **dm_kwargs(tmp_path, val_fraction=0.0))
    b = TextDataModule(train_files=str(tmp_path / "d.parquet"), text_column="body", **dm_kwargs(tmp_path, val_fraction=0.0))
    assert a.corpus.stats["documents"] == b.corpus.stats["documents"] == 6
    blocks_a = np.asarray(a.corpus.train.with_format("numpy")["input_ids"])
    blocks_b = np.asarray(b.corpus.train.with_format("numpy")["input_ids"])
    assert np.array_equal(blocks_a, blocks_b)  # the same documents, the same shuffled order
    # The packed documents are the text column's, token for token (and nothing of the id column).
    bodies = {tuple(token_ids(a.tokenizer, r["body"])) for r in rows}
    docs = complete_documents(blocks_a, a.tokenizer.eos_token_id)
    assert len(docs) >= len(rows) - 1 and set(docs) <= bodies
    assert sum(len(d) + 1 for d in bodies) - blocks_a.size < a.seq_len + 1  # only the tail is lost
    with pytest.raises(DataError, match=r"no column 'text' \(columns: .*body"):
        TextDataModule(train_files=str(jl), **dm_kwargs(tmp_path))


def test_dataset_by_name_takes_the_hub_code_path(tmp_path: Path):
    # No network here: a local dataset directory goes through the same load_dataset(name, ...) path.
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text("\n".join(json.dumps({"text": make_text(150, i)}) for i in range(5)) + "\n")
    dm = TextDataModule(train_files=None, dataset_name=str(ds_dir), dataset_split="train", **dm_kwargs(tmp_path))
    assert dm.corpus.stats["documents"] == 5
    with pytest.raises(DataError, match="could not load the dataset"):
        TextDataModule(train_files=None, dataset_name=str(ds_dir), dataset_split="nosuchsplit", **dm_kwargs(tmp_path))


def test_streaming_shards_across_ranks(tmp_path: Path, corpus: Path):
    dm = TextDataModule(train_files=str(corpus), streaming=True, shuffle_buffer=0, val_docs=0, **dm_kwargs(tmp_path))
    ranks = []
    for rank in range(2):
        blocks = list(dm.pipeline.blocks(dm.pipeline.documents(), rank, 2))
        ranks.append({tuple(b["input_ids"]) for b in blocks})
        assert blocks and all(len(b["input_ids"]) == dm.seq_len + 1 for b in blocks)
    assert not (ranks[0] & ranks[1])  # each rank reads its own documents
    whole = {tuple(b["input_ids"]) for b in dm.pipeline.blocks(dm.pipeline.documents(), 0, 1)}
    assert len(ranks[0]) + len(ranks[1]) <= len(whole) + 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (dm.batch_size, dm.seq_len + 1) and batch.dtype == torch.long


def paragraphs_corpus(root: Path) -> list[str]:
    """Two files of three paragraphs (blank-line separated) of three lines each; returns the paragraphs."""
    root.mkdir()
    paragraphs = []
    for f in range(2):
        mine = ["\n".join(make_text(36, 100 * f + 10 * p + i).strip() for i in range(3)) for p in range(3)]
        (root / f"p{f}.txt").write_text("\n\n".join(mine))
        paragraphs += mine
    return paragraphs


@pytest.mark.parametrize("sample_by", ["paragraph", "line"])
def test_sample_by_paragraph_and_line_make_one_document_each(tmp_path: Path, sample_by: str):
    paragraphs = paragraphs_corpus(tmp_path / "text")
    units = paragraphs if sample_by == "paragraph" else [line for p in paragraphs for line in p.split("\n")]
    dm = TextDataModule(train_files=str(tmp_path / "text"), sample_by=sample_by, **dm_kwargs(tmp_path, val_fraction=0.0))
    expected = {tuple(token_ids(dm.tokenizer, u)) for u in units}
    docs = complete_documents(dm.corpus.train.with_format("numpy")["input_ids"], dm.tokenizer.eos_token_id)
    assert len(docs) >= len(units) - 1 and set(docs) <= expected  # every piece between EOS is one unit


def test_num_proc_above_one_gives_the_same_blocks(tmp_path: Path, monkeypatch):
    import datasets

    root = tmp_path / "many"
    root.mkdir()
    for i in range(16):  # enough documents for the pipeline to use 2 processes
        (root / f"d{i:02d}.txt").write_text(make_text(60, 200 + i))
    one = TextDataModule(train_files=str(root), **dm_kwargs(tmp_path, num_proc=1, cache_dir=str(tmp_path / "c1")))
    used = []
    map_ = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("num_proc"))
        return map_(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    two = TextDataModule(train_files=str(root), **dm_kwargs(tmp_path, num_proc=2, cache_dir=str(tmp_path / "c2")))
    assert not two.from_cache and 2 in used  # the tokenising map really ran in 2 processes
    for split in ("train", "val"):
        a = np.asarray(getattr(one.corpus, split).with_format("numpy")["input_ids"])
        b = np.asarray(getattr(two.corpus, split).with_format("numpy")["input_ids"])
        assert np.array_equal(a, b), split


# ------------------------------------------------------------------------------------------
# Streaming, through the data module's loaders
# ------------------------------------------------------------------------------------------
class FakeTrainer:
    """What the data module reads from a trainer: rank, world size and the restored batch count."""

    def __init__(self, batches_done: int, epoch: int = 0):
        count = SimpleNamespace(processed=batches_done)
        self.current_epoch = epoch
        progress = SimpleNamespace(current=count, total=count)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
        self.global_rank, self.world_size = 0, 1


def streamed(tmp_path: Path, files, **kw) -> TextDataModule:
    return TextDataModule(train_files=files, streaming=True, **dm_kwargs(tmp_path, **kw))


def test_streaming_holds_out_the_first_documents_for_validation(tmp_path: Path, corpus: Path):
    dm = streamed(tmp_path, str(corpus), shuffle_buffer=0, val_docs=2)
    texts = [Path(f).read_text() for f in D.resolve_files(str(corpus))]  # the stream's order
    block = dm.seq_len + 1
    val = block_rows(dm.val_dataloader())
    train = block_rows(dm.train_dataloader())
    assert val == packed(dm.tokenizer, texts[:2], block)
    expected_train = packed(dm.tokenizer, texts[2:], block)
    assert train == expected_train[: len(expected_train) // dm.batch_size * dm.batch_size]
    assert not set(val) & set(train)
    # --data.val_files instead: validation is those files, training all of train_files.
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    (val_dir / "v.txt").write_text(make_text(200, 77))
    dm2 = TextDataModule(train_files=str(corpus), val_files=str(val_dir), streaming=True, shuffle_buffer=0,
                         **dm_kwargs(tmp_path))
    assert block_rows(dm2.val_dataloader()) == packed(dm2.tokenizer, [(val_dir / "v.txt").read_text()], block)
    everything = packed(dm2.tokenizer, texts, block)
    assert block_rows(dm2.train_dataloader()) == everything[: len(everything) // dm.batch_size * dm.batch_size]


def test_streaming_shuffles_and_resumes_at_the_right_block(tmp_path: Path, corpus: Path):
    plain = block_rows(streamed(tmp_path, str(corpus), shuffle_buffer=0, val_docs=0).train_dataloader())
    dm = streamed(tmp_path, str(corpus), shuffle_buffer=64, val_docs=0)
    batches = [b.clone() for b in dm.train_dataloader()]
    shuffled = block_rows(batches)
    assert len(shuffled) == len(plain) and shuffled != plain  # the buffer reorders the blocks ...
    everything = set(packed(dm.tokenizer, [Path(f).read_text() for f in D.resolve_files(str(corpus))], dm.seq_len + 1))
    assert set(shuffled) <= everything  # ... of the same stream
    loader = dm.train_dataloader()
    assert block_rows(loader) == shuffled  # seeded: the same order again
    dm.trainer = FakeTrainer(batches_done=0, epoch=1)  # the stream reads the trainer's epoch
    assert block_rows(loader) != shuffled  # a new order every epoch
    # Resumed after 3 batches of this epoch: the loader continues with batch 3.
    dm.trainer = FakeTrainer(batches_done=3)
    resumed = list(dm.train_dataloader())
    assert len(resumed) == len(batches) - 3
    for got, want in zip(resumed, batches[3:]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_streaming_jsonl_and_parquet_read_the_text_column(tmp_path: Path, kind: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bodies = [make_text(120, i) for i in range(5)]
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "body": b}) for i, b in enumerate(bodies)) + "\n")
    else:
        pq.write_table(pa.table({"id": list(range(5)), "body": bodies}), path)
    dm = streamed(tmp_path, str(path), text_column="body", shuffle_buffer=0, val_docs=1)
    block = dm.seq_len + 1
    assert block_rows(dm.val_dataloader()) == packed(dm.tokenizer, bodies[:1], block)
    expected = packed(dm.tokenizer, bodies[1:], block)
    assert block_rows(dm.train_dataloader()) == expected[: len(expected) // dm.batch_size * dm.batch_size]


# ------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------
def test_block_sampler_resumes_exactly_and_splits_ranks():
    done = {"n": 0}
    full = BlockSamplerRun(done)
    # Uninterrupted: 3 epochs of 25 samples per rank, batches of 4 -> 6 batches (24 samples) each.
    whole = []
    for epoch in range(3):
        full.set_epoch(epoch)
        for i in full:
            whole.append(i)
            if len(whole) % 4 == 0:
                done["n"] += 1
    # Interrupted after 8 batches (mid epoch 1), resumed in whatever epoch Lightning starts.
    done2 = {"n": 8}
    resumed = BlockSamplerRun(done2)
    resumed.set_epoch(5)
    rest = []
    for _ in range(3):
        for i in resumed:
            rest.append(i)
            if len(rest) % 4 == 0:
                done2["n"] += 1
        if len(rest) >= len(whole) - 32:
            break
    assert rest[: len(whole) - 32] == whole[32:]
    # Two ranks get disjoint halves of each epoch.
    a = D.BlockSampler(50, num_replicas=2, rank=0, seed=3)
    b = D.BlockSampler(50, num_replicas=2, rank=1, seed=3)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 50


def BlockSamplerRun(counter: dict) -> D.BlockSampler:
    return D.BlockSampler(50, num_replicas=2, rank=1, seed=7, batch_size=4, position_fn=lambda: counter["n"])
