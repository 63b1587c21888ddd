"""Lightning pieces for pretraining: the LightningModule around ``ZeroSForCausalLM``, the
optimiser and schedule, throughput logging, atomic checkpoints that keep the last k, and the
Hugging Face export at the end of training."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from . import strategies  # noqa: F401  (registers the CPU-capable DeepSpeed strategy names)
from .strategies import deepspeed_offloads_optimizer, uses_deepspeed

__all__ = [
    "ZeroSLitModule",
    "ThroughputLogger",
    "ZeroSCheckpoint",
    "AtomicCheckpointIO",
    "HFExport",
    "StepProgressBar",
    "lr_lambda",
    "RunError",
    "check_model_arguments",
    "claim_root_dir",
    "remove_previous_run",
]

CHECKPOINT_KEY = "zeros_lm"


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _LRLambda:
    """Picklable schedule function (checkpoints of LambdaLR keep only its state)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_lambda(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class RunError(ValueError):
    """A problem with a run's arguments or its output directory, found before any data is prepared."""


_CONFIG_ARGUMENTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "rope_theta",
    "chunk_size", "attention_type", "first_layer_zero_order", "logit_type", "use_gates", "zero_order_all_layers",
    "use_output_norm", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id",
)


def _model_config(arguments: dict):
    from zeros_lm import ZeroSConfig

    return ZeroSConfig(**{k: arguments[k] for k in _CONFIG_ARGUMENTS if k in arguments}, use_cache=True)


def check_model_arguments(arguments: dict) -> None:
    """Raise :class:`RunError` (one line) for model or optimiser arguments that cannot train: what
    ``ZeroSConfig`` refuses (heads not dividing the width, an odd head dimension, a chunk size of 0,
    ...), a learning rate that is not positive, and schedule settings out of range. Cheap: ``train.py``
    calls it before any data is prepared."""

    def number(name):
        value = arguments.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def bad(message):
        return RunError(f"bad model argument: {message}")

    lr = number("learning_rate")
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise bad(f"--model.learning_rate must be a positive number, got {arguments.get('learning_rate')!r}")
    ratio = number("min_lr_ratio")
    if ratio is None or not 0 <= ratio <= 1:
        raise bad(f"--model.min_lr_ratio must be in [0, 1], got {arguments.get('min_lr_ratio')!r}")
    warmup = number("warmup_steps")
    if warmup is None or warmup < 0:
        raise bad(f"--model.warmup_steps must be >= 0, got {arguments.get('warmup_steps')!r}")
    decay = arguments.get("lr_decay_steps")
    if decay is not None and (number("lr_decay_steps") is None or decay <= 0):
        raise bad(f"--model.lr_decay_steps must be a positive number of steps, got {decay!r}")
    wd = number("weight_decay")
    if wd is None or wd < 0:
        raise bad(f"--model.weight_decay must be >= 0, got {arguments.get('weight_decay')!r}")
    if arguments.get("init_from"):
        return  # the exported model's own config replaces the model arguments
    try:
        _model_config(arguments)
    except ValueError as e:
        # ZeroSConfig names its fields; on the command line they are --model.<field>.
        message = " ".join(str(e).split()).replace("ZeroSConfig: ", "").replace("ZeroSConfig.", "--model.")
        raise bad(message) from None


RUN_LOCK_NAME = ".run.lock"
EXPORT_CHECK_NAME = "export_check.json"


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _checkpoint_entries(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if p.name.endswith(".ckpt"))


