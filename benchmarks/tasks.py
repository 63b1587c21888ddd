"""Synthetic tasks for the evidence report (``benchmarks/report.py``), and the thin Lightning pieces
that train on them with the framework's own ``ZeroSLitModule`` (same optimiser and schedule).

- MQAR (multi-query associative recall, zoology-style): a sequence opens with D key-value pairs,
  then the D keys are queried again, in a random order, at positions drawn from a power law that
  favours short gaps; every query key is followed by its value. The model is scored (and trained)
  only on predicting the value after each query key.
- Contrast: a sequence of random vectors x_i, two of them marked; the last token asks for
  x_{mark 1} - x_{mark 2}. A regression (MSE) task. With one head, any convex combination of
  values (softmax or normalised linear attention) mixes the two marked vectors with non-negative
  weights and cannot form their difference; a zero-sum attention (ZeroS) can.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from zeros_lm.training import ZeroSLitModule

__all__ = [
    "IGNORE",
    "mqar_default_pairs",
    "mqar_examples",
    "contrast_examples",
    "TaskDataModule",
    "recall_accuracy",
    "mqar_batch_size",
    "RecallCurve",
    "RecallLitModule",
    "ContrastLitModule",
    "make_task_module",
]

IGNORE = -100  # label of positions that are not scored


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def mqar_default_pairs(seq_len: int) -> int:
    """Key-value pairs per sequence: seq_len / 16 (4 at 64 tokens ... 32 at 512)."""
    return max(2, seq_len // 16)


def mqar_examples(num: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator,
                  power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` MQAR sequences: inputs (num, seq_len) and labels (num, seq_len).

    Token 0 is filler; keys come from [1, vocab/2), values from [vocab/2, vocab), distinct within a
    sequence. Layout: k_1 v_1 ... k_D v_D, then the query region of (seq_len - 2D) // 2 slots of two
    tokens; D of them, drawn with probability proportional to (slot + 1)^(power_a - 1), hold a
    query key and its value. The label at a query key's position is its value, -100 elsewhere.
    """
    half = vocab_size // 2
    slots = (seq_len - 2 * num_pairs) // 2
    if num_pairs < 1 or half - 1 < num_pairs or vocab_size - half < num_pairs or slots < num_pairs:
        raise ValueError(f"MQAR: {num_pairs} pairs do not fit seq_len={seq_len}, vocab_size={vocab_size}")
    uniform_keys = torch.ones(num, half - 1)
    keys = torch.multinomial(uniform_keys, num_pairs, replacement=False, generator=generator) + 1
    uniform_values = torch.ones(num, vocab_size - half)
    values = torch.multinomial(uniform_values, num_pairs, replacement=False, generator=generator) + half
    seq = torch.zeros(num, seq_len, dtype=torch.long)
    seq[:, 0 : 2 * num_pairs : 2] = keys
    seq[:, 1 : 2 * num_pairs : 2] = values

    slot_weights = (torch.arange(slots, dtype=torch.float64) + 1.0) ** (power_a - 1.0)
    chosen = torch.multinomial(slot_weights.expand(num, slots), num_pairs, replacement=False, generator=generator)
    order = torch.rand(num, num_pairs, generator=generator).argsort(dim=1)  # which key goes to which slot
    key_pos = 2 * num_pairs + 2 * chosen                                     # (num, D)
    rows = torch.arange(num)[:, None]
    seq[rows, key_pos] = keys.gather(1, order)
    seq[rows, key_pos + 1] = values.gather(1, order)
    labels = torch.full_like(seq, IGNORE)
    labels[rows, key_pos] = seq[rows, key_pos + 1]
    return seq, labels


