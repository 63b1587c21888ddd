#!/usr/bin/env python
"""Pretrain a ZeroS language model (or the softmax / linear-attention baseline) and export it as a
Hugging Face directory.

    python train.py                                   # the embedded default (configs/default.yaml):
                                                      # a BPE + a small ZeroS LM on Python's stdlib, CPU, ~10 min
    python train.py --config configs/smoke.yaml       # a few steps
    python train.py --config configs/small.yaml --config configs/zero3.yaml   # ~125M, DeepSpeed ZeRO-3
    python train.py --trainer.max_steps 200 --data.seq_len 512 --model.hidden_size 384
    python train.py --ckpt_path last                  # resume the run in trainer.default_root_dir
    python train.py --print_config                    # the full configuration, as YAML
    python train.py --help

Every option of the model (--model.*), the data (--data.*), the Lightning Trainer (--trainer.*),
checkpointing (--checkpoint.*), throughput logging (--throughput.*) and the export (--export.*)
can be set in a YAML file or on the command line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from zeros_lm.data import DataError, TextDataModule
from zeros_lm.training import HFExport, StepProgressBar, ThroughputLogger, ZeroSCheckpoint, ZeroSLitModule

# The embedded default run: what `python train.py` does with no arguments (configs/default.yaml
# holds the same values). Model and data defaults live in the classes' signatures.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": "auto",
    "precision": "32-true",
    "max_steps": 800,
    "val_check_interval": 100,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
    "accumulate_grad_batches": 1,
    "num_sanity_val_steps": 0,
    "default_root_dir": "runs/default",
}


def _checkpoint_dir(root: Optional[str]) -> str:
    return os.path.join(root or os.getcwd(), "checkpoints")


class ZeroSCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],
            default=None,
            help="resume training: a checkpoint path, or 'last' for the newest in <default_root_dir>/checkpoints",
        )
        parser.add_lightning_class_args(ZeroSCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(HFExport, "export")
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # The model's vocabulary and special tokens follow the tokenizer that the data module owns.
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config
        # Continuing from an exported directory: use its tokenizer unless told otherwise.
        if config.model.init_from and not config.data.tokenizer:
            config.data.tokenizer = config.model.init_from

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self.config_init.get("trainer", {})
        if trainer_config.get("logger", True) in (True, None) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        from lightning.pytorch.callbacks import ProgressBar

        configured = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = list(callbacks) + [StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def default_loggers(root: str) -> list:
    """CSV and (if installed) TensorBoard logs in <root>/logs/version_N."""
    from lightning.pytorch.loggers import CSVLogger

    csv = CSVLogger(save_dir=root, name="logs")
    loggers = [csv]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=root, name="logs", version=csv.version, default_hp_metric=False))
    except ModuleNotFoundError:
        pass
    return loggers


def make_cli(args=None, run: bool = False) -> ZeroSCLI:
    return ZeroSCLI(
        ZeroSLitModule,
        TextDataModule,
        run=run,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module's configure_optimizers is the one to use
        parser_kwargs={"description": __doc__.split("\n\n")[0]},
    )


def main(args=None) -> int:
    import torch

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 parts on tensor-core GPUs
    try:
        cli = make_cli(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if trainer.is_global_zero:
        cfg = model.config
        print(
            f"Model: {cfg.attention_type} attention, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}: {model.num_parameters() / 1e6:.2f} M parameters",
            flush=True,
        )
        per_step = dm.batch_size * dm.seq_len * trainer.accumulate_grad_batches * trainer.world_size
        print(
            f"Training: {trainer.max_steps} steps of {per_step:,} tokens ({dm.batch_size} x {dm.seq_len} per device"
            f"{f' x {trainer.accumulate_grad_batches} accumulated' if trainer.accumulate_grad_batches > 1 else ''}"
            f", {trainer.world_size} device(s)); output in {trainer.default_root_dir}",
            flush=True,
        )
    start = time.time()
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cli.config.ckpt_path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        summary = f"Done: {trainer.global_step} steps in {(time.time() - start) / 60:.1f} min"
        if "val/loss" in metrics:
            summary += f"; validation loss {float(metrics['val/loss']):.3f} (perplexity {float(metrics['val/ppl']):.1f})"
        print(summary, flush=True)
        export = next((c for c in trainer.callbacks if isinstance(c, HFExport)), None)
        if export is not None and export.command():
            print(f"\nStream a sample from the exported model with:\n\n  {export.command()}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
