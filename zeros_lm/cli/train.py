"""Pretrain a ZeroS language model (or the softmax / linear-attention baseline) and export it as a
Hugging Face directory.

``zeros-lm train`` and ``python train.py`` (the root wrapper) run this; the examples use the latter.

    python train.py                                   # the embedded default (configs/default.yaml):
                                                      # a BPE + a small ZeroS LM on Python's stdlib, CPU, ~10 min
    python train.py --config configs/smoke.yaml       # a few steps
    python train.py --config configs/small.yaml --config configs/zero3.yaml   # ~125M, DeepSpeed ZeRO-3
    python train.py --trainer.max_steps 200 --data.seq_len 512 --model.hidden_size 384
    python train.py --ckpt_path last                  # resume the run in trainer.default_root_dir
    python train.py --overwrite                       # replace the run in trainer.default_root_dir
    python train.py --print_config                    # the full configuration, as YAML
    python train.py --help

Every option of the model (--model.*), the data (--data.*), the Lightning Trainer (--trainer.*),
checkpointing (--checkpoint.*), throughput logging (--throughput.*) and the export (--export.*)
can be set in a YAML file or on the command line.

A run owns its --trainer.default_root_dir: a second run started there while it is alive is refused,
and so is a new run into a directory that holds an earlier one (its checkpoints or export) unless it
continues it (--ckpt_path last) or replaces it (--overwrite). Bad arguments, data, configuration
files and checkpoints are reported as one line starting with ``error:`` (exit status 2) before any
data is prepared where they can be; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningCLI

from zeros_lm.callbacks import HFExport, ModelSummaryWithoutFlops, StepProgressBar, ThroughputLogger, ZeroSCheckpoint
from zeros_lm.checkpoint import config_differences, stored_config
from zeros_lm.configuration_zeros import ZeroSConfig
from zeros_lm.data import DataError, TextDataModule
from zeros_lm.export import ExportError, check_checkpoint, newest_readable_checkpoint
from zeros_lm.rundir import RunError, claim_root_dir, remove_previous_run
from zeros_lm.training import ZeroSLitModule, check_model_arguments, model_config

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
LAST_CHECKPOINT = "last.ckpt"
# The model fields that follow the data module's tokenizer (linked when the classes are built).
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
# Model fields that say how the model runs, not what it computes: a resumed run may change them.
RESUME_MAY_CHANGE = ("attention_backend", "chunk_size", "use_cache")

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


def _launched_rank_zero() -> bool:
    """False in the processes a launcher (Lightning's own, torchrun, SLURM) started for ranks other
    than 0: only rank 0 claims the run directory."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_config_files(argv: list[str]) -> None:
    """A YAML syntax error in a --config file, as one line naming the file (jsonargparse would name
    none). Files that do not exist and inline YAML are left to the parser."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            continue
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise RunError(f"{path}: not valid YAML{where}: {problem}") from None
        except UnicodeDecodeError:
            raise RunError(f"{path}: not a YAML file (not UTF-8 text)") from None


def check_trainer_arguments(trainer: Any) -> None:
    max_steps = getattr(trainer, "max_steps", None)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise RunError(
            f"--trainer.max_steps must be a positive number of optimizer steps (or -1, to train for "
            f"--trainer.max_epochs), got {max_steps}"
        )


def _resume_path(ckpt_path: Optional[str], checkpoint_dir: str) -> Optional[Path]:
    """The checkpoint file (or DeepSpeed directory) a resume reads; None where Lightning resolves it."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return None
    return Path(checkpoint_dir) / LAST_CHECKPOINT if ckpt_path == "last" else Path(ckpt_path)


def check_resume_checkpoint(ckpt_path: Optional[str], checkpoint_dir: str) -> None:
    """An unreadable checkpoint to resume from (given, or behind ``last``), as one error naming the
    newest readable one."""
    path = _resume_path(ckpt_path, checkpoint_dir)
    if path is None:
        return
    if ckpt_path == "last":
        path = Path(checkpoint_dir) / LAST_CHECKPOINT
        if not os.path.lexists(path):
            newest = newest_readable_checkpoint(checkpoint_dir)
            if newest is not None:
                raise RunError(
                    f"--ckpt_path last: there is no {path}; the newest readable checkpoint there is {newest}: "
                    f"resume with --ckpt_path {newest}"
                )
            return  # nothing to resume: Lightning says so and starts afresh
    check_checkpoint(path)


def check_resume_model(ckpt_path: Optional[str], checkpoint_dir: str, model_arguments: dict) -> None:
    """A resume must build the model its checkpoint holds: one error naming every model field that
    the arguments (YAML and command line) set otherwise. Read from the checkpoint without its
    tensors, before any data work. The fields the tokenizer sets and those that only say how the
    model runs (:data:`RESUME_MAY_CHANGE`) are not compared, nor a derived field (head_dim, ...) left to
    its default on both sides: where it differs, a field it derives from does, and that one is named."""
    path = _resume_path(ckpt_path, checkpoint_dir)
    if path is None or not os.path.lexists(path):
        return
    stored = stored_config(path)
    if stored is None:
        return
    init_from = model_arguments.get("init_from")
    try:  # with init_from, the exported model's config replaces the model arguments
        requested = ZeroSConfig.from_pretrained(init_from) if init_from else model_config(model_arguments)
    except (OSError, ValueError):
        return  # reported where the model is built
    derived_in_both = () if init_from else tuple(
        name for name, value in stored.derived_defaults().items()
        if model_arguments.get(name) is None and getattr(stored, name, None) == value)
    differences = config_differences(stored, requested, ignore=TOKENIZER_FIELDS + RESUME_MAY_CHANGE + derived_in_both)
    if differences:
        where = f"in {init_from}" if init_from else "asked for"
        shown = "; ".join(
            f"{'' if init_from else '--model.'}{name} {_shown(asked)} {where}, {_shown(trained)} in the checkpoint"
            for name, trained, asked in differences
        )
        raise RunError(
            f"--ckpt_path {ckpt_path}: {path} was trained with another model ({shown}); resume with the run's "
            "own model options, or start a new run in another --trainer.default_root_dir"
        )


def _shown(value: Any) -> str:
    """A config value as it is written on the command line (true / null / [..])."""
    import json

    return json.dumps(value) if isinstance(value, (bool, list, type(None))) else str(value)


class ZeroSCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],
            default=None,
            help="resume training: a checkpoint path, or 'last' for the newest in <default_root_dir>/checkpoints",
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="replace the run that <default_root_dir> holds (its checkpoints and export) with a new one",
        )
        parser.add_lightning_class_args(ZeroSCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(HFExport, "export")
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # The model's vocabulary and special tokens follow the tokenizer that the data module owns.
        for key in TOKENIZER_FIELDS:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        # Whether the packed documents are kept apart describes the blocks: a data option.
        parser.link_arguments("data.document_resets", "model.document_resets")

    def before_instantiate_classes(self) -> None:
        config = self.config
        # Continuing from an exported directory: use its tokenizer unless told otherwise.
        if config.model.init_from and not config.data.tokenizer:
            config.data.tokenizer = config.model.init_from
        # Everything that can be checked cheaply is checked before the data is prepared.
        check_model_arguments(dict(config.model))
        check_trainer_arguments(config.trainer)
        root = config.trainer.default_root_dir or os.getcwd()
        checkpoint_dir = config.checkpoint.dirpath or _checkpoint_dir(root)
        check_resume_checkpoint(config.ckpt_path, checkpoint_dir)
        check_resume_model(config.ckpt_path, checkpoint_dir, dict(config.model))
        self.previous_run: list = []
        if _launched_rank_zero():
            export_dir = (config.export.dirpath or os.path.join(root, "hf")) if config.export.enabled else None
            self.previous_run = claim_root_dir(
                root, checkpoint_dir, export_dir, ckpt_path=config.ckpt_path, overwrite=config.overwrite
            )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Data and model are ready: only now does an overwritten run go (nothing is lost to a typo).
        remove_previous_run(getattr(self, "previous_run", []))

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self.config_init.get("trainer", {})
        if trainer_config.get("logger", True) in (True, None) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        configured = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = list(callbacks) + [StepProgressBar()]
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in configured):
            callbacks = list(callbacks) + [ModelSummaryWithoutFlops()]
        return super()._instantiate_trainer(config, callbacks)