def claim_root_dir(
    root: str, checkpoint_dir: str, export_dir: Optional[str], resume: bool, overwrite: bool
) -> list[Path]:
    """Make ``root`` this run's own, before any data is prepared.

    Takes the run lock ``<root>/.run.lock`` (held until the process exits: a second live run in the
    same directory is refused at once), then refuses a directory that holds another run (checkpoints,
    or an export in ``export_dir``) unless this run continues it (``resume``) or replaces it
    (``overwrite``). Returns what a replacing run must remove once it is ready to train (see
    :func:`remove_previous_run`). Raises :class:`RunError`.
    """
    from ._locks import LockBusy, acquire, describe_holder

    root_path = Path(root)
    if resume and overwrite:
        raise RunError("--ckpt_path continues the run in the directory and --overwrite replaces it: give one of them")
    root_path.mkdir(parents=True, exist_ok=True)
    lock = root_path / RUN_LOCK_NAME
    try:
        acquire(lock, timeout=0)
    except LockBusy as e:
        raise RunError(
            f"another run ({describe_holder(e.holder)}) is using {root_path} right now; wait for it to finish, "
            "or give this one another --trainer.default_root_dir"
        ) from None
    checkpoints = _checkpoint_entries(Path(checkpoint_dir))
    export = Path(export_dir) if export_dir else None
    exported = export is not None and _non_empty(export)
    if resume or not (checkpoints or exported):
        return []
    held = []
    if checkpoints:
        files = [p for p in checkpoints if not p.is_symlink()] or checkpoints
        held.append(f"{len(files)} checkpoint(s) in {checkpoint_dir}")
    if exported:
        held.append(f"an export in {export}")
    if not overwrite:
        raise RunError(
            f"{root_path} holds another run ({' and '.join(held)}); continue it with --ckpt_path last, "
            "start a new run in another --trainer.default_root_dir, or replace it with --overwrite"
        )
    return [Path(checkpoint_dir)] + ([export] if exported else []) + [root_path / EXPORT_CHECK_NAME]


def remove_previous_run(paths: list[Path]) -> None:
    """Delete what :func:`claim_root_dir` listed (an overwritten run's checkpoints and export; its
    logs stay, in their own ``logs/version_N``)."""
    import shutil

    removed = [p for p in paths if p.exists() or p.is_symlink()]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if removed:
        rank_zero_info(f"Replacing the earlier run: removed {', '.join(str(p) for p in removed)}")


