"""The report's experiments: one function per section, each filling ``run.results[section]`` and
saving the report after every model (``run.save()``)."""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from .harness import RowSkipped, Run, build_row, fit, lm_module, log, softmax_share
from . import presets
from .presets import ABLATIONS, CONTRAST_MODELS, MQAR_COMPARED, MQAR_SETTINGS, REFERENCE_ROW, ModelRow, mqar_setting


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


def _lm_result(run: Run, module, res: dict, attention_type: str, extra: dict) -> dict:
    p = run.preset
    tokens_per_step = p.lm_batch * p.lm_seq
    final = res["evals"][-1] if res["evals"] else {}
    return {
        "attention_type": attention_type, "options": extra, "parameters": module.num_parameters(),
        "intermediate_size": module.model.config.intermediate_size,
        "softmax_share": softmax_share(attention_type, extra),
        "steps": res["steps"], "train_tokens": res["steps"] * tokens_per_step,
        "curve": [{"tokens": e["step"] * tokens_per_step, "val_loss": e.get("val/loss")} for e in res["evals"]],
        "final_val_loss": final.get("val/loss"), "final_val_ppl": math.exp(final["val/loss"]) if "val/loss" in final else None,
        "tokens_per_s": res["steps_per_s"] * tokens_per_step, "wall_s": res["wall_s"],
        "document_resets": module.document_separator is not None,  # packed documents kept apart
        "threads": torch.get_num_threads(),  # the tokens/s of rows from different invocations may differ in it
        # which invocation trained this row (sections may be assembled from several)
        "command": run.results.get("command"), "git_commit": (run.results.get("environment") or {}).get("git_commit"),
    }


