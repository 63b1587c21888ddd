"""The LightningModule of pretraining: ``ZeroSLitModule`` around a ``ZeroSForCausalLM``, its loss
and validation metrics, the optimiser and the warmup + cosine schedule, and the check of its
arguments. The callbacks of a run are in :mod:`zeros_lm.callbacks`, the run directory in
:mod:`zeros_lm.rundir`, what a checkpoint holds in :mod:`zeros_lm.checkpoint`."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from . import strategies  # noqa: F401  (registers the CPU-capable DeepSpeed strategy names)
from .callbacks import AtomicCheckpointIO, HFExport, StepProgressBar, ThroughputLogger, ZeroSCheckpoint  # noqa: F401
from .checkpoint import CHECKPOINT_KEY, config_fields, model_state
from .configuration_zeros import ZeroSConfig
from .modeling_zeros import ZeroSForCausalLM, packed_position_ids
from .rundir import RunError, claim_root_dir, remove_previous_run  # noqa: F401  (re-exported)
from .strategies import deepspeed_offloads_optimizer, uses_deepspeed

__all__ = [
    "ZeroSLitModule",
    "lr_lambda",
    "check_model_arguments",
    "model_config",
    # re-exported from their own modules
    "ThroughputLogger",
    "ZeroSCheckpoint",
    "AtomicCheckpointIO",
    "HFExport",
    "StepProgressBar",
    "RunError",
    "claim_root_dir",
    "remove_previous_run",
]


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


def model_config(arguments: dict) -> ZeroSConfig:
    """The ``ZeroSConfig`` that the model arguments (``--model.*``) describe."""
    return ZeroSConfig(**{k: arguments[k] for k in config_fields(ZeroSConfig) if k in arguments})


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
        model_config(arguments)
    except ValueError as e:
        # ZeroSConfig names its fields; on the command line they are --model.<field>.
        message = " ".join(str(e).split()).replace("ZeroSConfig: ", "").replace("ZeroSConfig.", "--model.")
        raise bad(message) from None

COMPILE_KWARGS: dict = {}  # passed to torch.compile for each block (tests use a cheaper backend)


def compile_blocks(model: ZeroSForCausalLM) -> None:
    """``torch.compile`` each decoder block in place, so parameter names (and checkpoints) stay unchanged."""
    for block in model.model.layers:
        block.compile(**COMPILE_KWARGS)


def model_flops_per_token(model: ZeroSForCausalLM, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of ``model`` on sequences of ``seq_len``:
    6 per weight that multiplies activations (all but the input embedding; the LM head counts, tied or not),
    plus each layer's token mixing, per head:

    - softmax: causal Q K^T and (weights) V over T / 2 keys on average: 2 * 2 * (T / 2) * d;
    - ZeroS: the same two products over C / 2 keys in a chunk of C, plus the state readout and update
      (three d x d matrices each): 2 * 2 * (C / 2) * d + 2 * 2 * 3 * d * d;
    - linear: as ZeroS with one d x d state.
    """
    config = model.config
    H, d, C = config.num_attention_heads, config.head_dim, min(config.chunk_size, seq_len)
    mixing = {"softmax": 2 * seq_len * d, "zeros": 2 * C * d + 12 * d * d, "linear": 2 * C * d + 4 * d * d}
    forward = sum(H * mixing[kind] for kind in config.mixer_types)
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() for p in model.parameters() if p is not embedding)
    if config.tie_word_embeddings:
        weights += embedding.numel()  # the tied head still multiplies
    return 6 * weights + 3 * forward


