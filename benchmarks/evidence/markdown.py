"""The report's text: one Markdown writer per section (each adding its findings), and the assembly of
report.md, the plots and results.json."""

from __future__ import annotations

import dataclasses
import json
import math
import time

from .harness import Run
from .plots import PLOTS, row_label
from . import presets
from .presets import (ABLATIONS, BASELINE_ROW, MQAR_BASELINE_ROWS, SECTIONS, SOFTMAX_MQAR_FLOOR, TARGET_MQAR_GAP,
                      TARGET_PPL_GAP, TARGET_ZEROS_SHARE, Preset)


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(a: float, b: float) -> str:
    """a relative to b, signed percent."""
    return f"{100.0 * (a - b) / b:+.1f}%"


def section_preset(run: Run, section: str) -> Preset:
    """The settings the section's results were produced with (an earlier invocation's, when this
    one did not run the section), falling back to this run's preset."""
    saved = (run.results.get("section_runs", {}).get(section) or {}).get("preset")
    if not saved:
        return run.preset
    known = {f.name for f in dataclasses.fields(Preset)}
    return dataclasses.replace(run.preset, **{k: v for k, v in saved.items() if k in known})


def changed_settings(run: Run, section: str) -> str:
    """'field=value, ...' for the settings an invocation changed from its mode's preset (--set,
    --lm-tokens, ...) when it ran ``section``; '' when none."""
    changed = (run.results.get("section_runs", {}).get(section) or {}).get("changed") or {}
    return ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in changed.items())


def section_precision(run: Run, section: str) -> str:
    return (run.results.get("section_runs", {}).get(section) or {}).get("precision") or run.precision


def _skipped_notes(skipped: dict) -> list[str]:
    if not skipped:
        return []
    return ["Not run: " + "; ".join(f"{row_label(k)} ({why})" for k, why in skipped.items()) + ".", ""]


def qualifies_for_target(attention_type: str, share) -> bool:
    """O(1)-state dominant: ZeroS in at least TARGET_ZEROS_SHARE of the layers (softmax in the rest)."""
    return attention_type == "zeros" and share is not None and share <= 1.0 - TARGET_ZEROS_SHARE + 1e-9


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def md_lm(run: Run, findings: list[str]) -> list[str]:
    p = section_preset(run, "lm")
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
        f"precision {section_precision(run, 'lm')}. Validation on the whole held-out split. Parameter counts are matched "
        "to the paper-exact ZeroS within 5% (a model further off gets its MLP width adjusted; the MLP column shows it).",
        "",
        "![validation loss](lm_val_loss.png)",
        "",
    ]
    # Results written before packed training existed carry no "document_resets": their documents
    # flowed into each other inside a block.
    resets = {name: bool(r.get("document_resets", False)) for name, r in lm.items()}
    if all(resets.values()):
        lines += ["Every block packs several documents; each model keeps them apart (document resets, "
                  "the framework's default), in training and validation.", ""]
    elif not any(resets.values()):
        lines += ["Every block packs several documents, which these runs let flow into each other "
                  "(no document resets).", ""]
    else:
        lines += ["**Not all rows were trained alike**: " + ", ".join(row_label(n) for n, on in resets.items() if on)
                  + " kept the packed documents of a block apart (document resets, the framework's default); "
                  + ", ".join(row_label(n) for n, on in resets.items() if not on)
                  + " come from an earlier run in which they flowed into each other. Compare within a group.", ""]
    rows = []
    threads = any("threads" in r for r in lm.values())  # recorded since rows began to come from several invocations
    for name, r in lm.items():
        rows.append([row_label(name), f"{r['parameters'] / 1e6:.3f} M", str(r.get("intermediate_size", "")),
                     f"{r['train_tokens'] / 1e6:.2f} M", _f(r["final_val_loss"], 4), _f(r["final_val_ppl"], 2),
                     f"{r['tokens_per_s']:,.0f}", *([str(r.get("threads", ""))] if threads else []), f"{r['wall_s']:.0f}"])
    lines += _table(["model", "parameters", "MLP width", "training tokens", "final val loss", "val perplexity",
                     f"training tokens/s ({(run.results.get('section_runs', {}).get('lm') or {}).get('device', run.device)})",
                     *(["torch threads"] if threads else []), "wall s"], rows)
    lines.append("")
    if len({r.get("command") for r in lm.values()}) > 1:
        lines += ["The rows come from several invocations (the Command lines at the top): their training tokens/s were "
                  "measured under different conditions (torch threads, other work on the machine) and compare only "
                  "within one invocation.", ""]
    lines += _skipped_notes(run.results.get("lm_skipped") or {})
    z, s, l = lm.get("zeros"), lm.get("softmax"), lm.get("linear")
    incomparable = set()
    for name, other in (("softmax", s), ("linear", l), *((n, lm.get(n)) for n in ABLATIONS)):
        if z and other and resets[name] != resets["zeros"]:  # no finding compares the two groups
            findings.append(f"LM: {row_label(name)} is not compared with ZeroS: one was trained with document "
                            "resets, the other without (see the note above the table).")
            if name == "softmax":
                s = None
            elif name == "linear":
                l = None
            else:
                incomparable.add(name)
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
        findings.append(f"Training speed at {p.lm_seq} tokens: ZeroS {z['tokens_per_s']:,.0f} tok/s is "
                        f"{faster} than softmax {s['tokens_per_s']:,.0f} tok/s (x{z['tokens_per_s'] / s['tokens_per_s']:.2f}).")
    for name in ABLATIONS:
        a = lm.get(name)
        if a and z and name not in incomparable and a["final_val_ppl"] and z["final_val_ppl"]:
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
    rows = [[row_label(t)] + [_f(r["ranges"][k]) for k in names] for t, r in ex["models"].items()]
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


