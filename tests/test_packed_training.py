"""Packed training keeps documents apart: a training (and validation) step on blocks packed as
``doc EOS doc EOS ...`` is the documents trained one by one; ``--data.document_resets false`` is the
old behaviour exactly; both settings train and resume through the training command, and the
checkpoint and the export say which one was used."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTENTION_TYPES
from test_config_fields import export_config
from test_train import cache_dir, run_in_process, smoke_args  # noqa: F401  (cache_dir is a fixture)

from zeros_lm.checkpoint import CHECKPOINT_KEY, read_config
from zeros_lm.training import ZeroSLitModule

EOS = 0
# A tiny model; chunk_size 4 puts document boundaries on chunk edges and inside chunks.
TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            chunk_size=4, eos_token_id=EOS, pad_token_id=1, tie_word_embeddings=False)
# EOS columns of the inputs (blocks hold WIDTH + 1 tokens): row 0 has documents 4 | 3 | 1 (a lone EOS) | 6,
# row 1 starts with an EOS (no boundary: a row starts a document anyway) and has one more at column 10.
EOS_COLUMNS = [[4, 7, 8], [0, 10]]
WIDTH = 14


def lit_module(attention_type="zeros", document_resets=True, seed=0) -> ZeroSLitModule:
    torch.manual_seed(seed)
    return ZeroSLitModule(attention_type=attention_type, document_resets=document_resets, **TINY)


def packed_blocks(seed=0) -> torch.Tensor:
    """(2, WIDTH + 1) token ids with EOS at EOS_COLUMNS of the inputs and nowhere else."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(2, TINY["vocab_size"], (len(EOS_COLUMNS), WIDTH + 1), generator=g)
    for row, columns in enumerate(EOS_COLUMNS):
        batch[row, columns] = EOS
    return batch


