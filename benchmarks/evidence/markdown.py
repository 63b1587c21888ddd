"""The report's text: one Markdown writer per section (each adding its findings), and the assembly of
report.md, the plots and results.json."""

from __future__ import annotations

import dataclasses
import json
import math
import time

from .harness import Run
from .plots import PLOTS
from .presets import ABLATIONS, LABELS, MAIN_TYPES, SECTIONS


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


# Main