def _train_lm_module(run: Run, name: str, module, attention_type: str, extra: dict) -> dict:
    p = run.preset
    steps = p.lm_steps
    log(f"LM {name}: {module.num_parameters() / 1e6:.2f} M parameters, {steps} steps of {p.lm_batch}x{p.lm_seq} tokens")
    res = fit(module, lm_data(run), steps=steps, val_every=max(1, steps // p.lm_evals), run=run)
    out = _lm_result(run, module, res, attention_type, extra)
    log(f"LM {name}: val loss {out['final_val_loss']:.4f}, {out['tokens_per_s']:.0f} tok/s, {res['wall_s']:.0f} s")
    return out


def selected_rows(run: Run, section: str, skipped: dict, kept=()) -> list[ModelRow]:
    """The model rows of ``section`` (ModelRow.sections) this invocation trains (``--models``); the
    others are noted in ``skipped`` unless ``kept`` holds an earlier invocation's result for them."""
    rows = []
    for row in presets.MODEL_ROWS:
        if section not in row.sections:
            if run.models is not None and row.key in run.models:
                skipped[row.key] = f"not a row of the {section} section (it is trained in: {', '.join(row.sections)})"
        elif run.models is None or row.key in run.models:
            rows.append(row)
        elif row.key not in kept:
            skipped[row.key] = "not selected in this run (--models)"
    return rows


def lm_builder(run: Run):
    """``build(attention_type=..., **overrides)`` -> a fresh LM module at the preset's size."""
    p = run.preset
    dm = lm_data(run)

    def build(attention_type: str, num_hidden_layers: int = p.lm_layers, **overrides):
        return lm_module(p, dm, attention_type, num_hidden_layers, p.lm_hidden, p.lm_heads, p.lm_steps, **overrides)

    return build


def reference_parameters(build, num_layers: int) -> int:
    """Parameter count of the reference row (the paper-exact ZeroS) at the same size."""
    row = next(r for r in presets.MODEL_ROWS if r.key == REFERENCE_ROW)
    return build_row(row, num_layers, build)[0].num_parameters()


def models_dir(run: Run):
    """Where the lm section saves its models (Hugging Face format), for the extrapolation section."""
    return run.out / "models"


def section_lm(run: Run) -> None:
    p = run.preset
    lm = run.results.setdefault("lm", {})
    skipped = run.results["lm_skipped"] = {}
    build = lm_builder(run)
    run.seed_all()
    reference = reference_parameters(build, p.lm_layers)
    for row in selected_rows(run, "lm", skipped, kept=lm):
        run.seed_all()
        try:
            module, overrides = build_row(row, p.lm_layers, build, reference)
        except RowSkipped as err:
            skipped[row.key] = str(err)
            lm.pop(row.key, None)
            log(f"LM {row.label}: skipped ({err})")
            run.save()
            continue
        lm[row.key] = _train_lm_module(run, row.label, module, row.attention_type, overrides)
        module.model.save_pretrained(models_dir(run) / row.key)
        run.lm_models[row.key] = module.model
        run.save()


def section_ablations(run: Run) -> None:
    p = run.preset
    lm = run.results.setdefault("lm", {})
    for name, extra in ABLATIONS.items():
        run.seed_all()
        module = lm_module(p, lm_data(run), "zeros", p.lm_layers, p.lm_hidden, p.lm_heads, p.lm_steps, **extra)
        lm[name] = _train_lm_module(run, name, module, "zeros", extra)
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


def saved_lm_models(out) -> list[str]:
    """Keys of the LM models saved under ``out/models`` by an earlier lm section."""
    root = out / "models"
    return [r.key for r in presets.MODEL_ROWS if (root / r.key / "config.json").is_file()]


def lm_model(run: Run, key: str):
    """The lm section's model ``key``: from this invocation, or saved by an earlier one."""
    model = run.lm_models.get(key)
    if model is None and (models_dir(run) / key / "config.json").is_file():
        from zeros_lm import ZeroSForCausalLM

        model = ZeroSForCausalLM.from_pretrained(str(models_dir(run) / key), dtype=torch.float32)
    return model


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
    for row in presets.MODEL_ROWS:
        model = lm_model(run, row.key)
        if model is None:
            continue
        t0 = time.perf_counter()
        loss = per_position_loss(model.float(), windows, run.device)
        ranges = {}
        lo = 0
        hi = p.lm_seq
        while lo < length:
            ranges[f"{lo}-{hi}"] = float(loss[lo:hi].mean())
            lo, hi = hi, min(length, hi * 2)
        res["models"][row.key] = {"per_position": [round(float(x), 5) for x in loss], "ranges": ranges,
                                  "seconds": time.perf_counter() - t0}
        log(f"extrapolation {row.label}: " + ", ".join(f"[{k}) {v:.3f}" for k, v in ranges.items()))
    run.save()


# 3. MQAR
def train_task(run: Run, kind: str, dm, *, attention_type: str, layers: int, hidden: int, heads: int, vocab: int,
               steps: int, lr: float, evals: int, limit_val=None, **extra) -> tuple[dict, Any]:
    module = task_module(run, kind, attention_type=attention_type, layers=layers, hidden=hidden, heads=heads,
                         vocab=vocab, steps=steps, lr=lr, **extra)
    res = fit(module, dm, steps=steps, val_every=max(1, steps // evals), run=run, limit_val=limit_val)
    return res, module


def task_module(run: Run, kind: str, *, attention_type: str, layers: int, hidden: int, heads: int, vocab: int,
                steps: int, lr: float, warmup_frac: float = 0.05, weight_decay: Optional[float] = None, **extra):
    from benchmarks.tasks import make_task_module

    if weight_decay is None:
        weight_decay = 0.0 if kind == "contrast" else 0.1
    return make_task_module(
        kind, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        chunk_size=run.preset.chunk_size, attention_type=attention_type, learning_rate=lr,
        warmup_steps=max(1, round(warmup_frac * steps)), weight_decay=weight_decay, **extra,
    )


def mqar_row(run: Run, row: ModelRow, width: int, makers, tests) -> dict:
    """Train ``row`` at ``width`` once per learning rate of the sweep; keep the best (the highest
    mean accuracy over the lengths), as zoology reports the best of its learning-rate sweep."""
    from benchmarks.tasks import RecallCurve, TaskDataModule, mqar_batch_size, recall_accuracy

    p = run.preset
    layers = p.mqar_layers

    def score(model) -> list[float]:  # held-out accuracy at each length of the grid, in order
        return [recall_accuracy(model, *tests[T], batch_size=mqar_batch_size(p.mqar_batch_tokens, T), device=run.device)
                for T in p.mqar_lengths]

    def builder(lr):
        def build(attention_type: str, num_hidden_layers: int = layers, **overrides):
            return task_module(run, "mqar", attention_type=attention_type, layers=num_hidden_layers, hidden=width,
                               heads=p.mqar_heads, vocab=p.mqar_vocab, steps=p.mqar_steps, lr=lr, warmup_frac=p.mqar_warmup_frac,
                               weight_decay=p.mqar_weight_decay, zero_init_residual=p.mqar_zero_init_residual,
                               **overrides)
        return build

    run.seed_all(width)
    reference = reference_parameters(builder(p.mqar_lrs[0]), layers)
    sweep = []
    for lr in p.mqar_lrs:
        run.seed_all(width)
        module, overrides = build_row(row, layers, builder(lr), reference)  # RowSkipped goes to the caller
        dm = TaskDataModule(makers, seed=run.seed + width)
        curve = RecallCurve(score, p.mqar_curve_every) if p.mqar_curve_every else None
        fitted = fit(module, dm, steps=p.mqar_steps, val_every=p.mqar_steps, run=run, limit_val=0,
                     callbacks=[curve] if curve else [])
        model = module.model.to(run.device)
        acc = dict(zip(p.mqar_lengths, score(model)))
        sweep.append({"lr": lr, "accuracy": acc, "mean": sum(acc.values()) / len(acc), "wall_s": fitted["wall_s"],
                      "parameters": module.num_parameters(), "overrides": overrides,
                      **({"curve": curve.points} if curve else {})})
        log(f"MQAR width {width} {row.label} lr {lr:g}: " + ", ".join(f"T={T} {a:.3f}" for T, a in acc.items())
            + f" ({fitted['wall_s']:.0f} s)")
    best = max(sweep, key=lambda r: r["mean"])
    return {"best": best, "sweep": [{k: r[k] for k in ("lr", "mean", "wall_s", "curve") if k in r} for r in sweep],
            "softmax_share": softmax_share(row.attention_type, best["overrides"])}


def section_mqar(run: Run) -> None:
    """Zoology's protocol: one model per (model row, width, learning rate), trained on a mixture of
    the sequence lengths (one length per batch, in turn, fresh data every step), scored on held-out
    data at each length; the best learning rate of the sweep is reported."""
    from benchmarks.tasks import mqar_batch_size, mqar_default_pairs, mqar_examples

    p = run.preset
    settings = {key: getattr(p, field) for key, field in MQAR_SETTINGS.items()}
    res: dict = {**{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, "seed": run.seed,
                 "cells": [], "models": {}, "skipped": {}}
    earlier = run.results.get("mqar") or {}
    run.results["mqar"] = res
    if run.models is not None and all(mqar_setting(earlier, k) == res[k] for k in MQAR_COMPARED):
        # a piece of the section (--models): the other rows keep an earlier invocation's results at the same settings
        res["cells"] = [c for c in earlier.get("cells", []) if c.get("model") not in run.models]
        res["models"] = {k: m for k, m in earlier.get("models", {}).items() if k.split("/")[0] not in run.models}
        res["skipped"] = {k: why for k, why in earlier.get("skipped", {}).items() if k not in run.models}
    kept = {c["model"] for c in res["cells"]} | set(res["skipped"])

    def maker(T):
        def make(n, g):
            return mqar_examples(n, T, mqar_default_pairs(T), p.mqar_vocab, g)
        return make

    makers = [(maker(T), mqar_batch_size(p.mqar_batch_tokens, T)) for T in p.mqar_lengths]
    tests = {T: maker(T)(p.mqar_val, torch.Generator().manual_seed(run.seed + 99 + T)) for T in p.mqar_lengths}
    for width in p.mqar_widths:
        for row in selected_rows(run, "mqar", res["skipped"], kept=kept):
            try:
                out = mqar_row(run, row, width, makers, tests)
            except RowSkipped as err:
                res["skipped"][row.key] = str(err)
                log(f"MQAR {row.label}: skipped ({err})")
                run.save()
                continue
            best = out["best"]
            for T in p.mqar_lengths:
                res["cells"].append({"model": row.key, "attention_type": row.attention_type, "width": width, "seq_len": T,
                                     "pairs": mqar_default_pairs(T), "accuracy": best["accuracy"][T], "lr": best["lr"]})
            res["models"][f"{row.key}/{width}"] = {"parameters": best["parameters"], "lr": best["lr"], "sweep": out["sweep"],
                                                   "softmax_share": out["softmax_share"], "overrides": best["overrides"],
                                                   "command": run.results.get("command"),
                                                   "git_commit": (run.results.get("environment") or {}).get("git_commit")}
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