def mqar_stats(mq: dict) -> dict:
    """Per model key, (mean, lowest) accuracy over the grid (cells of older runs carry only the attention type)."""
    acc: dict = {}
    for c in mq.get("cells", []):
        if c.get("accuracy") is not None:
            acc.setdefault(c.get("model", c["attention_type"]), []).append(c["accuracy"])
    return {k: (sum(v) / len(v), min(v)) for k, v in acc.items()}


def mqar_means(mq: dict) -> dict:
    """Mean accuracy over the grid per model key."""
    return {k: mean for k, (mean, _) in mqar_stats(mq).items()}


def mqar_baseline(mq: dict):
    """The softmax row MQAR judges against, as (key, mean accuracy, lowest accuracy over the grid): of
    MQAR_BASELINE_ROWS, the best by mean of those that learned the task (>= SOFTMAX_MQAR_FLOOR at every
    length), else the best by mean; None when the grid holds none of them."""
    stats = mqar_stats(mq)
    found = [(key, *stats[key]) for key in MQAR_BASELINE_ROWS if key in stats]
    return max(found, key=lambda b: (b[2] >= SOFTMAX_MQAR_FLOOR, b[1]), default=None)


def mqar_changes(mq: dict, mode: str) -> str:
    """'field=value, ...' where the MQAR results' settings differ from the mode's preset."""
    base = presets.PRESETS.get(mode)
    out = []
    for key, name in presets.MQAR_SETTINGS.items():
        value = presets.mqar_setting(mq, key)
        if base is None or value is None:
            continue
        default = getattr(base, name)
        if (list(value) if isinstance(value, (list, tuple)) else value) != (list(default) if isinstance(default, tuple) else default):
            out.append(f"{name}={','.join(f'{v:g}' for v in value) if isinstance(value, (list, tuple)) else value}")
    return ", ".join(out)