def contrast_examples(num: int, seq_len: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` contrast sequences: features (num, seq_len, dim + 3) and targets (num, dim).

    Every position carries x_i ~ N(0, I_dim) and three flags: "first marked", "second marked",
    "query" (the last position). Two distinct earlier positions are marked; the target is
    x_{first} - x_{second}.
    """
    if seq_len < 3:
        raise ValueError("contrast: seq_len must be at least 3")
    x = torch.randn(num, seq_len, dim, generator=generator)
    picks = torch.rand(num, seq_len - 1, generator=generator).argsort(dim=1)[:, :2]  # two distinct positions
    rows = torch.arange(num)
    flags = torch.zeros(num, seq_len, 3)
    flags[rows, picks[:, 0], 0] = 1.0
    flags[rows, picks[:, 1], 1] = 1.0
    flags[:, -1, 2] = 1.0
    target = x[rows, picks[:, 0]] - x[rows, picks[:, 1]]
    return torch.cat([x, flags], dim=-1), target


class _FreshBatches(IterableDataset):
    """Endless fresh batches, seeded (the same run gives the same data). ``makers`` is a list of
    ``(make, batch_size)``; batches cycle through it (e.g. one sequence length after another)."""

    def __init__(self, makers, seed: int):
        self.makers, self.seed = makers, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        i = 0
        while True:
            make, batch_size = self.makers[i % len(self.makers)]
            i += 1
            yield make(batch_size, g)


class TaskDataModule(LightningDataModule):
    """A synthetic task: endless freshly generated training batches, and optionally a fixed
    validation set.

    Args:
        makers: ``[(make, batch_size), ...]`` where ``make(n, generator)`` returns a tuple of tensors
            with n rows; training batches cycle through the list.
        num_val: size of the validation set, drawn from the first maker (0: no validation).
        seed: seed of the training stream (the validation set uses another seed).
    """

    def __init__(self, makers, num_val: int = 0, seed: int = 0):
        super().__init__()
        self.makers, self.num_val, self.seed = list(makers), num_val, seed
        make, self.val_batch_size = self.makers[0]
        self.val = make(num_val, torch.Generator().manual_seed(seed + 1_000_003)) if num_val else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_FreshBatches(self.makers, self.seed), batch_size=None)

    def val_dataloader(self):
        if self.val is None:
            return []
        return DataLoader(TensorDataset(*self.val), batch_size=self.val_batch_size, shuffle=False)


@torch.no_grad()
def recall_accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    """Share of the labelled positions where the model's top next-token prediction is the label."""
    model.eval()
    correct = total = 0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        pred = model(input_ids=x, use_cache=False).logits.argmax(-1)
        scored = y != IGNORE
        correct += int(((pred == y) & scored).sum())
        total += int(scored.sum())
    return correct / max(1, total)


def mqar_batch_size(batch_tokens: int, seq_len: int) -> int:
    """Sequences per MQAR batch (training and scoring): about ``batch_tokens`` tokens, at least 8."""
    return max(8, batch_tokens // seq_len)


class RecallCurve(Callback):
    """Scores held-out sets every ``every`` optimizer steps during training and at the last one, to
    see *when* a model learns a task (recall is learned in a jump, after a plateau). ``score(model)``
    returns a list of accuracies (e.g. one per sequence length); ``points`` collects
    ``{"step": s, "accuracy": [...]}``. Scoring should read fixed sets only (no random numbers), so
    the training run is the same with or without it."""

    def __init__(self, score, every: int):
        self.score, self.every = score, every
        self.points: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        accuracy = self.score(pl_module.model)
        pl_module.model.train()  # recall_accuracy leaves it in eval mode
        self.points.append({"step": int(step), "accuracy": [round(a, 4) for a in accuracy]})


# ----------------------------------------------------------------------------------------------
# Lightning modules: ZeroSLitModule (its optimiser, schedule and model) with a task's loss
# ----------------------------------------------------------------------------------------------
class _TaskMetrics:
    """Validation as a token-weighted (or example-weighted) mean of a metric; no distributed reduce
    needed (the report trains on one device)."""

    def on_validation_epoch_start(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0.0

    def _accumulate(self, n: float, **metrics: float) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * n
        self._count += n

    def on_validation_epoch_end(self) -> None:
        if self._count:
            for key, total in self._sums.items():
                self.log(f"val/{key}", total / self._count)


class RecallLitModule(_TaskMetrics, ZeroSLitModule):
    """Next-token cross-entropy on the labelled positions only; validation reports accuracy there.

    Batches are (input_ids, labels) of equal shape (B, T), labels -100 where a position is not
    scored. The label of position t is the token the model should predict there (the next one):
    no further shift. Only the scored positions go through the LM head (the same loss as full
    logits, a fraction of their cost: a few positions per sequence are scored).
    """

    def _loss_and_logits(self, batch):
        inputs, labels = batch
        hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state  # (B, T, hidden)
        scored = labels != IGNORE
        logits = self.model.lm_head(hidden[scored])  # (number of scored positions, vocab)
        loss = F.cross_entropy(logits.float(), labels[scored])
        return loss, logits

    def _loss(self, batch):
        return self._loss_and_logits(batch)[0]

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._loss_and_logits(batch)
        target = batch[1][batch[1] != IGNORE]
        n = int(target.numel())
        self._accumulate(n, loss=loss, accuracy=float((logits.argmax(-1) == target).sum()) / max(1, n))


class ContrastLitModule(_TaskMetrics, ZeroSLitModule):
    """Regression of a vector read at the last position: a linear map of the features in place of
    the token embedding, a linear map of the last hidden state in place of the LM head, MSE loss.

    Takes ``ZeroSLitModule``'s arguments plus ``feature_dim`` and ``target_dim``.
    """

    def __init__(self, feature_dim: int, target_dim: int, **kwargs):
        super().__init__(**kwargs)
        hidden = self.model.config.hidden_size
        self.feature_proj = nn.Linear(feature_dim, hidden)
        self.target_proj = nn.Linear(hidden, target_dim)
        for lin in (self.feature_proj, self.target_proj):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
            nn.init.zeros_(lin.bias)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        for lin in (self.feature_proj, self.target_proj):
            groups[0]["params"].append(lin.weight)
            groups[1]["params"].append(lin.bias)
        return groups

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(inputs_embeds=self.feature_proj(features), use_cache=False).last_hidden_state
        return self.target_proj(hidden[:, -1]).float()

    def _loss(self, batch):
        features, target = batch
        return F.mse_loss(self.predict(features), target.float())

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        features, target = batch
        err = (self.predict(features) - target.float()).pow(2).sum(-1)
        # relative error: squared error over the target's squared norm, averaged over examples
        self._accumulate(len(target), mse=float(err.mean()) / target.shape[-1],
                         relative_error=float(err.sum() / target.float().pow(2).sum(-1).sum()))


def make_task_module(kind: str, **kwargs) -> ZeroSLitModule:
    return {"mqar": RecallLitModule, "contrast": ContrastLitModule}[kind](**kwargs)
