"""The report's harness: training a module through Lightning with timing, the state of one run,
the machine's description and the default precision."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback

from .presets import PARAM_TOLERANCE, ModelRow, Preset

REPO = Path(__file__).resolve().parents[2]


def _quiet_lightning() -> None:
    # (lightning sets its loggers' levels when imported, at the top of this file: override them here)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Precision bf16-mixed is not supported by the model summary.*")
    warnings.filterwarnings("ignore", message=r".*isn't set, and the GPU.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LightningModule.*only be called by the Trainer.*")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Recorder(Callback):
    """Records every validation's metrics, and the training time per step after a warm-up, with
    the validation time left out (synchronising the GPU at each boundary)."""

    def __init__(self, device: str, warm_steps: int):
        self.device, self.warm_steps = device, warm_steps
        self.evals: list[dict] = []
        self._t0: Optional[float] = None
        self._steps0 = 0
        self._val_time = 0.0
        self._tv: Optional[float] = None
        self.train_seconds = 0.0
        self.timed_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warm_steps and self._t0 is None:
            _sync(self.device)
            self._t0, self._steps0, self._val_time = time.perf_counter(), trainer.global_step, 0.0

    def on_validation_start(self, trainer, pl_module):
        _sync(self.device)
        self._tv = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        _sync(self.device)
        if self._tv is not None:
            self._val_time += time.perf_counter() - self._tv
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.evals.append({"step": int(trainer.global_step), **metrics})

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0 - self._val_time
            self.timed_steps = trainer.global_step - self._steps0


def fit(module, datamodule, *, steps: int, val_every: int, run: "Run", limit_val=None, callbacks=()) -> dict:
    """Train ``module`` for ``steps`` optimizer steps with validation every ``val_every`` steps (and
    any further Lightning ``callbacks``)."""
    from lightning.pytorch import Trainer

    recorder = Recorder(run.device, warm_steps=min(max(2, steps // 20), max(0, steps - 2)))
    trainer = Trainer(
        accelerator="gpu" if run.device == "cuda" else "cpu",
        devices=1,
        precision=run.precision,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=limit_val,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run.scratch,
        callbacks=[recorder, *callbacks],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if limit_val != 0 and (not recorder.evals or recorder.evals[-1]["step"] != trainer.global_step):
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final numbers are at the last step
    wall = time.perf_counter() - t0
    module.eval()
    steps_per_s = recorder.timed_steps / recorder.train_seconds if recorder.train_seconds > 0 else float("nan")
    return {"evals": recorder.evals, "steps_per_s": steps_per_s, "wall_s": wall, "steps": int(trainer.global_step)}


def lm_module(p: Preset, dm, attention_type: str, num_layers: int, hidden: int, heads: int, steps: int, **extra):
    from zeros_lm.training import ZeroSLitModule

    return ZeroSLitModule(
        vocab_size=dm.vocab_size, bos_token_id=dm.bos_token_id, eos_token_id=dm.eos_token_id,
        pad_token_id=dm.pad_token_id, hidden_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, chunk_size=p.chunk_size, attention_type=attention_type,
        learning_rate=p.lm_lr, warmup_steps=max(1, round(p.lm_warmup_frac * steps)), **extra,
    )


# Model rows (presets.MODEL_ROWS): config overrides, support by the installed model, parameter matching
SOFTMAX_EVERY = "softmax_every"  # the rows' shorthand for a hybrid stack
LAYERS_FRACTION = "layers_fraction"  # the rows' shorthand for a depth relative to the section's
LINEAR_LAYER, SOFTMAX_LAYER = "linear_attention", "full_attention"  # layer_types entries (HF vocabulary)


class RowSkipped(Exception):
    """A model row this model or this section cannot build; the message says why (shown in the report)."""


def row_overrides(row: ModelRow, num_layers: int) -> dict:
    """The row's config arguments in a section of ``num_layers``-layer models: ``layers_fraction: f``
    becomes ``num_hidden_layers`` (``round(f * num_layers)``), then ``softmax_every: N`` becomes
    ``layer_types`` (softmax at layers N, 2N, ...). Raises RowSkipped when the row would have no
    layer, or its stack no softmax layer (fewer than N layers)."""
    overrides = dict(row.overrides)
    fraction = overrides.pop(LAYERS_FRACTION, None)
    if fraction is not None:
        depth = round(fraction * num_layers)
        if depth < 1:
            raise RowSkipped(f"{fraction:g} of {num_layers} layers rounds to no layer; these models need more layers")
        overrides["num_hidden_layers"] = num_layers = depth
    every = overrides.pop(SOFTMAX_EVERY, None)
    if every is not None:
        if num_layers < every:
            raise RowSkipped(f"one softmax layer in {every} needs at least {every} layers; these models have {num_layers}")
        overrides["layer_types"] = [SOFTMAX_LAYER if (i + 1) % every == 0 else LINEAR_LAYER for i in range(num_layers)]
    return overrides


def unsupported_fields(overrides: dict) -> list[str]:
    """The override names that ``ZeroSConfig`` does not name as an argument (it would silently keep
    an unknown keyword as an attribute, so ask its signature), or that ``ZeroSLitModule`` does not
    take (by name, or through its ``**config``)."""
    import inspect

    from zeros_lm import ZeroSConfig
    from zeros_lm.training import ZeroSLitModule

    config_fields = set(inspect.signature(ZeroSConfig.__init__).parameters)
    module_params = inspect.signature(ZeroSLitModule.__init__).parameters
    module_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in module_params.values())
    return [name for name in overrides
            if name not in config_fields or not (module_takes_any or name in module_params)]


def softmax_share(attention_type: str, overrides: dict) -> float:
    """Share of the layers that are softmax (the ones whose state grows with the context)."""
    types = overrides.get("layer_types")
    if types is None:
        return 1.0 if attention_type == "softmax" else 0.0
    return sum(t == SOFTMAX_LAYER for t in types) / len(types)


def build_row(row: ModelRow, num_layers: int, build: Callable[..., Any], reference_params: Optional[int] = None):
    """Build a row's module with ``build(attention_type=..., **overrides)`` (``overrides`` may hold
    ``num_hidden_layers``, the row's own depth, which ``build`` must take over the section's), its parameter count
    matched to ``reference_params`` within PARAM_TOLERANCE by the MLP width when it is further off.

    Returns (module, overrides used). Raises RowSkipped (with the reason) when the installed model
    does not accept the row's fields or refuses their values.
    """
    overrides = row_overrides(row, num_layers)
    missing = unsupported_fields(overrides)
    if missing:
        raise RowSkipped(f"the model does not accept {', '.join(f'`{m}`' for m in missing)} yet "
                         "(zeros_lm.ZeroSConfig / ZeroSLitModule)")
    try:
        module = build(attention_type=row.attention_type, **overrides)
        if reference_params:
            count = module.num_parameters()
            if abs(count - reference_params) > PARAM_TOLERANCE * reference_params:
                # the MLP's parameters are linear in its width: two points give the width that matches
                inner = module.model.config.intermediate_size
                wider = build(attention_type=row.attention_type, **overrides, intermediate_size=inner + 64).num_parameters()
                width = inner + round(64 * (reference_params - count) / (wider - count))
                overrides = {**overrides, "intermediate_size": max(8, width)}
                module = build(attention_type=row.attention_type, **overrides)
    except (TypeError, ValueError) as err:
        raise RowSkipped(f"the model refused the row's settings {overrides}: {err}") from err
    return module, overrides


# Run state
@dataclass
class Run:
    preset: Preset
    device: str
    precision: str
    out: Path
    seed: int
    cache_dir: Optional[str]
    scratch: str
    sections: tuple
    argv: list
    started: float = field(default_factory=time.time)
    results: dict = field(default_factory=dict)
    lm_models: dict = field(default_factory=dict)  # model row key -> trained ZeroSForCausalLM
    models: Optional[tuple] = None  # model row keys to train (None: all of presets.MODEL_ROWS)
    datamodule: Any = None
    writer: Optional[Callable[["Run"], None]] = None  # (re)writes the report from what has run so far

    def save(self) -> None:
        if self.writer is not None:
            self.writer(self)

    def seed_all(self, offset: int = 0) -> None:
        from lightning.pytorch import seed_everything

        seed_everything(self.seed + offset, workers=True, verbose=False)


def log(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# 1. Language modelling (+ ablations)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(run: Run) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "lightning", "transformers", "tokenizers", "datasets", "numpy", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    import zeros_lm

    versions["zeros_lm"] = zeros_lm.__version__
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    env = {
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gib": round(mem, 1) if mem else None,
        "device": run.device, "precision": run.precision, "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if _git("rev-parse", "HEAD") else None,
    }
    if run.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# Plots


def default_precision(device: str, mode: str) -> str:
    """bf16-mixed on a GPU, and for the full mode on a CPU with native bf16 matmuls (AVX512-BF16 /
    AMX: ~1.3x faster there); 32-true otherwise."""
    if device == "cuda":
        return "bf16-mixed"
    bf16_probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private; absent in some builds
    native_bf16 = torch.backends.mkldnn.is_available() and bf16_probe is not None and bool(bf16_probe())
    return "bf16-mixed" if mode == "full" and native_bf16 else "32-true"