def md_mqar_curves(models: dict, lengths: list) -> list[str]:
    """The held-out accuracy during training (``mqar_curve_every``) of each model and learning rate that has one."""
    rows = [[row_label(key.split("/")[0]), key.split("/")[1], f"{s['lr']:g}", str(point["step"])]
            + [_f(a) for a in point["accuracy"]]
            for key, m in models.items() for s in m["sweep"] for point in s.get("curve", [])]
    if not rows:
        return []
    return (["Accuracy during training (the held-out sets, scored every few steps; `--set mqar_curve_every=N`):", ""]
            + _table(["model", "width", "lr", "step"] + [f"T = {T}" for T in lengths], rows) + [""])


def md_mqar(run: Run, findings: list[str]) -> list[str]:
    mq = run.results.get("mqar")
    p = section_preset(run, "mqar")
    lines = ["## 3. MQAR (multi-query associative recall)", ""]
    if not mq or not mq.get("cells"):
        return lines + ["_Not run._", ""] + _skipped_notes((mq or {}).get("skipped") or {})
    lrs = mq.get("lrs") or [mq.get("lr")]
    seed = presets.mqar_setting(mq, "seed")
    lines += [
        f"Zoology-style data, generated by the script: a sequence of length T opens with D = T/16 key-value pairs "
        f"(keys and values from disjoint halves of a {mq['vocab']}-token vocabulary), then every key is queried once, "
        "at slots drawn from a power law favouring short gaps, each query followed by its value; everything else is a "
        "filler token. Only the value after each query key is scored (the label sits at the query key's position: the "
        "model predicts the next token). As in zoology, one model per model row and width is trained "
        + (f"on a mixture of the lengths {', '.join(map(str, mq['lengths']))} (one length per batch, in turn; "
           if len(mq["lengths"]) > 1 else f"on the length {mq['lengths'][0]} alone (**one length: a smaller grid**; ")
        + "fresh data every step, "
        f"about {mq.get('batch_tokens', p.mqar_batch_tokens)} tokens per batch) and then scored on {p.mqar_val} held-out "
        "sequences of each "
        f"length. {mq.get('layers', 2)} layers, {mq['heads']} heads, {mq['steps']} steps, AdamW with weight decay "
        f"{mq.get('weight_decay', 0.1):g}, warmup then cosine decay; "
        + ("every attention and MLP output projection initialised to zero, so each block starts as the identity "
           "(`zero_init_residual`: it can shorten the plateau a deeper model sits on before it learns the task, but not "
           "reliably, and it kept a 2-layer softmax model from learning it: reports/mqar-4-layers); "
           if presets.mqar_setting(mq, "zero_init_residual") else "the default init; ")
        + (f"learning rates swept over {', '.join(f'{x:g}' for x in lrs)}"
           + ("" if all(len(m["sweep"]) == len(lrs) for m in (mq.get("models") or {}).values()) else
              " (not every model at each: the sweep table lists each model's)")
           + ", and each model's best (highest mean accuracy over the lengths) is reported, as zoology reports the best "
           "of its sweep." if len(lrs) > 1 else
           f"one learning rate, {lrs[0]:g} (**no sweep in this run**: a model can fail from optimisation alone).")
        + " One seed per model" + ("." if seed == presets.DEFAULT_SEED else f" (`--seed {seed}`; it also draws the data).")
        + " Parameter counts are matched to the "
        "paper-exact ZeroS at the same width within 5%"
        + "".join(f"; {row_label(k.split('/')[0])} (width {k.split('/')[1]}) has {m['overrides']['num_hidden_layers']} layers"
                  + (f", its MLP {m['overrides']['intermediate_size']} wide to match" if "intermediate_size" in m["overrides"]
                     else " and the default MLP")
                  for k, m in (mq.get("models") or {}).items()
                  if (m.get("overrides") or {}).get("num_hidden_layers", mq.get("layers")) != mq.get("layers"))
        + "."
        + (f" **This run changed the {p.name} mode's settings ({mqar_changes(mq, p.name)})**, to fit the machine's "
           "time; the mode's own settings are in benchmarks/evidence/presets.py." if mqar_changes(mq, p.name) else ""),
        "",
        "![MQAR](mqar.png)", "",
    ]
    cells = mq["cells"]
    keys_in = list(dict.fromkeys(c.get("model", c["attention_type"]) for c in cells))
    grid = sorted({(c["width"], c["seq_len"]) for c in cells})
    rows = []
    for width, T in grid:
        row = [str(width), str(T), str(next(c["pairs"] for c in cells if c["width"] == width and c["seq_len"] == T))]
        for k in keys_in:
            c = next((c for c in cells if c["width"] == width and c["seq_len"] == T
                      and c.get("model", c["attention_type"]) == k), None)
            row.append(_f(c["accuracy"]) if c else "n/a")
        rows.append(row)
    lines += _table(["width", "length", "pairs"] + [f"{row_label(k)}" for k in keys_in], rows) + [""]
    models = mq.get("models") or {}
    if models:
        mrows = [[row_label(k.split("/")[0]), k.split("/")[1], f"{m['parameters'] / 1e6:.3f} M", f"{m['lr']:g}",
                  ", ".join(f"{s['lr']:g}: {s['mean']:.3f}" for s in m["sweep"])] for k, m in models.items()]
        lines += ["Learning-rate sweep (mean accuracy over the lengths at each learning rate):", ""]
        lines += _table(["model", "width", "parameters", "best lr", "sweep"], mrows) + [""]
        lines += md_mqar_curves(models, mq["lengths"])
    lines += _skipped_notes(mq.get("skipped") or {})
    if "mqar" not in run.results.get("sections_done", []) and "mqar" not in run.sections:
        missing = [r.label for r in presets.MODEL_ROWS if r.key not in keys_in and r.key not in (mq.get("skipped") or {})]
        if missing:
            lines += [f"Not reached: {', '.join(missing)} (the invocation was stopped before these models).", ""]
    stats = mqar_stats(mq)
    findings.append("MQAR mean accuracy over the grid: " + ", ".join(f"{row_label(k)} {stats[k][0]:.3f}" for k in keys_in) + ".")
    base = mqar_baseline(mq)
    # softmax rows short of the floor somewhere -> their lowest accuracy
    below = {key: stats[key][1] for key in MQAR_BASELINE_ROWS if key in stats and stats[key][1] < SOFTMAX_MQAR_FLOOR}
    if below:
        names = " and ".join(f"{row_label(k)} (lowest {low:.2f})" for k, low in below.items())
        verb = "stays" if len(below) == 1 else "stay"
        if base[2] >= SOFTMAX_MQAR_FLOOR:
            findings.append(f"MQAR: **{names} {verb} below {SOFTMAX_MQAR_FLOOR:g} in part of the grid**, where "
                            f"{row_label(base[0])}, with the same parameters and tokens, learns the task (lowest "
                            f"{base[2]:.2f}): the comparisons below are against {row_label(base[0])}.")
        else:
            findings.append(f"MQAR: **{names} {verb} below {SOFTMAX_MQAR_FLOOR:g} in part of the grid**: the training "
                            "budget does not solve the task for attention, so the gaps below are partly undertraining.")
    best = max(c["accuracy"] for c in cells)
    if best < 0.3:
        findings.append(f"MQAR: no model got above {best:.2f} accuracy in this budget ({mq['steps']} steps): the "
                        "models have not learned the task yet, so these numbers say little about recall.")
    lost, soft_key = [], base[0] if base else BASELINE_ROW
    for width, T in grid:
        get = {c.get("model", c["attention_type"]): c["accuracy"] for c in cells if c["width"] == width and c["seq_len"] == T}
        if None not in (get.get("zeros"), get.get(soft_key)) and get["zeros"] < get[soft_key] - TARGET_MQAR_GAP:
            lost.append(f"width {width}, length {T} ({get['zeros']:.2f} vs {get[soft_key]:.2f})")
    if lost:
        findings.append(f"MQAR: **ZeroS is below {row_label(soft_key)}** (by more than {TARGET_MQAR_GAP:g}) at "
                        + "; ".join(lost) + ".")
    elif "zeros" in stats and soft_key in stats:
        findings.append(f"MQAR: ZeroS is within {TARGET_MQAR_GAP:g} of {row_label(soft_key)} or above it in every cell.")
    pairs = [(c["accuracy"], next((d["accuracy"] for d in cells if d.get("model", d["attention_type"]) == "linear"
                                   and d["width"] == c["width"] and d["seq_len"] == c["seq_len"]), None))
             for c in cells if c.get("model", c["attention_type"]) == "zeros"]
    pairs = [(z, l) for z, l in pairs if l is not None]
    if pairs:
        above = sum(z > l for z, l in pairs)
        text = f"MQAR: ZeroS is above plain linear attention in {above} of {len(pairs)} cells"
        findings.append(text + "." if above * 2 > len(pairs) else f"**{text}**.")
    return lines