class ZeroSLitModule(LightningModule):
    """Causal-LM pretraining of a ``ZeroSForCausalLM`` (ZeroS, or the softmax / linear baselines).

    The model arguments are those of ``ZeroSConfig``; ``vocab_size`` and the special token ids
    follow the data module's tokenizer (linked in ``train.py``).

    Args:
        init_from: continue from an exported Hugging Face directory: its config and weights
            replace the model arguments.
        learning_rate: peak learning rate.
        min_lr_ratio: the cosine decay ends at ``learning_rate * min_lr_ratio``.
        warmup_steps: linear warmup, in optimizer steps.
        lr_decay_steps: length of the whole schedule in optimizer steps (default: the run's
            ``max_steps``). Set it to stop early or extend a run without changing the schedule.
        weight_decay: decoupled (AdamW) weight decay; not applied to norms, biases, embeddings and
            other 1-D parameters.
        betas: Adam betas.
        eps: Adam epsilon.
        optimizer: ``"auto"`` (torch AdamW, or DeepSpeed's CPU Adam when DeepSpeed offloads the
            optimizer), ``"adamw"``, ``"cpu_adam"`` (DeepSpeedCPUAdam) or ``"fused_adam"`` (DeepSpeed
            FusedAdam, CUDA).
        gradient_checkpointing: recompute activations in the backward pass (less memory).
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: Optional[int] = None,
        rope_theta: float = 10000.0,
        chunk_size: int = 64,
        attention_type: Literal["zeros", "softmax", "linear"] = "zeros",
        first_layer_zero_order: bool = True,
        logit_type: Literal["deviation", "norm"] = "deviation",
        use_gates: bool = True,
        zero_order_all_layers: bool = False,
        use_output_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        init_from: Optional[str] = None,
        learning_rate: float = 2e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 50,
        lr_decay_steps: Optional[int] = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = "auto",
        gradient_checkpointing: bool = False,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        check_model_arguments(arguments)
        from zeros_lm import ZeroSForCausalLM

        self.tokenizer_json: Optional[str] = None
        if init_from:
            if not os.path.isdir(init_from):
                raise ValueError(f"--model.init_from: no such directory {init_from!r}")
            self.model = ZeroSForCausalLM.from_pretrained(init_from, dtype=torch.float32)
            self.model.train()  # from_pretrained returns a model in eval mode
            if self.model.config.vocab_size != vocab_size:
                raise ValueError(
                    f"--model.init_from {init_from}: the model's vocabulary has {self.model.config.vocab_size} "
                    f"entries but the tokenizer has {vocab_size}; train with that model's tokenizer "
                    f"(--data.tokenizer {init_from})"
                )
            rank_zero_info(f"Model: continuing from {init_from} (its config replaces the model arguments)")
        else:
            config = _model_config(arguments)
            self.model = ZeroSForCausalLM(config)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val_sum: Optional[torch.Tensor] = None
        self._val_count: Optional[torch.Tensor] = None
        self._last_ds_step = -1

    # ------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)), on_step=True, on_epoch=False)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # DeepSpeed keeps (partitioned) gradients to itself: see on_train_batch_end.
        if uses_deepspeed(self.trainer.strategy):
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2.0)
            total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
            self.log("train/grad_norm", total, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if uses_deepspeed(self.trainer.strategy) and self.trainer.global_step != self._last_ds_step:
            self._last_ds_step = self.trainer.global_step
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm), on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # -- validation: token-weighted mean loss over all ranks ----------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        n = batch[:, 1:].numel()
        self._val_sum += loss.detach().double() * n
        self._val_count += n

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(count) == 0:
            return
        loss = (total / count).float()
        # Already summed over ranks: every rank holds the same value (sync_dist only silences
        # Lightning's advice to sync).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=50)), prog_bar=False, sync_dist=True)

    # -- optimiser and schedule ---------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups()
        choice = hp.optimizer
        strategy = self.trainer.strategy if self._trainer is not None else None
        if choice == "auto":
            choice = "cpu_adam" if strategy is not None and deepspeed_offloads_optimizer(strategy) else "adamw"
        kwargs = dict(lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps)
        if choice == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        elif choice == "fused_adam":
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(groups, adam_w_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        if hp.lr_decay_steps:
            total = int(hp.lr_decay_steps)
        else:
            estimate = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
            if not math.isfinite(estimate) or estimate <= 0:
                raise ValueError("set --trainer.max_steps (or --model.lr_decay_steps) for the learning-rate schedule")
            total = int(estimate)
        warmup = min(hp.warmup_steps, max(0, total - 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRLambda(warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints carry what an export needs -----------------------------------------------
    def _current_tokenizer_json(self) -> Optional[str]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            return tok.backend_tokenizer.to_str()
        return self.tokenizer_json

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "config": self.model.config.to_dict(),
            "tokenizer_json": self._current_tokenizer_json(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY) or {}
        self.tokenizer_json = extra.get("tokenizer_json") or self.tokenizer_json

    @torch.no_grad()
    def probe_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the model as it is now (all ranks must call this under ZeRO-3)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self(input_ids.to(self.device)).float().cpu()
        finally:
            self.model.train(was_training)


# ----------------------------------------------------------------------------------------------
class ThroughputLogger(Callback):
    """Logs training tokens per second (all ranks together, averaged over the last ``window``
    batches, validation time left out) and the number of training tokens seen."""

    def __init__(self, window: int = 20):
        self.window = window
        self._times: deque = deque(maxlen=window)
        self._last: Optional[float] = None
        self.tokens_seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        tokens = int(batch[:, 1:].numel()) * trainer.world_size
        self.tokens_seen += tokens
        if self._last is not None:
            self._times.append((now - self._last, tokens))
        self._last = now
        elapsed = sum(t for t, _ in self._times)
        if elapsed > 0:
            tok_s = sum(n for _, n in self._times) / elapsed
            pl_module.log("tok_s", tok_s, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = time.perf_counter() if self._last is not None else None

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))


# ----------------------------------------------------------------------------------------------
class StepProgressBar(TQDMProgressBar):
    """One progress bar over the whole run, counted in optimizer steps up to ``max_steps``, with
    the training loss (smoothed), the last validation loss and tokens/s (Lightning's own bar
    restarts every epoch)."""

    def on_train_epoch_start(self, trainer: Trainer, *args) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_start(trainer, *args)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.n = trainer.global_step
            bar.refresh()
        bar.set_description(f"Training (epoch {trainer.current_epoch})")

    _loss_ema: Optional[float] = None

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            loss = float(loss)
            ema = self._loss_ema
            self._loss_ema = loss if ema is None else ema + 0.05 * (loss - ema)
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        n = trainer.global_step
        if n != bar.n and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_end(trainer, pl_module)
            return
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown = {}
        if self._loss_ema is not None:
            shown["loss"] = f"{self._loss_ema:.3f}"  # smoothed over about 20 steps
            metrics.pop("train/loss", None)
        for key in ("train/loss", "val/loss", "tok_s"):
            if key in metrics:
                value = metrics[key]
                try:
                    value = float(value)
                    shown[key.replace("train/", "")] = f"{value:.0f}" if key == "tok_s" else f"{value:.3f}"
                except (TypeError, ValueError):
                    shown[key] = value
        return shown


# ----------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file next to its final name, fsyncs it, then renames it into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class ZeroSCheckpoint(ModelCheckpoint):
    """Checkpoint every ``every_n_train_steps`` optimizer steps, keep the last ``keep_last``, point
    ``last.ckpt`` at the newest (``--ckpt_path last`` resumes from it), and save once more when
    training ends. Writes are atomic: a crash mid-write leaves the previous checkpoints intact.

    Args:
        dirpath: the checkpoint directory (``train.py`` sets it to ``<default_root_dir>/checkpoints``).
        every_n_train_steps: interval in optimizer steps.
        keep_last: how many step checkpoints to keep (-1: all).
        save_on_train_end: also save at the last step.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        every_n_train_steps: int = 200,
        keep_last: int = 2,
        save_on_train_end: bool = True,
        filename: str = "step={step:07d}",
    ):
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_train_steps,
            save_last="link",
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self.save_on_train_end = save_on_train_end

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not uses_deepspeed(strategy) and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            # A name no other saver uses (two savers in one directory must not remove each
            # other's temporary link), then an atomic rename over the old link.
            tmp = f"{linkpath}.tmp-link-{os.getpid()}-{uuid.uuid4().hex}"
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            try:
                if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                    import shutil

                    shutil.rmtree(linkpath)
                os.replace(tmp, linkpath)
            finally:
                if os.path.lexists(tmp):
                    os.remove(tmp)
        trainer.strategy.barrier()

    def save_final(self, trainer: Trainer) -> Optional[str]:
        """Save at the current step unless that was done already; returns the checkpoint path."""
        if self._last_global_step_saved != trainer.global_step and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return self._last_checkpoint_saved or None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_on_train_end and not trainer.sanity_checking:
            self.save_final(trainer)


