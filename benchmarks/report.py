#!/usr/bin/env python
"""Evidence report: ZeroS against softmax and plain linear attention, end to end, on this machine.

Trains every model with the framework's own code (``zeros_lm.training.ZeroSLitModule``: its model,
AdamW, warmup + cosine schedule, gradient clipping; ``zeros_lm.data.TextDataModule`` for language
modelling on the embedded standard-library corpus) and writes a Markdown report with plots:

1. Language modelling: ZeroS, softmax, linear at the same size, tokens, optimiser and schedule;
   validation-loss curves, final perplexity, training tokens/s; the paper's ablations (zero-order
   term in every layer, no gates, no output LayerNorm).
2. Length extrapolation: per-position loss of the LM models beyond their training length.
3. MQAR (multi-query associative recall): accuracy against sequence length and width, 2 layers.
4. Contrast: one layer, one head, regress x_first - x_second of two marked tokens.

    python benchmarks/report.py --quick             # about 5 minutes on a 2-core CPU (reports/quick/)
    python benchmarks/report.py                     # full (reports/): 10M LM tokens per model; on a CPU
                                                    # 4 layers x 128 wide, 95 minutes on 2 cores; on a
                                                    # GPU 4 layers x 256 wide, bf16-mixed (not yet run to the end)
    python benchmarks/report.py --sections lm,extrapolation --lm-tokens 1e6 --out /tmp/lm_only

Sections run in the order lm, extrapolation, contrast, ablations, mqar, and the report is rewritten
after every model, so an interrupted run leaves a valid (marked incomplete) report. Every number in
the report comes from the run that wrote it (results.json holds them all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

SECTIONS = ("lm", "extrapolation", "contrast", "ablations", "mqar")  # the order they run in
MAIN_TYPES = ("zeros", "softmax", "linear")
ABLATIONS = {  # name -> ZeroSLitModule arguments on top of attention_type="zeros"
    "zeros, zero-order term in every layer": {"zero_order_all_layers": True},
    "zeros, no gates": {"use_gates": False},
    "zeros, no output LayerNorm": {"use_output_norm": False},
}
LABELS = {"zeros": "ZeroS", "softmax": "softmax", "linear": "linear"}
PLOT_DPI = 110
COLORS = {"zeros": "tab:blue", "softmax": "tab:orange", "linear": "tab:green"}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclass
class Preset:
    name: str
    # language modelling (and extrapolation)
    lm_files: tuple = ("stdlib",)
    lm_vocab: int = 4096
    lm_layers: int = 4
    lm_hidden: int = 256
    lm_heads: int = 4
    lm_seq: int = 512
    lm_batch: int = 64
    lm_tokens: int = 10_000_000  # training tokens per model
    lm_evals: int = 10  # validation points along each run
    lm_val_fraction: float = 0.02
    lm_lr: float = 2e-3
    lm_warmup_frac: float = 0.05
    chunk_size: int = 64
    extrap_factor: int = 8  # evaluate up to extrap_factor x lm_seq
    extrap_windows: int = 16
    # MQAR
    mqar_lengths: tuple = (64, 128, 256, 512)
    mqar_widths: tuple = (64, 256)
    mqar_heads: int = 2
    mqar_vocab: int = 512
    mqar_steps: int = 800
    mqar_batch_tokens: int = 32768  # batch size = mqar_batch_tokens / T
    mqar_lr: float = 3e-3
    mqar_val: int = 512
    # contrast
    contrast_seq: int = 32
    contrast_dim: int = 16
    contrast_width: int = 64
    contrast_steps: int = 500
    contrast_batch: int = 256
    contrast_lr: float = 3e-3
    contrast_val: int = 2048

    @property
    def lm_steps(self) -> int:
        return max(1, math.ceil(self.lm_tokens / (self.lm_batch * self.lm_seq)))  # at least lm_tokens


PRESETS = {
    # The full mode on a GPU: the sizes (4 layers x 256, 10M tokens per LM, two MQAR widths).
    "full-gpu": Preset("full-gpu"),
    # The full mode on a CPU, sized to fit two hours on 2 cores (95 min measured): still 10M tokens per LM model
    # (six of them), but 128 wide (the 256-wide models train at ~5k tok/s here, 3.5 h for six) and
    # one MQAR width.
    "full": Preset(
        "full",
        lm_vocab=2048, lm_hidden=128, lm_heads=2, lm_batch=16,
        mqar_widths=(64,), mqar_steps=1200, mqar_batch_tokens=8192, mqar_val=256,
    ),
    "quick": Preset(
        "quick",
        lm_files=("stdlib:email", "stdlib:json", "stdlib:collections", "stdlib:asyncio"),
        lm_vocab=1024, lm_layers=2, lm_hidden=128, lm_heads=2, lm_seq=256, lm_batch=8, lm_tokens=250_000,
        lm_evals=5, lm_val_fraction=0.04, extrap_factor=8, extrap_windows=8,
        mqar_lengths=(64, 128, 256), mqar_widths=(64,), mqar_steps=250, mqar_batch_tokens=4096,
        mqar_val=128, contrast_steps=400, contrast_batch=64, contrast_val=512,
    ),
    # For tests: every code path, in seconds.
    "smoke": Preset(
        "smoke",
        lm_files=("stdlib:json",), lm_vocab=300, lm_layers=1, lm_hidden=32, lm_heads=2, lm_seq=32, lm_batch=4,
        lm_tokens=1280, lm_evals=2, lm_val_fraction=0.1, chunk_size=16, extrap_factor=4, extrap_windows=4,
        mqar_lengths=(32, 64), mqar_widths=(32,), mqar_vocab=64, mqar_steps=6, mqar_batch_tokens=256, mqar_val=16,
        contrast_seq=8, contrast_dim=4, contrast_width=32, contrast_steps=6, contrast_batch=16, contrast_val=32,
    ),
}


# ----------------------------------------------------------------------------------------------
# Training through the framework
# ----------------------------------------------------------------------------------------------
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


def fit(module, datamodule, *, steps: int, val_every: int, run: "Run", limit_val=None) -> dict:
    """Train ``module`` for ``steps`` optimizer steps with validation every ``val_every`` steps."""
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
        callbacks=[recorder],
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


# ----------------------------------------------------------------------------------------------
# Run state
# ----------------------------------------------------------------------------------------------
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
    lm_models: dict = field(default_factory=dict)  # attention type -> trained ZeroSLitModule
    datamodule: Any = None

    def seed_all(self, offset: int = 0) -> None:
        from lightning.pytorch import seed_everything

        seed_everything(self.seed + offset, workers=True, verbose=False)


def log(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Language modelling (+ ablations)
# ----------------------------------------------------------------------------------------------
def lm_data(run: Run):
    if run.datamodule is None:
        from zeros_lm.data import TextDataModule

        p = run.preset
        run.datamodule = TextDataModule(
            train_files=list(p.lm_files), tokenizer_vocab_size=p.lm_vocab, seq_len=p.lm_seq, batch_size=p.lm_batch,
            val_fraction=p.lm_val_fraction, cache_dir=run.cache_dir, seed=run.seed,
        )
        s = run.datamodule.corpus.stats
        run.results["lm_data"] = {
            "sources": list(p.lm_files), "documents": s.get("documents"), "tokens": s.get("tokens"),
            "train_blocks": s.get("train_blocks"), "val_blocks": s.get("val_blocks"), "vocab_size": run.datamodule.vocab_size,
        }
    return run.datamodule


def train_lm(run: Run, name: str, attention_type: str, extra: dict) -> dict:
    p = run.preset
    dm = lm_data(run)
    steps = p.lm_steps
    val_every = max(1, steps // p.lm_evals)
    run.seed_all()
    module = lm_module(p, dm, attention_type, p.lm_layers, p.lm_hidden, p.lm_heads, steps, **extra)
    log(f"LM {name}: {module.num_parameters() / 1e6:.2f} M parameters, {steps} steps of {p.lm_batch}x{p.lm_seq} tokens")
    res = fit(module, dm, steps=steps, val_every=val_every, run=run)
    tokens_per_step = p.lm_batch * p.lm_seq
    final = res["evals"][-1] if res["evals"] else {}
    out = {
        "attention_type": attention_type, "options": extra, "parameters": module.num_parameters(),
        "steps": res["steps"], "train_tokens": res["steps"] * tokens_per_step,
        "curve": [{"tokens": e["step"] * tokens_per_step, "val_loss": e.get("val/loss")} for e in res["evals"]],
        "final_val_loss": final.get("val/loss"), "final_val_ppl": math.exp(final["val/loss"]) if "val/loss" in final else None,
        "tokens_per_s": res["steps_per_s"] * tokens_per_step, "wall_s": res["wall_s"],
    }
    log(f"LM {name}: val loss {out['final_val_loss']:.4f}, {out['tokens_per_s']:.0f} tok/s, {res['wall_s']:.0f} s")
    return out, module


def section_lm(run: Run) -> None:
    lm = run.results.setdefault("lm", {})
    for attention_type in MAIN_TYPES:
        lm[attention_type], module = train_lm(run, attention_type, attention_type, {})
        run.lm_models[attention_type] = module
        write_report(run)


def section_ablations(run: Run) -> None:
    lm = run.results.setdefault("lm", {})
    for name, extra in ABLATIONS.items():
        lm[name], _ = train_lm(run, name, "zeros", extra)
        write_report(run)


# ----------------------------------------------------------------------------------------------
# 2. Length extrapolation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def per_position_loss(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    """Mean next-token loss at every position of the windows (n, L + 1), float32, batch of one."""
    model = model.to(device).eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for w in windows:
        ids = w.to(device)[None]
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        ce = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")
        total += ce.double().cpu()
    return total / len(windows)


def section_extrapolation(run: Run) -> None:
    import numpy as np

    p = run.preset
    dm = lm_data(run)
    length = p.lm_seq * p.extrap_factor
    val = np.asarray(dm.corpus.val.with_format("numpy")["input_ids"], dtype=np.int64).reshape(-1)
    n = min(p.extrap_windows, len(val) // (length + 1))
    res: dict = {"train_length": p.lm_seq, "eval_length": length, "windows": n, "models": {}}
    run.results["extrapolation"] = res
    if n == 0:
        res["skipped"] = f"the validation split holds {len(val)} tokens, less than one window of {length + 1}"
        write_report(run)
        return
    windows = torch.from_numpy(val[: n * (length + 1)].reshape(n, length + 1))
    for attention_type in MAIN_TYPES:
        module = run.lm_models.get(attention_type)
        if module is None:
            continue
        t0 = time.perf_counter()
        loss = per_position_loss(module.model.float(), windows, run.device)
        ranges = {}
        lo = 0
        hi = p.lm_seq
        while lo < length:
            ranges[f"{lo}-{hi}"] = float(loss[lo:hi].mean())
            lo, hi = hi, min(length, hi * 2)
        res["models"][attention_type] = {"per_position": [round(float(x), 5) for x in loss], "ranges": ranges,
                                         "seconds": time.perf_counter() - t0}
        log(f"extrapolation {attention_type}: " + ", ".join(f"[{k}) {v:.3f}" for k, v in ranges.items()))
    write_report(run)


# ----------------------------------------------------------------------------------------------
# 3. MQAR
# ----------------------------------------------------------------------------------------------
def train_task(run: Run, kind: str, dm, *, attention_type: str, layers: int, hidden: int, heads: int, vocab: int,
               steps: int, lr: float, evals: int, limit_val=None, **extra) -> tuple[dict, Any]:
    from benchmarks.tasks import make_task_module

    module = make_task_module(
        kind, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        chunk_size=run.preset.chunk_size, attention_type=attention_type, learning_rate=lr,
        warmup_steps=max(1, steps // 20), weight_decay=0.0 if kind == "contrast" else 0.1, **extra,
    )
    res = fit(module, dm, steps=steps, val_every=max(1, steps // evals), run=run, limit_val=limit_val)
    return res, module


def section_mqar(run: Run) -> None:
    """Zoology's protocol: one model per (attention type, width), trained on a mixture of the
    sequence lengths (one length per batch, in turn), then scored on held-out data at each length."""
    from benchmarks.tasks import TaskDataModule, mqar_default_pairs, mqar_examples, recall_accuracy

    p = run.preset
    res: dict = {"layers": 2, "heads": p.mqar_heads, "vocab": p.mqar_vocab, "steps": p.mqar_steps, "lr": p.mqar_lr,
                 "lengths": list(p.mqar_lengths), "cells": []}
    run.results["mqar"] = res

    def maker(T):
        def make(n, g):
            return mqar_examples(n, T, mqar_default_pairs(T), p.mqar_vocab, g)
        return make

    makers = [(maker(T), max(8, p.mqar_batch_tokens // T)) for T in p.mqar_lengths]
    tests = {T: maker(T)(p.mqar_val, torch.Generator().manual_seed(run.seed + 99 + T)) for T in p.mqar_lengths}
    for width in p.mqar_widths:
        for attention_type in MAIN_TYPES:
            run.seed_all(width)
            dm = TaskDataModule(makers, seed=run.seed + width)
            fitted, module = train_task(run, "mqar", dm, attention_type=attention_type, layers=2, hidden=width,
                                        heads=p.mqar_heads, vocab=p.mqar_vocab, steps=p.mqar_steps, lr=p.mqar_lr,
                                        evals=1, limit_val=0)
            model = module.model.to(run.device)
            for T in p.mqar_lengths:
                acc = recall_accuracy(model, *tests[T], batch_size=max(8, p.mqar_batch_tokens // T), device=run.device)
                res["cells"].append({"attention_type": attention_type, "width": width, "seq_len": T,
                                     "pairs": mqar_default_pairs(T), "accuracy": acc})
            res.setdefault("wall_s", {})[f"{attention_type}/{width}"] = fitted["wall_s"]
            log(f"MQAR width {width} {attention_type}: " + ", ".join(
                f"T={c['seq_len']} {c['accuracy']:.3f}" for c in res["cells"][-len(p.mqar_lengths):])
                + f" ({fitted['wall_s']:.0f} s)")
            write_report(run)


# ----------------------------------------------------------------------------------------------
# 4. Contrast
# ----------------------------------------------------------------------------------------------
CONTRAST_MODELS = (  # (label, attention type, heads)
    ("ZeroS, 1 head", "zeros", 1),
    ("softmax, 1 head", "softmax", 1),
    ("linear, 1 head", "linear", 1),
)


def section_contrast(run: Run) -> None:
    from benchmarks.tasks import TaskDataModule, contrast_examples

    p = run.preset
    res: dict = {"seq_len": p.contrast_seq, "dim": p.contrast_dim, "width": p.contrast_width, "steps": p.contrast_steps,
                 "lr": p.contrast_lr, "models": {}}
    run.results["contrast"] = res

    def make(n, g):
        return contrast_examples(n, p.contrast_seq, p.contrast_dim, g)

    for label, attention_type, heads in CONTRAST_MODELS:
        run.seed_all(7)
        dm = TaskDataModule([(make, p.contrast_batch)], num_val=p.contrast_val, seed=run.seed + 7)
        fitted, _ = train_task(run, "contrast", dm, attention_type=attention_type, layers=1, hidden=p.contrast_width,
                               heads=heads, vocab=8, steps=p.contrast_steps, lr=p.contrast_lr, evals=10,
                               feature_dim=p.contrast_dim + 3, target_dim=p.contrast_dim)
        curve = [{"step": e["step"], "relative_error": e.get("val/relative_error")} for e in fitted["evals"]]
        final = curve[-1]["relative_error"] if curve else None
        res["models"][label] = {"attention_type": attention_type, "heads": heads, "curve": curve,
                                "final_relative_error": final, "wall_s": fitted["wall_s"]}
        log(f"contrast {label}: relative error {final:.4f} ({fitted['wall_s']:.0f} s)")
        write_report(run)


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bool:
    """Lay out, write and close a figure; True (the plot was made)."""
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    _plt().close(fig)
    return True


def plot_lm(run: Run, path: Path) -> bool:
    lm = run.results.get("lm") or {}
    if not lm:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals, starts = [], []
    styles = [":", "--", "-."]
    for i, (name, r) in enumerate(lm.items()):
        xs = [c["tokens"] / 1e6 for c in r["curve"] if c["val_loss"] is not None]
        ys = [c["val_loss"] for c in r["curve"] if c["val_loss"] is not None]
        if not xs:
            continue
        if name in MAIN_TYPES:
            ax.plot(xs, ys, "-o", ms=3, color=COLORS[name], label=LABELS[name], lw=2)
        else:
            ax.plot(xs, ys, styles[i % 3], marker=".", color="tab:blue", alpha=0.7, label=name.replace("zeros", "ZeroS"))
        finals.append(min(ys))
        starts.append(ys[min(1, len(ys) - 1)])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Language modelling, {run.preset.lm_layers} layers x {run.preset.lm_hidden}, seq {run.preset.lm_seq}")
    if finals:
        lo, hi = min(finals), max(starts)
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_extrapolation(run: Run, path: Path) -> bool:
    ex = run.results.get("extrapolation") or {}
    if not ex.get("models"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    L = ex["eval_length"]
    # log-spaced bins: fine near the start, wide (less noisy) far out
    edges = sorted({0, *(round(L ** (i / 40)) for i in range(1, 41))})
    for attention_type, r in ex["models"].items():
        per = r["per_position"]
        xs = [max(1.0, (a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]
        ys = [sum(per[a:b]) / (b - a) for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(xs, ys, "-o", ms=3, color=COLORS[attention_type], label=LABELS[attention_type], lw=2)
    ax.set_xscale("log")
    ax.axvline(ex["train_length"], color="k", ls="--", lw=1, label=f"training length {ex['train_length']}")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel(f"loss (mean over {ex['windows']} windows, log-spaced bins)")
    ax.set_title(f"Length extrapolation: trained at {ex['train_length']}, evaluated at {L}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mqar(run: Run, path: Path) -> bool:
    mq = run.results.get("mqar") or {}
    cells = [c for c in mq.get("cells", []) if c.get("accuracy") is not None]
    if not cells:
        return False
    plt = _plt()
    widths = sorted({c["width"] for c in cells})
    fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths) + 0.5, 3.8), squeeze=False, sharey=True)
    for ax, width in zip(axes[0], widths):
        for attention_type in MAIN_TYPES:
            pts = sorted((c["seq_len"], c["accuracy"]) for c in cells if c["width"] == width and c["attention_type"] == attention_type)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", color=COLORS[attention_type], label=LABELS[attention_type])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c["seq_len"] for c in cells}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"width {width}")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("MQAR, 2 layers (key-value pairs = length / 16)")
    return _save(fig, path)


def plot_contrast(run: Run, path: Path) -> bool:
    co = run.results.get("contrast") or {}
    if not co.get("models"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ZeroS, 1 head": ("tab:blue", "-"), "softmax, 1 head": ("tab:orange", "-"),
              "linear, 1 head": ("tab:green", "-")}
    for label, r in co["models"].items():
        pts = [(c["step"], c["relative_error"]) for c in r["curve"] if c["relative_error"] is not None]
        color, ls = styles.get(label, ("k", "-"))
        ax.plot([s for s, _ in pts], [e for _, e in pts], ls, marker="o", ms=3, color=color, label=label)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="0.5: predicting x_first alone")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("relative squared error |pred - target|^2 / |target|^2")
    ax.set_title(f"Contrast, one layer: target x_first - x_second (dim {co['dim']}, length {co['seq_len']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {
    "lm_val_loss.png": plot_lm,
    "extrapolation.png": plot_extrapolation,
    "mqar.png": plot_mqar,
    "contrast.png": plot_contrast,
}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(a: float, b: float) -> str:
    """a relative to b, signed percent."""
    return f"{100.0 * (a - b) / b:+.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def md_lm(run: Run, findings: list[str]) -> list[str]:
    p = run.preset
    lm = run.results.get("lm") or {}
    data = run.results.get("lm_data") or {}
    lines = ["## 1. Language modelling", ""]
    if not lm:
        return lines + ["_Not run._", ""]
    lines += [
        f"Corpus: {', '.join(data.get('sources', []))} ({data.get('documents')} documents, {data.get('tokens'):,} tokens "
        f"with a byte-level BPE of {data.get('vocab_size')} entries trained on it; {data.get('train_blocks')} training and "
        f"{data.get('val_blocks')} held-out validation blocks of {p.lm_seq} tokens). Every model: {p.lm_layers} layers, "
        f"hidden {p.lm_hidden}, {p.lm_heads} heads, SwiGLU MLP, tied embeddings; the same data order, "
        f"{p.lm_steps} steps of {p.lm_batch} x {p.lm_seq} tokens, AdamW (lr {p.lm_lr:g}, weight decay 0.1, betas 0.9/0.95), "
        f"{max(1, round(p.lm_warmup_frac * p.lm_steps))} warmup steps then cosine decay to 10%, gradient clipping 1.0, "
        f"precision {run.precision}. Validation on the whole held-out split.",
        "",
        "![validation loss](lm_val_loss.png)",
        "",
    ]
    rows = []
    for name, r in lm.items():
        rows.append([name.replace("zeros", "ZeroS") if name not in MAIN_TYPES else LABELS[name], f"{r['parameters'] / 1e6:.2f} M",
                     f"{r['train_tokens'] / 1e6:.2f} M", _f(r["final_val_loss"], 4), _f(r["final_val_ppl"], 2),
                     f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.0f}"])
    lines += _table(["model", "parameters", "training tokens", "final val loss", "val perplexity",
                     f"training tokens/s ({run.device})", "wall s"], rows)
    lines.append("")
    z, s, l = lm.get("zeros"), lm.get("softmax"), lm.get("linear")
    if z and s and z["final_val_ppl"] and s["final_val_ppl"]:
        verdict = "better than" if z["final_val_ppl"] < s["final_val_ppl"] else "**worse than**"
        findings.append(f"LM: ZeroS validation perplexity {z['final_val_ppl']:.2f} is {verdict} softmax "
                        f"{s['final_val_ppl']:.2f} ({_pct(z['final_val_ppl'], s['final_val_ppl'])}).")
    if z and l and z["final_val_ppl"] and l["final_val_ppl"]:
        verdict = "better than" if z["final_val_ppl"] < l["final_val_ppl"] else "**worse than**"
        findings.append(f"LM: ZeroS is {verdict} plain linear attention ({z['final_val_ppl']:.2f} vs "
                        f"{l['final_val_ppl']:.2f}, {_pct(z['final_val_ppl'], l['final_val_ppl'])}).")
    if z and s:
        faster = "faster" if z["tokens_per_s"] > s["tokens_per_s"] else "**slower**"
        findings.append(f"Training speed at {p.lm_seq} tokens on {run.device}: ZeroS {z['tokens_per_s']:,.0f} tok/s is "
                        f"{faster} than softmax {s['tokens_per_s']:,.0f} tok/s (x{z['tokens_per_s'] / s['tokens_per_s']:.2f}).")
    for name in ABLATIONS:
        a = lm.get(name)
        if a and z and a["final_val_ppl"] and z["final_val_ppl"]:
            if a["final_val_ppl"] > z["final_val_ppl"]:
                findings.append(f"Ablation '{name}': perplexity {a['final_val_ppl']:.2f} vs {z['final_val_ppl']:.2f} "
                                f"for full ZeroS ({_pct(a['final_val_ppl'], z['final_val_ppl'])}): the component helps here.")
            else:
                findings.append(f"Ablation '{name}': perplexity {a['final_val_ppl']:.2f} vs {z['final_val_ppl']:.2f} "
                                f"for full ZeroS ({_pct(a['final_val_ppl'], z['final_val_ppl'])}): **the ablated model is as "
                                f"good or better here**; this run does not support the component.")
    if not any(n in lm for n in ABLATIONS):
        lines += ["Ablations: _not run_.", ""]
    return lines


def md_extrapolation(run: Run, findings: list[str]) -> list[str]:
    ex = run.results.get("extrapolation")
    lines = ["## 2. Length extrapolation", ""]
    if not ex:
        return lines + ["_Not run._", ""]
    if ex.get("skipped"):
        return lines + [f"_Skipped: {ex['skipped']}._", ""]
    lines += [
        f"The language models of section 1 (trained on sequences of {ex['train_length']} tokens) read {ex['windows']} "
        f"windows of {ex['eval_length']} consecutive held-out tokens in one pass each (float32); the loss at every "
        f"position is averaged over the windows.", "", "![extrapolation](extrapolation.png)", "",
    ]
    names = list(next(iter(ex["models"].values()))["ranges"])
    rows = [[LABELS[t]] + [_f(r["ranges"][k]) for k in names] for t, r in ex["models"].items()]
    lines += _table(["model"] + [f"positions {k}" for k in names], rows) + [""]
    z, s = ex["models"].get("zeros"), ex["models"].get("softmax")
    if z and s:
        first, last = names[0], names[-1]
        dz = z["ranges"][last] - z["ranges"][first]
        ds = s["ranges"][last] - s["ranges"][first]
        better = "lower" if z["ranges"][last] < s["ranges"][last] else "**higher**"
        findings.append(f"Extrapolation to {ex['eval_length']} (trained at {ex['train_length']}): at positions {last} ZeroS "
                        f"loss {z['ranges'][last]:.3f} is {better} than softmax {s['ranges'][last]:.3f}; change from "
                        f"positions {first}: ZeroS {dz:+.3f}, softmax {ds:+.3f}.")
    return lines


def md_mqar(run: Run, findings: list[str]) -> list[str]:
    mq = run.results.get("mqar")
    p = run.preset
    lines = ["## 3. MQAR (multi-query associative recall)", ""]
    if not mq or not mq.get("cells"):
        return lines + ["_Not run._", ""]
    lines += [
        f"Zoology-style data, generated by the script: a sequence of length T opens with D = T/16 key-value pairs "
        f"(keys and values from disjoint halves of a {mq['vocab']}-token vocabulary), then every key is queried once, "
        "at slots drawn from a power law favouring short gaps, each query followed by its value; everything else is a "
        "filler token. Only the value after each query key is scored. As in zoology, one model per attention type and "
        f"width is trained on a mixture of the lengths {', '.join(map(str, mq['lengths']))} (one length per batch, in "
        f"turn; fresh data every step, about {p.mqar_batch_tokens} tokens per batch) and then scored on "
        f"{p.mqar_val} held-out sequences of each length. Two layers, {mq['heads']} heads, {mq['steps']} steps, "
        f"lr {mq['lr']:g}, the same optimiser and schedule as above. One learning rate and one seed per model (no "
        "sweep), so a model can fail from optimisation alone.", "",
        "![MQAR](mqar.png)", "",
    ]
    cells = mq["cells"]
    keys = sorted({(c["width"], c["seq_len"]) for c in cells})
    rows = []
    for width, T in keys:
        row = [str(width), str(T), str(next(c["pairs"] for c in cells if c["width"] == width and c["seq_len"] == T))]
        for t in MAIN_TYPES:
            c = next((c for c in cells if c["width"] == width and c["seq_len"] == T and c["attention_type"] == t), None)
            row.append(_f(c["accuracy"]) if c else "n/a")
        rows.append(row)
    lines += _table(["width", "length", "pairs"] + [f"{LABELS[t]} accuracy" for t in MAIN_TYPES], rows) + [""]
    acc = {t: [c["accuracy"] for c in cells if c["attention_type"] == t and c["accuracy"] is not None] for t in MAIN_TYPES}
    if all(acc.values()):
        mean = {t: sum(v) / len(v) for t, v in acc.items()}
        findings.append("MQAR mean accuracy over the grid: " + ", ".join(f"{LABELS[t]} {mean[t]:.3f}" for t in MAIN_TYPES) + ".")
        best = max(max(v) for v in acc.values())
        if best < 0.3:
            findings.append(f"MQAR: no model got above {best:.2f} accuracy in this budget ({mq['steps']} steps): the "
                            "models have not learned the task yet, so these numbers say little about recall.")
        lost = []
        for width, T in keys:
            get = {c["attention_type"]: c["accuracy"] for c in cells if c["width"] == width and c["seq_len"] == T}
            if None not in (get.get("zeros"), get.get("softmax")) and get["zeros"] < get["softmax"] - 0.05:
                lost.append(f"width {width}, length {T} ({get['zeros']:.2f} vs {get['softmax']:.2f})")
        if lost:
            findings.append("MQAR: **ZeroS is below softmax** (by more than 0.05) at " + "; ".join(lost) + ".")
        else:
            findings.append("MQAR: ZeroS is within 0.05 of softmax or above it in every cell.")
        pairs = [(c["accuracy"], next((d["accuracy"] for d in cells if d["attention_type"] == "linear"
                                       and d["width"] == c["width"] and d["seq_len"] == c["seq_len"]), None))
                 for c in cells if c["attention_type"] == "zeros"]
        pairs = [(z, l) for z, l in pairs if l is not None]
        if pairs:
            above = sum(z > l for z, l in pairs)
            text = f"MQAR: ZeroS is above plain linear attention in {above} of {len(pairs)} cells"
            findings.append(text + "." if above * 2 > len(pairs) else f"**{text}**.")
    return lines


def md_contrast(run: Run, findings: list[str]) -> list[str]:
    co = run.results.get("contrast")
    lines = ["## 4. Contrast: one layer computing x_first - x_second", ""]
    if not co or not co.get("models"):
        return lines + ["_Not run._", ""]
    lines += [
        f"Each position carries a random vector x_i ~ N(0, I_{co['dim']}) and three flags (first mark, second mark, "
        f"query); two earlier positions of a {co['seq_len']}-token sequence are marked and the last position must output "
        "x_first - x_second (regression, MSE). The features enter through a linear map in place of the token embedding, "
        "the answer leaves through a linear map of the last hidden state; in between, one block of the model "
        f"(width {co['width']}), trained with the same optimiser and schedule ({co['steps']} steps, lr {co['lr']:g}, "
        "no weight decay). "
        "The error is |prediction - target|^2 / |target|^2 on held-out sequences. A one-head convex mixture of values "
        "(softmax, or normalised linear attention) mixes the two marked vectors with non-negative weights; the best "
        "fixed such mix (attending to x_first only) leaves an error of 0.5. The limit is per head: with two heads, "
        "softmax attention could read each mark with its own head and subtract them in the output projection, so "
        "this task isolates what one head can do.", "",
        "![contrast](contrast.png)", "",
    ]
    rows = [[label, _f(r["final_relative_error"], 4), f"{r['wall_s']:.0f}"] for label, r in co["models"].items()]
    lines += _table(["model (1 layer)", "relative error", "wall s"], rows) + [""]
    m = co["models"]
    z, s = m.get("ZeroS, 1 head"), m.get("softmax, 1 head")
    if z and s and z["final_relative_error"] is not None and s["final_relative_error"] is not None:
        ok = z["final_relative_error"] < 0.5 * s["final_relative_error"] and z["final_relative_error"] < 0.25
        word = "learns the contrast" if ok else "**does not clearly learn the contrast in this run**"
        findings.append(f"Contrast: one-layer ZeroS {word} (relative error {z['final_relative_error']:.3f}); one-layer, "
                        f"one-head softmax reaches {s['final_relative_error']:.3f}.")
    return lines


def write_report(run: Run) -> None:
    """(Re)write report.md, the plots and results.json from what has run so far."""
    run.out.mkdir(parents=True, exist_ok=True)
    p = run.preset
    run.results["wall_s"] = time.time() - run.started
    findings: list[str] = []
    body: list[str] = []
    body += md_lm(run, findings)
    body += md_extrapolation(run, findings)
    body += md_mqar(run, findings)
    body += md_contrast(run, findings)
    for name, fn in PLOTS.items():
        path = run.out / name
        if not fn(run, path) and path.exists():
            path.unlink()
    env = run.results.get("environment") or {}
    versions = env.get("versions", {})
    done = [s for s in SECTIONS if s in run.results.get("sections_done", [])]
    pending = [s for s in run.sections if s not in done]
    head = [
        "# ZeroS vs softmax vs linear attention: evidence report",
        "",
        f"Written by `benchmarks/report.py` ({p.name} mode). Every number below comes from this run; "
        "the raw numbers are in `results.json`."
        + ("" if p.name.startswith("full") else f" **{p.name.capitalize()} mode trains tiny models briefly: it checks that the "
           "pipeline works and shows its shape; it is not evidence. Use the full mode for that.**"),
        "",
        f"- Command: `{run.results.get('command')}`",
        f"- Started {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(run.started))}; wall time "
        f"{run.results['wall_s'] / 60:.1f} min" + (f" (**incomplete**: {', '.join(pending)} still to run)" if pending else ""),
        f"- Device: {run.device}" + (f" ({env.get('gpu')}, CUDA {env.get('cuda')})" if env.get("gpu") else "")
        + f", precision {run.precision}; CPU: {env.get('cpu')}, {env.get('cpu_count')} cores "
        f"({env.get('torch_threads')} torch threads), {env.get('memory_gib')} GiB memory",
        f"- Platform: {env.get('platform')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Code: git {env.get('git_commit') or 'unknown'}" + (" (with uncommitted changes)" if env.get("git_dirty") else ""),
        "- Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in run.results.get("section_seconds", {}).items()),
        "",
        "## Findings",
        "",
    ]
    wins = [f for f in findings if "**" not in f]
    losses = [f.replace("**", "") for f in findings if "**" in f]
    head += [f"- {f}" for f in wins] if findings else ["- (no section finished yet)"]
    if losses:
        head += ["", "### Where ZeroS loses, or an ablation does not hurt, in this run", ""]
        head += [f"- {f}" for f in losses]
    head += [
        "",
        "Scale: these are small models trained briefly on a small corpus (or on synthetic tasks) so that the whole "
        "report reproduces on one machine; they test the mechanisms, not the paper's full-scale numbers.",
        "",
    ]
    (run.out / "report.md").write_text("\n".join(head + body) + "\n")
    (run.out / "results.json").write_text(json.dumps({**run.results, "preset": dataclasses.asdict(p)}, indent=1))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def default_precision(device: str, mode: str) -> str:
    """bf16-mixed on a GPU, and for the full mode on a CPU with native bf16 matmuls (AVX512-BF16 /
    AMX: ~1.3x faster there); 32-true otherwise."""
    if device == "cuda":
        return "bf16-mixed"
    bf16_probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private; absent in some builds
    native_bf16 = torch.backends.mkldnn.is_available() and bf16_probe is not None and bool(bf16_probe())
    return "bf16-mixed" if mode == "full" and native_bf16 else "32-true"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small settings: a few minutes on a CPU")
    mode.add_argument("--smoke", action="store_true", help="tiny settings, seconds: for tests only (numbers mean nothing)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda and for the full mode on a "
                    "CPU with native bf16, else 32-true)")
    ap.add_argument("--out", default=None, help="output folder (default: reports/ for full mode, reports/<mode> otherwise)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--lm-tokens", type=float, default=None, help="training tokens per LM model (overrides the mode)")
    ap.add_argument("--mqar-steps", type=int, default=None, help="training steps per MQAR model (overrides the mode)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cache-dir", default=None, help="tokenizer/data cache (default: $ZEROS_LM_CACHE or ~/.cache/zeros_lm)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    name = "smoke" if args.smoke else "quick" if args.quick else "full-gpu" if device == "cuda" else "full"
    preset = dataclasses.replace(PRESETS[name])
    if args.lm_tokens is not None:
        preset.lm_tokens = int(args.lm_tokens)
    if args.mqar_steps is not None:
        preset.mqar_steps = args.mqar_steps
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown section(s) {bad}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    if "extrapolation" in sections and "lm" not in sections:
        print("error: the extrapolation section evaluates the models of the lm section; add 'lm'", file=sys.stderr)
        return 2
    precision = args.precision or default_precision(device, name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    out = Path(args.out) if args.out else REPO / "reports" / ("" if name.startswith("full") else name)
    _quiet_lightning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="zeros_report_") as scratch:
        run = Run(preset=preset, device=device, precision=precision, out=out, seed=args.seed, cache_dir=args.cache_dir,
                  scratch=scratch, sections=sections, argv=list(argv if argv is not None else sys.argv[1:]))
        rel = os.path.relpath(Path(__file__).resolve(), Path.cwd()) if Path.cwd() in Path(__file__).resolve().parents else __file__
        run.results["command"] = "python " + shlex.join([rel, *run.argv])
        run.results["environment"] = environment(run)
        run.results["sections_done"] = []
        run.results["section_seconds"] = {}
        log(f"{name} mode on {device} ({precision}); sections {', '.join(sections)}; writing to {out}")
        write_report(run)
        handlers = {"lm": section_lm, "ablations": section_ablations, "extrapolation": section_extrapolation,
                    "mqar": section_mqar, "contrast": section_contrast}
        for section in SECTIONS:
            if section not in sections:
                continue
            t0 = time.time()
            log(f"section {section}")
            handlers[section](run)
            run.results["section_seconds"][section] = time.time() - t0
            run.results["sections_done"].append(section)
            write_report(run)
    log(f"done in {(time.time() - run.started) / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