def target_findings(run: Run) -> list[str]:
    """The issue's target: an O(1)-state-dominant model (ZeroS in >= 3/4 of the layers) within 5% of
    softmax's validation perplexity and within 0.05 of softmax's MQAR accuracy (mean over the grid; the
    softmax row of the same parameters that learned the task, ``mqar_baseline``)."""
    lm = run.results.get("lm") or {}
    mq = run.results.get("mqar") or {}
    means = mqar_means(mq)
    mq_models = mq.get("models") or {}
    base_ppl = (lm.get(BASELINE_ROW) or {}).get("final_val_ppl")
    # the condition on the grid: softmax must have learned the task before it judges anything
    base_key, base_acc, base_worst = mqar_baseline(mq) or (BASELINE_ROW, None, None)
    base_name = row_label(base_key)
    if base_ppl is None and base_acc is None:
        return []
    out = []
    for row in presets.MODEL_ROWS:
        r = lm.get(row.key)
        shares = [m.get("softmax_share") for k, m in mq_models.items() if k.split("/")[0] == row.key]
        share = r.get("softmax_share", 0.0) if r else (shares[0] if shares else None)
        if r is None and row.key not in means:
            continue
        if not qualifies_for_target(row.attention_type, share):
            continue
        parts, failed, missing = [], False, False
        if base_ppl is not None and r and r.get("final_val_ppl"):
            ok = r["final_val_ppl"] <= (1 + TARGET_PPL_GAP) * base_ppl
            failed |= not ok
            parts.append(f"perplexity {r['final_val_ppl']:.2f} vs softmax {base_ppl:.2f} ({_pct(r['final_val_ppl'], base_ppl)}, "
                         f"{'within' if ok else 'outside'} {100 * TARGET_PPL_GAP:.0f}%)")
        else:
            missing = True
            parts.append("perplexity not measured")
        if base_acc is not None and row.key in means and base_worst < SOFTMAX_MQAR_FLOOR:
            missing = True
            parts.append(f"MQAR not judged: {means[row.key]:.3f} vs {base_name} {base_acc:.3f}, but {base_name} reaches "
                         f"only {base_worst:.3f} at some length of this grid (< {SOFTMAX_MQAR_FLOOR:g}: not trained to the task)")
        elif base_acc is not None and row.key in means:
            ok = means[row.key] >= base_acc - TARGET_MQAR_GAP
            failed |= not ok
            parts.append(f"MQAR mean accuracy {means[row.key]:.3f} vs {base_name} {base_acc:.3f} "
                         f"({'within' if ok else 'outside'} {TARGET_MQAR_GAP:g})")
        else:
            missing = True
            parts.append("MQAR not measured")
        head = f"Target ({100 * (1 - share):.0f}% ZeroS layers) {row.label}: "
        verdict = "**not met**: " if failed else "open (not all of it measured): " if missing else "met: "
        out.append(head + verdict + "; ".join(parts) + ".")
    return out


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