# ----------------------------------------------------------------------------------------------
class HFExport(Callback):
    """At the end of training, export a Hugging Face directory (safetensors, config with auto_map
    and the modeling code, tokenizer, generation_config), check that it reproduces the trained
    model's logits, and print the command that streams a sample from it.

    Args:
        dirpath: the output directory (default ``<default_root_dir>/hf``).
        enabled: set false to skip the export.
        prompt: the prompt shown in the printed ``generate.py`` command.
        max_new_tokens: default length of generations (written to generation_config.json).
        temperature: default sampling temperature.
        top_p: default nucleus sampling threshold.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        enabled: bool = True,
        prompt: str = "def main(",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_p: float = 0.95,
    ):
        self.dirpath = dirpath
        self.enabled = enabled
        self.prompt = prompt
        self.generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.exported_to: Optional[str] = None
        self.check: Optional[dict] = None

    def command(self) -> Optional[str]:
        """The command that streams a sample from the export (after training)."""
        if self.exported_to is None:
            return None
        return f"python generate.py {_shell_quote(self.exported_to)} --prompt {_shell_quote(self.prompt)}"

    def out_dir(self, trainer: Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "hf")

    def _probe(self, trainer: Trainer, pl_module: ZeroSLitModule) -> torch.Tensor:
        dm = getattr(trainer, "datamodule", None)
        corpus = getattr(dm, "corpus", None)
        source = None
        if corpus is not None:
            source = corpus.val if corpus.val is not None else corpus.train
        if source is not None and len(source) > 0:
            n = min(2, len(source))
            ids = torch.as_tensor([source[i]["input_ids"][:64] for i in range(n)], dtype=torch.long)
        else:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, pl_module.config.vocab_size, (2, 64), generator=g)
        return ids

    def on_train_end(self, trainer: Trainer, pl_module: ZeroSLitModule) -> None:
        if not self.enabled or trainer.global_step == 0:
            return
        from .export import export_from_checkpoint, export_model, compare_logits

        out = self.out_dir(trainer)
        probe = self._probe(trainer, pl_module)
        reference = pl_module.probe_logits(probe)  # every rank: ZeRO-3 gathers parameters
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        ckpt = None
        if uses_deepspeed(trainer.strategy):
            # The fp32 master weights live (partitioned) in DeepSpeed's optimizer: go through a
            # checkpoint, which every rank takes part in writing.
            cb = trainer.checkpoint_callback
            if isinstance(cb, ZeroSCheckpoint):
                ckpt = cb.save_final(trainer)
            if ckpt is None:
                ckpt = os.path.join(trainer.default_root_dir, "checkpoints", f"final-step={trainer.global_step}.ckpt")
                trainer.save_checkpoint(ckpt)
        if trainer.is_global_zero:
            t0 = time.time()
            # The directory was claimed for this run when it started (train.py refuses one that
            # holds another run's export unless told to overwrite); it is replaced as a whole.
            if ckpt is not None:
                export_from_checkpoint(ckpt, out, tokenizer=tokenizer, generation=self.generation, overwrite=True)
            else:
                export_model(pl_module.model, tokenizer, out, generation=self.generation, overwrite=True)
            self.check = compare_logits(out, probe, reference)
            self.exported_to = out
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            Path(trainer.default_root_dir, "export_check.json").write_text(
                json.dumps({"export_dir": out, "step": trainer.global_step, **self.check}, indent=1)
            )
            tol = 1e-4 if trainer.precision in ("32", "32-true", "64", "64-true") else 1e-1
            status = "OK" if self.check["max_abs_diff"] <= tol else "MISMATCH"
            print(
                f"\nExported a Hugging Face model to {out} ({time.time() - t0:.1f} s); reloaded with "
                f"from_pretrained, max |logit difference| = {self.check['max_abs_diff']:.2e} [{status}]",
                flush=True,
            )
            if status != "OK":
                rank_zero_warn(f"the exported model's logits differ from the trained model's by {self.check}")
        trainer.strategy.barrier("zeros_lm_export")


def _shell_quote(s: str) -> str:
    """Quote for a POSIX shell, with double quotes where that reads naturally."""
    import shlex

    if s and all(c.isalnum() or c in "-_./=:+," for c in s):
        return s
    if not any(c in s for c in '"\\$`!\n'):
        return f'"{s}"'
    return shlex.quote(s)