def layer_mix(config) -> str:
    """The token mixers a config builds, in words: "zeros attention", "softmax attention" (every layer
    ``full_attention``), "zeros attention + 1 softmax layer in 4"."""
    kinds = config.mixer_types
    if len(set(kinds)) == 1:
        return f"{kinds[0]} attention"
    n_softmax = kinds.count("softmax")
    return f"{config.attention_type} attention + {n_softmax} softmax layer{'s' if n_softmax > 1 else ''} in {len(kinds)}"


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


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.prefixes)


# Printed on every run and of no use to it: Lightning's advertisement for its cloud logger, its note
# that our model summary (the one without the empty FLOPs column) replaces its default one, and a
# FutureWarning that Lightning's own pytree helper triggers in torch (nothing a user can act on).
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
OUR_SUMMARY_NOTE = f"Trainer already configured with model summary callbacks: [{ModelSummaryWithoutFlops!r}]"
PYTREE_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def quiet_known_noise() -> None:
    """Silence exactly the messages above; every other warning and log line stays."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(LITLOGGER_TIP, OUR_SUMMARY_NOTE))
    warnings.filterwarnings("ignore", message=PYTREE_LEAFSPEC_WARNING, category=FutureWarning)


def make_cli(args=None, run: bool = False) -> ZeroSCLI:
    quiet_known_noise()
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)):
        check_config_files([str(a) for a in argv])
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
    except (DataError, RunError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nInterrupted before training started.", file=sys.stderr)
        return EXIT_INTERRUPTED
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if trainer.is_global_zero:
        cfg = model.config
        print(
            f"Model: {layer_mix(cfg)}, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
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
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns Ctrl-C into a graceful shutdown and then exit(1).
        if isinstance(e, SystemExit) and not trainer.interrupted:
            raise
        if trainer.is_global_zero:
            last = Path(_checkpoint_dir(trainer.default_root_dir), LAST_CHECKPOINT)
            hint = "; continue from its last checkpoint with --ckpt_path last" if os.path.lexists(last) else ""
            print(f"Interrupted at step {trainer.global_step}{hint}.", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
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