def section_commands(run: Run) -> list[str]:
    """One line per invocation that produced sections of this report (sections may run separately)."""
    by_command: dict = {}
    for section in SECTIONS:
        info = run.results.get("section_runs", {}).get(section)
        if info and section in run.results.get("sections_done", []):  # an interrupted section's entry is stale
            machine = info.get("device") or ""
            if info.get("cpu"):
                machine += f", {info['cpu']} x {info.get('cpu_count')}"
            key = (info.get("command"), info.get("git_commit"), machine, info.get("precision"))
            if changed_settings(run, section):
                key = key[:3] + (f"{info.get('precision')}; settings changed from the mode: {changed_settings(run, section)}",)
            by_command.setdefault(key, []).append(section)
    # Pieces: rows trained by an invocation of their own (--models, or another --out merged in) name it in their record.
    lm = run.results.get("lm") or {}
    mqar_models = (run.results.get("mqar") or {}).get("models") or {}
    pieces = [("lm", {k: r for k, r in lm.items() if k not in ABLATIONS}),
              ("ablations", {k: r for k, r in lm.items() if k in ABLATIONS}),
              # (each learning rate of a sweep joined from pieces names its own command)
              ("mqar", {**mqar_models, **{f"{k} lr {s['lr']:g}": s for k, m in mqar_models.items() for s in m["sweep"]}})]
    listed = {cmd for cmd, *_ in by_command}
    for section, rows in pieces:
        for cmd in sorted({r.get("command") for r in rows.values()} - listed - {None}):
            commit = next((r.get("git_commit") for r in rows.values() if r.get("command") == cmd), None)
            by_command.setdefault((cmd, commit, None, None), []).append(f"{section} (some of its models)")
    if not by_command:
        return [f"- Command: `{run.results.get('command')}`"]
    return [f"- Command: `{cmd}` (sections {', '.join(secs)}"
            + (f"; git {(commit or 'unknown')[:12]}, {device}, {precision})" if device else
               f"; git {commit[:12]})" if commit else ")")
            for (cmd, commit, device, precision), secs in by_command.items()]


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
    findings += target_findings(run)
    for name, fn in PLOTS.items():
        path = run.out / name
        if not fn(run, path) and path.exists():
            path.unlink()
    env = run.results.get("environment") or {}
    versions = env.get("versions", {})
    done = [s for s in SECTIONS if s in run.results.get("sections_done", [])]  # this run's and earlier runs'

    pending = [s for s in run.sections if s not in done]
    interrupted = [s for s in SECTIONS if s not in done and s not in run.sections and run.results.get(s)]
    head = [
        "# ZeroS vs softmax vs linear attention: evidence report",
        "",
        f"Written by `benchmarks/report.py` ({p.name} mode). Every number below comes from the invocation that a "
        "Command line names for its section (sections may run separately into one folder); the raw numbers are in "
        "`results.json`."
        + ("" if p.name.startswith("full") else f" **{p.name.capitalize()} mode trains tiny models briefly: it checks that the "
           "pipeline works and shows its shape; it is not evidence. Use the full mode for that.**"),
        "",
        *section_commands(run),
        f"- Last invocation: started {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(run.started))}; wall time "
        f"{run.results['wall_s'] / 60:.1f} min" + (f" (**incomplete**: {', '.join(pending)} still to run)" if pending else "")
        + (f" (**an earlier invocation of {', '.join(interrupted)} was stopped before the end**: its results are partial)"
           if interrupted else ""),
        f"- Its machine: {run.device}" + (f" ({env.get('gpu')}, CUDA {env.get('cuda')})" if env.get("gpu") else "")
        + f", precision {run.precision}; CPU: {env.get('cpu')}, {env.get('cpu_count')} cores "
        f"({env.get('torch_threads')} torch threads), {env.get('memory_gib')} GiB memory",
        f"- Platform: {env.get('platform')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Its code: git {env.get('git_commit') or 'unknown'}" + (" (with uncommitted changes)" if env.get("git_dirty") else ""),
        "- Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in run.results.get("section_seconds", {}).items()
                                              if k in done),
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


# Main
