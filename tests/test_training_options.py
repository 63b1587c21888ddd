"""Training options of issue 9: torch.compile of the blocks, and the model FLOPs utilisation (MFU) that the
throughput log shows next to tokens/s."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from zeros_lm import training
from zeros_lm.callbacks import ThroughputLogger
from zeros_lm.training import ZeroSLitModule, model_flops_per_token

SMALL = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=8)


def _loss_and_grads(module, batch):
    loss = module._loss(batch)
    grads = torch.autograd.grad(loss, [p for p in module.parameters()])
    return loss.detach(), grads


def test_compile_compiles_every_block_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(training, "COMPILE_KWARGS", {"backend": "aot_eager"})  # dynamo tracing, no C++ build
    torch.manual_seed(0)
    plain = ZeroSLitModule(**SMALL)
    compiled = ZeroSLitModule(**SMALL, compile=True)
    compiled.load_state_dict(plain.state_dict())  # parameter names unchanged by compiling
    assert all(block._compiled_call_impl is not None for block in compiled.model.model.layers)
    assert all(block._compiled_call_impl is None for block in plain.model.model.layers)
    batch = torch.randint(0, 300, (2, 21))
    loss, grads = _loss_and_grads(plain, batch)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)


def test_model_flops_per_token_counts_weights_and_mixing():
    torch.manual_seed(0)
    softmax = ZeroSLitModule(**SMALL, attention_type="softmax").model
    H, d, L = 2, 16, 2
    weights = sum(p.numel() for p in softmax.parameters())  # tied head: the embedding counts once, as the head
    assert model_flops_per_token(softmax, 100) == 6 * weights + 3 * L * H * 2 * 100 * d
    zeros = ZeroSLitModule(**SMALL).model
    # linear time: the per-token cost of ZeroS does not grow with the sequence once it spans a chunk
    assert model_flops_per_token(zeros, 64) == model_flops_per_token(zeros, 4096)
    assert model_flops_per_token(softmax, 4096) > model_flops_per_token(softmax, 64)


def test_throughput_logger_reports_mfu_with_a_known_peak():
    torch.manual_seed(0)
    module = ZeroSLitModule(**SMALL)
    peak = 1e9
    logger = ThroughputLogger(window=4, peak_flops=peak)
    data = DataLoader(torch.randint(0, 300, (16, 33)), batch_size=2)
    trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[logger])
    trainer.fit(module, train_dataloaders=data)
    metrics = trainer.callback_metrics
    expected = float(metrics["tok_s"]) * model_flops_per_token(module.model, 32) / peak
    assert float(metrics["mfu"]) == pytest.approx(expected, rel=1e-5)
    # without a peak (a CPU), no MFU is logged
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[ThroughputLogger()])
    trainer.fit(ZeroSLitModule(**SMALL), train_dataloaders=data)
    assert "tok_s" in trainer.callback_metrics and "mfu" not in trainer.callback_metrics
