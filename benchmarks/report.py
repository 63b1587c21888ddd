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
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python benchmarks/report.py
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.evidence.experiments import HANDLERS  # noqa: E402
from benchmarks.evidence.harness import Run, _quiet_lightning, default_precision, environment, log  # noqa: E402
from benchmarks.evidence.markdown import write_report  # noqa: E402
from benchmarks.evidence.presets import ABLATIONS, CONTRAST_MODELS, MAIN_TYPES, PRESETS, SECTIONS  # noqa: E402,F401


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
                  scratch=scratch, sections=sections, argv=list(argv if argv is not None else sys.argv[1:]),
                  writer=write_report)
        rel = os.path.relpath(Path(__file__).resolve(), Path.cwd()) if Path.cwd() in Path(__file__).resolve().parents else __file__
        run.results["command"] = "python " + shlex.join([rel, *run.argv])
        run.results["environment"] = environment(run)
        run.results["sections_done"] = []
        run.results["section_seconds"] = {}
        log(f"{name} mode on {device} ({precision}); sections {', '.join(sections)}; writing to {out}")
        run.save()
        for section in SECTIONS:
            if section not in sections:
                continue
            t0 = time.time()
            log(f"section {section}")
            HANDLERS[section](run)
            run.results["section_seconds"][section] = time.time() - t0
            run.results["sections_done"].append(section)
            run.save()
    log(f"done in {(time.time() - run.started) / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
