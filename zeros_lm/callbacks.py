"""The callbacks of a training run: a progress bar counted in optimizer steps, throughput logging,
atomic checkpoints that keep the last k, and the Hugging Face export at the end of training."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .atomic import atomic_symlink, atomic_write_file, remove_stale_temporaries
from .export import compare_logits, export_from_checkpoint, export_model
from .flops import model_flops_per_token, peak_flops_of
from .rundir import EXPORT_CHECK_NAME
from .strategies import uses_deepspeed

__all__ = [
    "ThroughputLogger",
    "StepProgressBar",
    "ModelSummaryWithoutFlops",
    "AtomicCheckpointIO",
    "ZeroSCheckpoint",
    "HFExport",
]


# ----------------------------------------------------------------------------------------------
class ThroughputLogger(Callback):
    """Logs training tokens per second (all ranks together, averaged over the last ``window``
    batches, validation time left out), the number of training tokens seen, and on a GPU the model
    FLOPs utilisation ``mfu``: tokens/s x training FLOPs per token (``model_flops_per_token``) over the
    devices' peak.

    Args:
        window: batches in the moving average.
        peak_flops: peak FLOP/s of one device (default: the bf16 peak of a known GPU, see
            ``zeros_lm.flops.PEAK_BF16_FLOPS``; no MFU where it is unknown, e.g. on a CPU).
    """

    def __init__(self, window: int = 20, peak_flops: Optional[float] = None):
        self.window = window
        self.peak_flops = peak_flops
        self._times: deque = deque(maxlen=window)
        self._last: Optional[float] = None
        self._flops_per_token: Optional[float] = None
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
            peak = self.peak_flops or peak_flops_of(pl_module.device)
            if peak:
                if self._flops_per_token is None:
                    self._flops_per_token = model_flops_per_token(pl_module.model, seq_len=int(batch.shape[1]) - 1)
                mfu = tok_s * self._flops_per_token / (peak * trainer.world_size)
                pl_module.log("mfu", mfu, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
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
class ModelSummaryWithoutFlops(ModelSummary):
    """Lightning's model summary without its FLOPs column when that is empty (all zeros, as it is
    unless the module has an ``example_input_array``; ours has none: the FLOPs of a language model
    depend on the sequence length)."""

    FLOPS_COLUMN = "FLOPs"

    @staticmethod
    def summarize(summary_data, *args: Any, **kwargs: Any) -> None:
        def empty_flops(column) -> bool:
            name, values = column
            return name == ModelSummaryWithoutFlops.FLOPS_COLUMN and all(str(v).strip() == "0" for v in values)

        ModelSummary.summarize([c for c in summary_data if not empty_flops(c)], *args, **kwargs)


# ----------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file next to its final name, fsyncs it, then renames it into place
    (:func:`zeros_lm.atomic.atomic_write_file`)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)

        atomic_write_file(path, write)


class ZeroSCheckpoint(ModelCheckpoint):
    """Checkpoint every ``every_n_train_steps`` optimizer steps, keep the last ``keep_last``, point
    ``last.ckpt`` at the newest (``--ckpt_path last`` resumes from it), and save once more when
    training ends. Writes are atomic: a crash mid-write leaves the previous checkpoints intact, and
    what it left half-written is removed when the next run starts.

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
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temporaries(self.dirpath)  # what saves that were killed left half-written

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            # (a temporary link no other saver uses, renamed over the old one)
            atomic_symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), linkpath)
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

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
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

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.global_step == 0:
            return
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
            Path(trainer.default_root_dir, EXPORT_CHECK_NAME).write_text(
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
