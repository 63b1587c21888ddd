"""The report's experiments: one function per section, each filling ``run.results[section]`` and
saving the report after every model (``run.save()``)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .harness import Run, fit, lm_module, log
from .presets import ABLATIONS, CONTRAST_MODELS, MAIN_TYPES


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
        run.save()


def section_ablations(run: Run) -> None:
    lm = run.results.setdefault("lm", {})
    for name, extra in ABLATIONS.items():
        lm[name], _ = train_lm(run, name, "zeros", extra)
        run.save()


# 2. Length extrapolation
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
        run.save()
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
    run.save()


# 3. MQAR
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
            run.save()


# 4. Contrast
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
        run.save()


# Environment


HANDLERS = {"lm": section_lm, "ablations": section_ablations, "extrapolation": section_extrapolation,
            "mqar": section_mqar, "contrast": section_contrast}