class ZeroSLitModule(LightningModule):
    """Causal-LM pretraining of a ``ZeroSForCausalLM`` (ZeroS, or the softmax / linear baselines).

    The model's own arguments (``**config``) are the fields of ``ZeroSConfig``, with its defaults;
    ``vocab_size`` and the special token ids follow the data module's tokenizer (linked by the
    training command, :mod:`zeros_lm.cli.train`).

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
        compile: compile every block with ``torch.compile`` (as nanoGPT and flame offer): on a GPU the
            elementwise work around the attention fuses; the fused ZeroS op is a registered custom op,
            so it does not break the graph. The first steps are slow while it compiles. With document
            resets the attention's packed paths (planned on the host from the documents' lengths) run
            outside the graph, so batches packed differently do not recompile.
        document_resets: the training blocks are packed as ``doc EOS doc EOS ...``; keep their
            documents apart (``position_ids`` restarting at each EOS, see
            :func:`~zeros_lm.modeling_zeros.packed_position_ids`: ZeroS and linear-attention states
            reset, softmax attention is block-diagonal, RoPE restarts), in training and validation
            alike. The option describes the blocks, so the training command sets it from
            ``--data.document_resets`` (a link, like the vocabulary): this module never looks at the
            data module. It needs the model's ``eos_token_id`` (the separator); without one a block
            is one document. The exported ``config.json`` says what was used:
            ``trained_with_document_resets``. Generation reads one document per row, so it is the
            same either way.
        config: the fields of ``ZeroSConfig`` (``hidden_size``, ``attention_type``, ...).
    """

    def __init__(
        self,
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
        compile: bool = False,
        document_resets: bool = True,
        **config: Any,
    ):
        unknown = sorted(set(config) - set(config_fields(ZeroSConfig)))
        if unknown:  # PreTrainedConfig would keep them as attributes and nothing would read them
            raise TypeError(f"ZeroSLitModule: {', '.join(unknown)} is not a field of ZeroSConfig")
        super().__init__()
        self.save_hyperparameters()
        check_model_arguments(dict(self.hparams))
        if init_from:
            if not os.path.isdir(init_from):
                raise ValueError(f"--model.init_from: no such directory {init_from!r}")
            self.model = ZeroSForCausalLM.from_pretrained(init_from, dtype=torch.float32)
            self.model.train()  # from_pretrained returns a model in eval mode
            vocab_size = config.get("vocab_size", ZeroSConfig().vocab_size)
            if self.model.config.vocab_size != vocab_size:
                raise ValueError(
                    f"--model.init_from {init_from}: the model's vocabulary has {self.model.config.vocab_size} "
                    f"entries but the tokenizer has {vocab_size}; train with that model's tokenizer "
                    f"(--data.tokenizer {init_from})"
                )
            rank_zero_info(f"Model: continuing from {init_from} (its config replaces the model arguments)")
        else:
            # The model's fields are ZeroSConfig's own: the command line and the YAML ``model:``
            # section offer exactly its parameters (jsonargparse follows **config into it).
            self.model = ZeroSForCausalLM(ZeroSConfig(**config))
        # Recorded in the model's config: the checkpoint and the exported config.json carry it.
        self.model.config.trained_with_document_resets = self.document_separator is not None
        if gradient_checkpointing:
            # transformers >= 5.x names it activation checkpointing (the old name warns); earlier 5.x lack it.
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile:
            compile_blocks(self.model)
        self._val_sum: Optional[torch.Tensor] = None
        self._val_count: Optional[torch.Tensor] = None
        self._last_ds_step = -1

    # ------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def document_separator(self) -> Optional[int]:
        """The token that separates the documents of a training block (the model's EOS), or None when
        the documents are not kept apart (``document_resets=False``, or no EOS)."""
        eos = self.model.config.eos_token_id
        return eos if self.hparams.document_resets and isinstance(eos, int) else None

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a batch of packed blocks (B, T + 1), each document on its own
        (see ``document_resets``)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        separator = self.document_separator
        logits = self(inputs, None if separator is None else packed_position_ids(inputs, separator))
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

    # -- checkpoints carry the model's config (the data module's state carries the tokenizer) ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = model_state(self.model.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A run resumed with the other setting goes on, but says so (checkpoints written before the
        # option existed were trained without resets).
        stored = bool((checkpoint.get("hyper_parameters") or {}).get("document_resets", False))
        if stored != bool(self.hparams.document_resets):
            rank_zero_warn(
                f"resuming a run trained with document_resets={stored} with document_resets="
                f"{self.hparams.document_resets}; pass --data.document_resets {str(stored).lower()} to keep it"
            )

    @torch.no_grad()
    def probe_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the model as it is now (all ranks must call this under ZeRO-3)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self(input_ids.to(self.device)).float().cpu()
        finally:
            self.model.train(was_training)