def documents_one_by_one(model, batch: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of the batch, every document (an EOS and what follows it, up to the
    next EOS) read by the model on its own."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    total = torch.zeros(())
    for row in range(inputs.shape[0]):
        starts = sorted({0, *(inputs[row] == EOS).nonzero().flatten().tolist()})
        for lo, hi in zip(starts, starts[1:] + [inputs.shape[1]]):
            logits = model(input_ids=inputs[row:row + 1, lo:hi], use_cache=False).logits
            total = total + F.cross_entropy(logits.float()[0], targets[row, lo:hi], reduction="sum")
    return total / targets.numel()


def gradients(module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_a_training_step_on_packed_blocks_is_the_documents_trained_one_by_one(attention_type):
    lit = lit_module(attention_type)
    batch = packed_blocks()
    loss = lit._loss(batch)
    loss.backward()
    packed_grads = gradients(lit)
    reference = documents_one_by_one(lit.model, batch)
    reference.backward()
    reference_grads = gradients(lit)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert len(packed_grads) == len(reference_grads) > 0
    for got, want in zip(packed_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Validation reads the blocks the same way.
    with torch.no_grad():
        lit.on_validation_epoch_start()
        lit.validation_step(batch, 0)
        torch.testing.assert_close((lit._val_sum / lit._val_count).float(), reference.detach(), rtol=1e-5, atol=1e-5)


def step_logits(lit, batch) -> torch.Tensor:
    """The logits (B, WIDTH, V) that a training step's loss is computed from."""
    captured = []
    handle = lit.model.register_forward_hook(lambda module, args, output: captured.append(output.logits.detach()))
    try:
        lit._loss(batch)
    finally:
        handle.remove()
    (logits,) = captured
    return logits


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_resets_on_and_off_differ_only_where_documents_meet(attention_type):
    on, off = lit_module(attention_type, True), lit_module(attention_type, False)
    off.load_state_dict(on.state_dict())
    batch = packed_blocks(seed=1)
    gap = (step_logits(on, batch) - step_logits(off, batch)).abs().amax(-1)     # (B, WIDTH)
    for row, columns in enumerate(EOS_COLUMNS):
        first = min(c for c in columns if c > 0)                                 # where a second document starts
        assert gap[row, :first].max() < 1e-5, (row, gap[row])                    # the first document: the same
        assert gap[row, first:].min() > 1e-4, (row, gap[row])                    # every later token: its own context


def test_resets_off_is_the_old_behaviour_exactly():
    lit = lit_module(document_resets=False)
    batch = packed_blocks()
    logits = lit.model(input_ids=batch[:, :-1], use_cache=False).logits        # a block as one sequence
    old = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    assert torch.equal(lit._loss(batch), old)
    assert lit.document_separator is None and lit.model.config.trained_with_document_resets is False
    # Resets on, but no EOS inside the blocks (a block of one document): nothing changes either.
    one_document = batch.clone()
    one_document[one_document == EOS] = 2
    on = lit_module(document_resets=True)
    on.load_state_dict(lit.state_dict())
    assert on.document_separator == EOS and on.model.config.trained_with_document_resets is True
    assert torch.equal(on._loss(one_document), lit._loss(one_document))
    # Without an EOS id there is no separator: a block is one document.
    assert ZeroSLitModule(**{**TINY, "eos_token_id": None}).document_separator is None


@pytest.mark.parametrize("document_resets", [True, False])
def test_the_checkpoint_and_the_export_say_whether_documents_were_kept_apart(document_resets, tmp_path, tiny_tokenizer):
    checkpoint, exported = export_config(lit_module(document_resets=document_resets), tiny_tokenizer, tmp_path)
    assert checkpoint[CHECKPOINT_KEY]["config"]["trained_with_document_resets"] is document_resets
    assert read_config(checkpoint).trained_with_document_resets is document_resets
    assert exported["trained_with_document_resets"] is document_resets


def test_resuming_with_the_other_setting_warns():
    lit = lit_module(document_resets=True)
    with pytest.warns(UserWarning, match="trained with document_resets=False"):
        lit.on_load_checkpoint({"hyper_parameters": {}})                         # written before the option
    with pytest.warns(UserWarning, match="--data.document_resets true"):
        lit_module(document_resets=False).on_load_checkpoint({"hyper_parameters": {"document_resets": True}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lit.on_load_checkpoint({"hyper_parameters": {"document_resets": True}})  # the same setting: silent


def test_training_command_trains_and_resumes_exactly_with_resets_on_and_off(tmp_path, cache_dir):  # noqa: F811
    extra = ("--trainer.max_steps", "6", "--export.enabled", "false", "--trainer.val_check_interval", "100")
    first_losses = {}
    for resets in ("true", "false"):
        options = (*extra, "--data.document_resets", resets)
        cli, whole = run_in_process(smoke_args(tmp_path / f"{resets}_a", cache_dir, *options))
        assert cli.model.hparams.document_resets is (resets == "true")
        _, first = run_in_process(smoke_args(tmp_path / f"{resets}_b", cache_dir, *options), stop_at=3)
        assert max(first) == 3
        resumed_cli, second = run_in_process(
            smoke_args(tmp_path / f"{resets}_b", cache_dir, *options, "--ckpt_path", "last"))
        assert sorted(second) == [4, 5, 6]
        for step in (4, 5, 6):
            assert second[step] == pytest.approx(whole[step], abs=1e-5), (resets, step)
        checkpoint = torch.load(tmp_path / f"{resets}_b" / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["hyper_parameters"]["document_resets"] is (resets == "true")
        assert checkpoint[CHECKPOINT_KEY]["config"]["trained_with_document_resets"] is (resets == "true")
        first_losses[resets] = [whole[k] for k in sorted(whole)]
    # The same first batch and weights: the option reached the model (the smoke blocks hold several files).
    assert first_losses["true"] != first_losses["false"], first_losses


def test_the_cost_benchmark_runs_at_a_tiny_size(tmp_path):
    from benchmarks.packed import EOS as BENCH_EOS
    from benchmarks.packed import main, packed_blocks

    blocks, separators = packed_blocks(4, 63, 50, 8, torch.Generator().manual_seed(0))
    assert blocks.shape == (4, 64) and int((blocks == BENCH_EOS).sum()) == separators > 4 * 64 // 8 // 2
    out = tmp_path / "packed.json"
    main(["--seq-lens", "16", "--attentions", "zeros", "--tokens-per-step", "32", "--hidden-size", "32", "--layers",
          "1", "--heads", "2", "--vocab-size", "64", "--chunk-size", "8", "--mean-document", "5", "--warmup", "1",
          "--steps", "1", "--repeats", "1", "--json", str(out)])
    (result,) = json.loads(out.read_text())["results"]
    assert result["batch"] == 2 and result["documents_per_step"] > result["batch"]
    assert result["tokens_per_s_on"] > 0 and result["tokens_per_s_off"] > 0
