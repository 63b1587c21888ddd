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
    python benchmarks/report.py --sections mqar --models zeros,softmax,linear   # one piece of the full report
    python benchmarks/report.py --sections ''      # rewrite report.md and the plots from results.json
    python benchmarks/report.py --sections mqar --models zeros --out /tmp/piece   # a piece beside another run ...
    python benchmarks/report.py --sections '' --merge /tmp/piece                   # ... and its rows added to reports/

Sections run in the order lm, extrapolation, contrast, ablations, mqar, and the report is rewritten
after every model, so an interrupted run leaves a valid (marked incomplete) report. Sections may run
in separate invocations into the same --out (each under two hours on a 2-core CPU): an invocation
keeps the other sections' results from its results.json and rewrites the report from all of them;
the lm section saves its models under <out>/models/ so that extrapolation can run later. Pieces
that run at the same time go into separate folders (two invocations would overwrite each other's
results.json) and --merge adds their model rows to one; MQAR rows trained at other learning rates
join the row's sweep there (each piece one rate: the report keeps the best, as one sweep would). The
models compared are the rows of benchmarks/evidence/presets.py MODEL_ROWS (a label, config
overrides, the sections that train it); a row the installed model cannot build is skipped with a note. Every number in the
report comes from the invocation named next to its section (results.json holds them all).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python benchmarks/report.py
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.evidence import presets as evidence_presets  # noqa: E402
from benchmarks.evidence.experiments import HANDLERS, saved_lm_models  # noqa: E402
from benchmarks.evidence.harness import Run, _quiet_lightning, default_precision, environment, log  # noqa: E402
from benchmarks.evidence.markdown import write_report  # noqa: E402
from benchmarks.evidence.presets import (ABLATIONS, CONTRAST_MODELS, DEFAULT_SEED, MAIN_TYPES, MODEL_ROWS,  # noqa: E402,F401
                                        MQAR_COMPARED, MQAR_SETTINGS, PRESETS, SECTIONS, mqar_setting)


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
    ap.add_argument("--mqar-lrs", default=None, help="comma-separated MQAR learning-rate sweep (overrides the mode)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one setting of the mode (a field of benchmarks/evidence/presets.py Preset; tuples "
                    "comma-separated), e.g. --set mqar_lengths=64,128,256; repeatable")
    ap.add_argument("--models", default=None, help="comma-separated subset of the model rows to train in the lm and mqar "
                    f"sections ({','.join(r.key for r in MODEL_ROWS)}; default all)")
    ap.add_argument("--merge", action="append", default=[], metavar="DIR",
                    help="first add the model rows that an invocation into another --out DIR trained (pieces run side by "
                    "side into separate folders): its lm and ablation rows with their saved models, its mqar rows (at "
                    "the same MQAR settings); the same mode; repeatable. With --sections '' it only merges and rewrites")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help="draws the initialisation, the training data and MQAR's held-out sets (default %(default)s)")
    ap.add_argument("--cache-dir", default=None, help="tokenizer/data cache (default: $ZEROS_LM_CACHE or ~/.cache/zeros_lm)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def apply_setting(preset, item: str) -> None:
    """Apply one ``FIELD=VALUE`` to ``preset``, the value read as the field's type (a tuple of
    numbers or names comma-separated). Raises ValueError naming the problem."""
    name, sep, text = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(preset)}
    if not sep or name.strip() not in fields or name.strip() == "name":
        raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(f for f in fields if f != 'name')}")
    name = name.strip()
    current = getattr(preset, name)

    def scalar(kind, value: str):
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{item!r}: {value!r} is not true/false")
            return value.lower() in ("true", "1")
        try:
            return kind(float(value)) if kind is int and "e" in value.lower() else kind(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a {kind.__name__}") from None

    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        value = tuple(scalar(kind, v.strip()) for v in text.split(",") if v.strip())
        if not value:
            raise ValueError(f"{item!r}: give at least one value")
    else:
        value = scalar(type(current), text.strip())
    setattr(preset, name, value)


def earlier_results(out: Path, mode: str) -> dict:
    """The results an earlier invocation left in ``out/results.json`` (empty when there are none),
    so that sections run separately add up to one report. Raises ValueError when the file is
    unreadable or holds another mode's results (their settings differ: mixing them would mislead)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err}); move it away or choose another --out") from err
    if not isinstance(earlier, dict):
        raise ValueError(f"{path} is not a results file of this report; move it away or choose another --out")
    their_mode = (earlier.get("preset") or {}).get("name")
    if their_mode != mode:
        raise ValueError(f"{path} holds results of the {their_mode!r} mode, this run is {mode!r}: run the same mode into "
                         "it, or choose another --out")
    earlier.pop("preset", None)
    runs = earlier.setdefault("section_runs", {})
    for section in earlier.get("sections_done", []):  # a results file from before sections ran separately
        if section not in runs:
            env = earlier.get("environment") or {}
            runs[section] = {"command": earlier.get("command"), "git_commit": env.get("git_commit"),
                             "git_dirty": env.get("git_dirty"), "device": env.get("device"), "cpu": env.get("cpu"),
                             "cpu_count": env.get("cpu_count"),
                             "precision": env.get("precision"), "preset": (json.loads(path.read_text()).get("preset"))}
    return earlier


def section_rows(results: dict, section: str) -> set:
    """The model rows of ``section`` in ``results`` (lm and ablation rows share ``results["lm"]``)."""
    if section == "mqar":
        return {key.split("/")[0] for key in (results.get("mqar") or {}).get("models", {})}
    return {key for key in results.get("lm") or {} if (key in ABLATIONS) == (section == "ablations")}


def join_sweeps(mq: dict, theirs: dict, other: Path) -> dict:
    """MQAR results of two learning-rate sweeps at otherwise equal settings, as one: each model row and
    width keeps the learning rates of both (each with the command that trained it) and the cells and
    record of the best, as one sweep over all of them would. Raises ValueError for a row trained at the
    same learning rate in both (merge one of the two)."""
    models, cells = dict(mq["models"]), list(mq["cells"])

    def tagged(model: dict) -> list[dict]:
        return [{**s, "command": s.get("command", model.get("command")),
                 "git_commit": s.get("git_commit", model.get("git_commit"))} for s in model["sweep"]]

    for key, their in theirs["models"].items():
        row, width = key.split("/")[0], int(key.split("/")[1])
        mine = models.get(key)
        if mine is not None:
            both = sorted({s["lr"] for s in mine["sweep"]} & {s["lr"] for s in their["sweep"]})
            if both:
                raise ValueError(f"--merge {other}: {key} at learning rate {', '.join(f'{x:g}' for x in both)} is "
                                 "here and there: leave one of the two out")
        sweep = sorted(tagged(their) + (tagged(mine) if mine else []), key=lambda s: s["lr"])
        if mine is None or max(s["mean"] for s in their["sweep"]) > max(s["mean"] for s in mine["sweep"]):
            models[key] = {**their, "sweep": sweep}
            cells = ([c for c in cells if (c["model"], c["width"]) != (row, width)]
                     + [c for c in theirs["cells"] if (c["model"], c["width"]) == (row, width)])
        else:
            models[key] = {**mine, "sweep": sweep}
    lrs = sorted(set(mq.get("lrs") or []) | set(theirs.get("lrs") or []))
    return {**mq, "lrs": lrs, "models": models, "cells": cells}


def merge_rows(results: dict, other: Path, mode: str) -> tuple[list[str], list[Path]]:
    """Add to ``results`` (this --out's) the model rows an invocation into the folder ``other`` trained: its
    lm / ablation rows and its mqar rows, each keeping the command that trained it; a section's record comes
    too where the other's rows make up all of that section here (they replace every row of it, or it had none).
    Returns the rows merged and the lm models under other/models to copy beside this folder's. Raises ValueError, changing nothing,
    when ``other`` holds no results of this mode, its corpus differs, or its MQAR settings differ from those
    of the rows here other than in the learning rates (then the sweeps join: :func:`join_sweeps`)."""
    theirs = earlier_results(other, mode)
    if not theirs:
        raise ValueError(f"--merge {other}: it holds no results.json; give the --out folder of the invocation to merge")
    lm, their_lm = results.get("lm") or {}, theirs.get("lm") or {}
    if lm and their_lm and results.get("lm_data") != theirs.get("lm_data"):
        raise ValueError(f"--merge {other}: its language-modelling corpus differs from this folder's (lm_data)")
    mqar, their_mqar = results.get("mqar") or {}, theirs.get("mqar") or {}
    their_rows = sorted(section_rows(theirs, "mqar"))
    differ = [k for k in MQAR_COMPARED if mqar_setting(mqar, k) != mqar_setting(their_mqar, k)]
    # MQAR rows here and there at other settings: only other learning rates may meet (their sweeps join)
    joined = bool(mqar.get("models") and their_rows and differ)
    if joined and differ != ["lrs"]:
        raise ValueError(f"--merge {other}: its MQAR rows were trained at other settings than this folder's ("
                         + ", ".join(f"{k} {mqar_setting(their_mqar, k)} vs {mqar_setting(mqar, k)}" for k in differ
                                     if k != "lrs") + ")")
    if joined:
        mqar = join_sweeps(mqar, their_mqar, other)  # (before anything here changes: it may refuse)
    done, runs = results.setdefault("sections_done", []), results.setdefault("section_runs", {})
    for section in ("lm", "mqar", "ablations"):
        came = section_rows(theirs, section)
        if came and section_rows(results, section) <= came and not (joined and section == "mqar"):
            # the other's rows make up all of the section here: its record (command, settings, seconds) describes them
            done += [section] if section not in done else []
            runs[section] = theirs.get("section_runs", {}).get(section)
            seconds = (theirs.get("section_seconds") or {}).get(section)
            if seconds is not None:
                results.setdefault("section_seconds", {})[section] = seconds
    if their_lm:
        results["lm_data"] = theirs.get("lm_data")
        results["lm"] = {**lm, **their_lm}
    if their_rows:
        if not mqar.get("models"):
            mqar = {**their_mqar, "cells": [], "models": {}, "skipped": {}}
        if not joined:
            mqar["cells"] = ([c for c in mqar["cells"] if c["model"] not in their_rows]
                             + [c for c in their_mqar["cells"] if c["model"] in their_rows])
            mqar["models"] = {**mqar["models"], **their_mqar["models"]}
        mqar["skipped"] = {k: why for k, why in mqar.get("skipped", {}).items() if k not in their_rows}
        results["mqar"] = mqar
    models = [other / "models" / key for key in their_lm if (other / "models" / key).is_dir()]
    return [f"lm {key}" for key in their_lm] + [f"mqar {key}" for key in their_rows], models


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
    try:
        for item in args.set:
            apply_setting(preset, item)
    except ValueError as err:
        print(f"error: --set {err}", file=sys.stderr)
        return 2
    if args.mqar_lrs is not None:
        try:
            preset.mqar_lrs = tuple(float(x) for x in args.mqar_lrs.split(",") if x.strip())
        except ValueError:
            preset.mqar_lrs = ()
        if not preset.mqar_lrs or not all(x > 0 for x in preset.mqar_lrs):
            print(f"error: --mqar-lrs {args.mqar_lrs!r}: give positive numbers separated by commas, e.g. 1e-3,3e-3",
                  file=sys.stderr)
            return 2
    models = None
    if args.models is not None:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        keys = [r.key for r in evidence_presets.MODEL_ROWS]
        unknown = [m for m in models if m not in keys]
        if unknown or not models:
            print(f"error: unknown model(s) {unknown or args.models!r}; choose from {','.join(keys)}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else REPO / "reports" / ("" if name.startswith("full") else name)
    try:
        earlier = earlier_results(out, name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.merge:  # all or nothing: the folder changes only once every merge is known to fit
        earlier, copies = copy.deepcopy(earlier), []
        try:
            for other in args.merge:
                merged, models = merge_rows(earlier, Path(other), name)
                copies += models
                log(f"merging from {other}: {', '.join(merged) or 'no model rows'}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for model in copies:
            shutil.copytree(model, out / "models" / model.name, dirs_exist_ok=True)
    if "extrapolation" in sections and "lm" not in sections and not saved_lm_models(out):
        print(f"error: the extrapolation section evaluates the lm section's models, and {out / 'models'} holds none: "
              "add 'lm' (or run it first into the same --out)", file=sys.stderr)
        return 2
    precision = args.precision or default_precision(device, name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    _quiet_lightning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="zeros_report_") as scratch:
        run = Run(preset=preset, device=device, precision=precision, out=out, seed=args.seed, cache_dir=args.cache_dir,
                  scratch=scratch, sections=sections, argv=list(argv if argv is not None else sys.argv[1:]),
                  writer=write_report, models=models)
        rel = os.path.relpath(Path(__file__).resolve(), Path.cwd()) if Path.cwd() in Path(__file__).resolve().parents else __file__
        run.results.update(earlier)
        run.results["command"] = "python " + shlex.join([rel, *run.argv])
        run.results["environment"] = environment(run)
        run.results.setdefault("sections_done", [])
        run.results.setdefault("section_seconds", {})
        run.results.setdefault("section_runs", {})
        kept = [s for s in run.results["sections_done"] if s not in sections]
        log(f"{name} mode on {device} ({precision}); sections {', '.join(sections)}; writing to {out}"
            + (f" (keeping the earlier results of {', '.join(kept)})" if kept else ""))
        run.results["sections_done"] = kept
        run.save()
        env = run.results["environment"]
        for section in SECTIONS:
            if section not in sections:
                continue
            t0 = time.time()
            run.results["section_seconds"].pop(section, None)  # an earlier invocation's, no longer true
            run.results["section_runs"].pop(section, None)
            log(f"section {section}")
            HANDLERS[section](run)
            run.results["section_seconds"][section] = time.time() - t0
            run.results["section_runs"][section] = {
                "command": run.results["command"], "git_commit": env.get("git_commit"), "git_dirty": env.get("git_dirty"),
                "device": device + (f" ({env['gpu']})" if env.get("gpu") else ""), "precision": precision,
                "cpu": env.get("cpu"), "cpu_count": env.get("cpu_count"),
                "changed": {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
                            if getattr(preset, f.name) != getattr(PRESETS[name], f.name)},
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)), "preset": dataclasses.asdict(preset),
            }
            run.results["sections_done"].append(section)
            run.save()
    log(f"done in {(time.time() - run.started) / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
