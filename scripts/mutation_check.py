#!/usr/bin/env python
"""Mutation check: do the tests fail when the feature they guard is broken?

Each mutation below is one small deliberate bug (a text replacement in one source file). For each,
the script copies the working tree (tracked and untracked, not ignored files) to a temporary
directory, applies the bug there, runs the tests that claim to guard that feature, and reports
whether they failed ("caught") or passed ("SURVIVED"). The checkout itself is never modified.

    .venv/bin/python scripts/mutation_check.py               # every fast mutation (a few minutes)
    .venv/bin/python scripts/mutation_check.py --list        # names only
    .venv/bin/python scripts/mutation_check.py -k streaming  # those whose name contains "streaming"
    .venv/bin/python scripts/mutation_check.py --slow        # also those guarded by DeepSpeed runs

Exit status: 0 when every mutation was caught, 1 when one survived, 2 when a mutation no longer
applies (its text is not found exactly once: the code moved; update the list).

Not part of the test suite (it runs the suite's tests many times over).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATE_PY = "zeros_lm/cli/generate.py|generate.py"  # the CLI's code (moved into the package by the layout work)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file to break, relative to the repository root; "a|b": the first of these that exists
    old: str | tuple[str, ...]  # text that must occur exactly once in it (several: one edit each)
    new: str | tuple[str, ...]  # what it becomes
    tests: tuple[str, ...]  # pytest node ids / files / "-k" expressions (as pytest arguments)
    slow: bool = False


M = Mutation
MUTATIONS = [
    # 1. gradient checkpointing
    M("checkpointing: LightningModule never enables it", "zeros_lm/training.py",
      'enable(activation_checkpointing_kwargs={"use_reentrant": False})', "pass",
      ("tests/test_train.py", "-k", "checkpointing")),
    M("checkpointing: block is a plain nn.Module", "zeros_lm/modeling_zeros.py",
      "class ZeroSBlock(GradientCheckpointingLayer):", "class ZeroSBlock(nn.Module):",
      ("tests/test_model.py", "-k", "checkpointing")),
    # 2. ablation switches
    M("ablation: use_output_norm ignored", "zeros_lm/modeling_zeros.py",
      "        if self.config.use_output_norm:\n", "        if True:\n",
      ("tests/test_model.py", "-k", "ablation")),
    M("ablation: norm logit divided by sqrt(d)", "zeros_lm/modeling_zeros.py",
      "return uf.pow(2).sum(-1) / d, None", "return uf.pow(2).sum(-1) / math.sqrt(d), None",
      ("tests/test_model.py", "-k", "ablation")),
    M("ablation: g0 dropped when gates are off", "zeros_lm/modeling_zeros.py",
      "g0 = g1 if self.has_zero_order else None", "g0 = None",
      ("tests/test_model.py", "-k", "ablation")),
    # 3. streaming data
    M("streaming: validation documents not held out", "zeros_lm/data/module.py",
      "docs = docs.skip(hp.val_docs)", "docs = docs",
      ("tests/test_data.py", "-k", "streaming")),
    M("streaming: resume skip disabled", "zeros_lm/data/loading.py",
      "        if skip:\n            ds = ds.skip(skip)", "        if False:\n            ds = ds.skip(skip)",
      ("tests/test_data.py", "-k", "streaming")),
    M("streaming: shuffle buffer ignored", "zeros_lm/data/loading.py",
      "if self.shuffle_buffer and self.shuffle_buffer > 1:", "if False:",
      ("tests/test_data.py", "-k", "streaming")),
    # 4. val_files
    M("val_files: validation built from the training documents", "zeros_lm/data/corpus.py",
      "val, vd, vt = _pack_documents(val_docs, ", "val, vd, vt = _pack_documents(docs, ",
      ("tests/test_data.py", "-k", "validation")),
    # other data promises
    M("data: sample_by paragraph splits lines", "zeros_lm/data/sources.py",
      'return [p for p in text.split("\\n\\n")]', 'return [p for p in text.split("\\n")]',
      ("tests/test_data.py", "-k", "sample_by")),
    M("data: sample_by line gives whole documents", "zeros_lm/data/sources.py",
      "        return text.splitlines()\n", "        return [text]\n",
      ("tests/test_data.py", "-k", "sample_by")),
    # training, export, report
    M("throughput: token count restarts on resume", "zeros_lm/callbacks.py",
      'self.tokens_seen = int(state_dict.get("tokens_seen", 0))', "self.tokens_seen = 0",
      ("tests/test_train.py::test_resume_from_last_ends_where_an_uninterrupted_run_ends",)),
    M("export: --dtype ignored", "zeros_lm/export.py",
      "dtype = getattr(torch, args.dtype)", "dtype = torch.float32",
      ("tests/test_train.py::test_export_options_dtype_tokenizer_and_no_check",)),
    M("export: --tokenizer ignored", "zeros_lm/export.py",
      "tokenizer = load_tokenizer(args.tokenizer)", "tokenizer = None",
      ("tests/test_train.py::test_export_options_dtype_tokenizer_and_no_check",)),
    M("export: --no-check ignored", "zeros_lm/export.py",
      "if not args.no_check:", "if True:",
      ("tests/test_train.py::test_export_options_dtype_tokenizer_and_no_check",)),
    M("report: bf16 on any CPU in full mode", "benchmarks/evidence/harness.py|benchmarks/report.py",
      'return "bf16-mixed" if mode == "full" and native_bf16 else "32-true"',
      'return "bf16-mixed" if mode == "full" else "32-true"',
      ("tests/test_report.py", "-k", "precision")),
    M("report --merge: MQAR rows of other settings merged", "benchmarks/report.py",
      "if mqar.get(\"models\") and their_rows and differ:", "if False:",
      ("tests/test_report.py", "-k", "merge")),
    M("report --merge: saved LM models not copied", "benchmarks/report.py",
      "            shutil.copytree(model, out / \"models\" / model.name, dirs_exist_ok=True)", "            pass",
      ("tests/test_report.py", "-k", "merge")),
    M("init: zero_init_residual ignored", "zeros_lm/modeling_zeros.py",
      "if residual_output and self.config.zero_init_residual:", "if False:",
      ("tests/test_model.py", "-k", "zero_init")),
    M("report: MQAR models built without mqar_zero_init_residual", "benchmarks/evidence/experiments.py",
      "zero_init_residual=p.mqar_zero_init_residual,", "zero_init_residual=False,",
      ("tests/test_report.py", "-k", "zero_init")),
    M("report: the MQAR curve misses the last step", "benchmarks/tasks.py",
      "if step % self.every and step != trainer.max_steps:", "if step % self.every:",
      ("tests/test_report.py", "-k", "curve")),
    # DeepSpeed (slow: two-process and offload runs; --slow)
    M("deepspeed: resume restarts the data epoch", "zeros_lm/data/loading.py",
      "consumed = int(self.position_fn()) * self.batch_size", "consumed = 0",
      ("tests/test_train.py", "-k", "deepspeed_two_processes and 3"), slow=True),
    M("deepspeed: offload without CPU Adam", "zeros_lm/training.py",
      'choice = "cpu_adam" if strategy is not None and deepspeed_offloads_optimizer(strategy) else "adamw"',
      'choice = "adamw"',
      ("tests/test_train.py", "-k", "offload"), slow=True),
    # 5. generate.py's options
    M("generate.py: --temperature ignored", GENERATE_PY,
      'for k in ("temperature", "top_k", "top_p")', 'for k in ("top_k", "top_p")',
      ("tests/test_cli_options.py", "-k", "reaches_generate")),
    M("generate.py: --top-k ignored", GENERATE_PY,
      'for k in ("temperature", "top_k", "top_p")', 'for k in ("temperature", "top_p")',
      ("tests/test_cli_options.py", "-k", "reaches_generate")),
    M("generate.py: --top-p ignored", GENERATE_PY,
      'for k in ("temperature", "top_k", "top_p")', 'for k in ("temperature", "top_k")',
      ("tests/test_cli_options.py", "-k", "reaches_generate")),
    M("generate.py: --repetition-penalty ignored", GENERATE_PY,
      "if args.repetition_penalty is not None:", "if False:",
      ("tests/test_cli_options.py", "-k", "reaches_generate")),
    M("generate.py: --dtype ignored", GENERATE_PY,
      "dtype=getattr(torch, dtype)", "dtype=torch.float32",
      ("tests/test_cli_options.py", "-k", "dtype")),
    M("generate.py: text printed only at the end", GENERATE_PY,
      "        def put(self, value):\n",
      "        def on_finalized_text(self, text, stream_end=False):\n"
      "            self.held = getattr(self, 'held', '') + text\n"
      "            if stream_end:\n"
      "                print(self.held, flush=True)\n\n"
      "        def put(self, value):\n",
      ("tests/test_cli_options.py", "-k", "streamed")),
    M("generate.py: --interactive re-reads the history", GENERATE_PY,
      ("        past = self.cache.get_seq_length()\n", "        self.pending = out[:, -1:]\n"),
      ("        ids = torch.cat([getattr(self, 'consumed', ids[:, :0]), ids], dim=1)\n"
       "        self.cache = self.cache_class(self.model.config)\n"
       "        past = 0\n",
       "        self.pending = out[:, -1:]\n        self.consumed = out[:, :-1]\n"),
      ("tests/test_cli_options.py", "-k", "interactive")),
    # 9. packed documents sharing a chunk (the training layout of the chunked forms)
    M("shared chunks: ZeroS weights not block-diagonal", "zeros_lm/ops.py",
      "mask = mask & (seg.unsqueeze(-1) == seg.unsqueeze(-2))", "mask = mask",
      ("tests/test_ops.py", "-k", "share_chunks")),
    M("shared chunks: a later sequence reads the chunk's start state", "zeros_lm/ops.py",
      "readout_coefficients = tuple(x * readers for x in (a, b, hc))", "pass",
      ("tests/test_ops.py", "-k", "share_chunks")),
    M("shared chunks: state carried across a sequence start", "zeros_lm/ops.py",
      "kv = (moved if kept is None else moved * kept[:, None, None, None, None]) + added", "kv = moved + added",
      ("tests/test_ops.py", "-k", "share_chunks")),
    M("shared chunks: exponents not masked across sequences", "zeros_lm/ops.py",
      "decay_exponent = decay_exponent.masked_fill(~carry, 0.0)", "pass",
      ("tests/test_ops.py", "-k", "shared_chunks")),
    M("shared chunks: running maximum crosses sequences", "zeros_lm/ops.py",
      "out = torch.where(back >= shift, combine(out, earlier), out)", "out = combine(out, earlier)",
      ("tests/test_ops.py", "-k", "share_chunks")),
    M("packed: linear attention not block-diagonal", "zeros_lm/ops.py",
      "scores = scores.masked_fill(seg.unsqueeze(-1) != seg.unsqueeze(-2), 0.0)", "pass",
      ("tests/test_packed.py", "-k", "alone and linear")),
    M("packed: linear attention sums carried across documents", "zeros_lm/ops.py",
      "S = S * carry[j][..., None, None] + S_j * reach[j][..., None, None]", "S = S + S_j",
      ("tests/test_packed.py", "-k", "alone and linear")),
    M("packed: softmax per-document calls not causal", "zeros_lm/ops_softmax.py",
      "v[r:r + 1, :, lo:hi], is_causal=True)", "v[r:r + 1, :, lo:hi], is_causal=False)",
      ("tests/test_packed.py", "-k", "alone and softmax")),
    M("packed + compile: ZeroS traced through the documents' lengths", "zeros_lm/modeling_zeros.py",
      "functools.partial(zeros_attention_over_documents, documents)",
      "functools.partial(zeros_attention, sequence_starts=documents.row_lengths)",
      ("tests/test_packed.py", "-k", "compiled and zeros")),
    M("packed: softmax varlen call not causal", "zeros_lm/ops_softmax.py",
      "_CAUSAL_WINDOW = (-1, 0)", "_CAUSAL_WINDOW = (-1, -1)",
      ("tests/test_packed.py", "-k", "varlen_path")),
    M("packed: softmax varlen rows not laid end to end", "zeros_lm/ops_softmax.py",
      "lengths = [n for row in row_lengths for n in row]", "lengths = [n for row in row_lengths[:1] for n in row] * len(row_lengths)",
      ("tests/test_packed.py", "-k", "varlen_path")),
    # 10. GPU-speed changes (the H200 profile of this work)
    M("blocked running sum: earlier blocks not added", "zeros_lm/ops.py",
      "before = totals.cumsum(1) - totals", "before = totals * 0",
      ("tests/test_ops.py", "-k", "blocked_running")),
    M("fused backward: start-state gradients to the wrong rows", "zeros_lm/ops_fused.py",
      "chunk_load.flatten().long().clamp(min=0))[:num_loads]", "torch.zeros_like(chunk_load.flatten().long()))[:num_loads]",
      ("tests/test_fused.py", "-k", "varlen or prefix or plain")),
    M("fused backward: key side overwrites the query side's ds", "zeros_lm/ops_fused.py",
      "tl.store(ds + tok, tl.load(ds + tok) + tl.where(", "tl.store(ds + tok, 0.0 + tl.where(",
      ("tests/test_fused.py", "-k", "plain_rows")),
    M("fused backward: key side overwrites dsb1", "zeros_lm/ops_fused.py",
      "tl.store(dsb1 + p, tl.load(dsb1 + p) - tl.sum(key_G, axis=0))", "tl.store(dsb1 + p, -tl.sum(key_G, axis=0))",
      ("tests/test_fused.py", "-k", "plain_rows")),
    M("fused backward: dq without the chunk's own weights", "zeros_lm/ops_fused.py",
      "dq_c += _weights_dot(rdov, k_c, LOWP, F32)", "pass",
      ("tests/test_fused.py", "-k", "plain_rows")),
    M("fused packed: weights not block-diagonal", "zeros_lm/ops_fused.py",
      "inside = inside & (seg_c[:, None] == seg_c[None, :])", "inside = inside",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused packed: every sequence of a chunk reads its start state", "zeros_lm/ops_fused.py",
      "readers = tl.load(seg + i_b * T + j * C + o_c) == tl.load(seg + i_b * T + j * C)",
      "readers = tl.load(seg + i_b * T + j * C + o_c) >= 0",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused packed: state carried across a sequence start", "zeros_lm/ops_fused.py",
      "return tl.load(row + tl.arange(0, C)) == last, (tl.load(row) == last).to(tl.int32)",
      "return tl.load(row + tl.arange(0, C)) == last, (tl.load(row) >= 0).to(tl.int32)",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused packed: earlier sequences write the state", "zeros_lm/ops_fused.py",
      "k_c = tl.where(writers[:, None], k_c, 0.0)", "pass",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused packed backward: earlier sequences' keys get the state's gradient", "zeros_lm/ops_fused.py",
      "k_f = tl.where(writers[:, None], k_f, 0.0)", "pass",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused packed backward: shift gradient across a sequence start", "zeros_lm/ops_fused.py",
      "shift = shift * _chunk_segments(seg, i_b, i_n, T, C)[1]", "pass",
      ("tests/test_ops.py", "-k", "fused_kernels_with_packed")),
    M("fused fake backward: the inputs' strides", "zeros_lm/ops_fused.py",
      "new = lambda x, dtype=torch.float32: x.new_empty(x.shape, dtype=dtype)",
      "new = lambda x, dtype=torch.float32: torch.empty_like(x, dtype=dtype)",
      ("tests/test_fused.py", "-k", "fake_kernels")),
]


def working_tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def copy_tree(dest: Path) -> None:
    for rel in working_tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def use_tests_from(rev: str, root: Path) -> None:
    """Replace the copy's tests/ by those of git revision ``rev`` (to show what older tests missed)."""
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "tests"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    shutil.rmtree(root / "tests")
    for rel in listed:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True,
                                          check=True).stdout)


def apply(m: Mutation, root: Path) -> None:
    candidates = [root / p for p in m.path.split("|")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise LookupError(f"none of {m.path} exists")
    text = path.read_text()
    olds, news = (m.old, m.new) if isinstance(m.old, tuple) else ((m.old,), (m.new,))
    for old, new in zip(olds, news, strict=True):
        count = text.count(old)
        if count != 1:
            raise LookupError(f"{path.relative_to(root)}: the text to mutate occurs {count} times (expected once): {old!r}")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ZEROS_LM_CACHE=str(root / ".zeros_cache"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    why = next((line.strip() for line in lines if line.startswith("E ")), "")
    if why:  # the first failing assertion: shows that the right check failed, not a crash
        summary += " | " + why[:160]
    if proc.returncode == 0:
        return "passed", time.time() - start, summary
    if proc.returncode == 1:
        return "failed", time.time() - start, summary
    if proc.returncode == 5:
        return "no test ran", time.time() - start, summary
    return f"error (pytest exit {proc.returncode})", time.time() - start, summary


def check_imports_from(root: Path) -> None:
    """The tests in the copy must import the copy's zeros_lm, not the checkout's (editable install)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import zeros_lm; print(zeros_lm.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the copy imports zeros_lm from {out}, not from {root}: cannot run mutations safely")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="select", default=None, help="only mutations whose name contains this text")
    ap.add_argument("--slow", action="store_true", help="also the mutations guarded by slow (DeepSpeed) tests")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run")
    ap.add_argument("--baseline", action="store_true", help="first run each selected test set unmutated (must pass)")
    ap.add_argument("--tests-from", metavar="REV", default=None,
                    help="run the tests of this git revision instead of the working tree's (e.g. to show that "
                         "the tests before a change let a mutation survive)")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if (args.slow or not m.slow) and (args.select is None or args.select in m.name)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}]  -> {' '.join(m.tests)}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="zeros-mutation-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        check_imports_from(base)
        if args.tests_from:
            use_tests_from(args.tests_from, base)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                outcome, seconds, summary = run_tests(base, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s) {summary}", flush=True)
                if outcome != "passed":
                    print("the unmutated tests must pass first", file=sys.stderr)
                    return 1
        for m in chosen:
            work = Path(tmp) / "mutant"
            shutil.copytree(base, work)
            try:
                apply(m, work)
            except LookupError as e:
                results.append((m, "does not apply", 0.0, str(e)))
                print(f"{m.name}: does not apply: {e}", flush=True)
                shutil.rmtree(work)
                continue
            outcome, seconds, summary = run_tests(work, m.tests, args.timeout)
            shutil.rmtree(work)
            verdict = {"failed": "caught", "passed": "SURVIVED"}.get(outcome, outcome)
            results.append((m, verdict, seconds, summary))
            print(f"{m.name}: {verdict} ({seconds:.0f} s) {summary}", flush=True)

    width = max(len(m.name) for m, *_ in results) if results else 10
    print()
    print(f"| {'mutation'.ljust(width)} | result | tests | s |")
    print(f"|{'-' * (width + 2)}|---|---|---:|")
    for m, verdict, seconds, _ in results:
        print(f"| {m.name.ljust(width)} | {verdict} | {' '.join(m.tests)} | {seconds:.0f} |")
    caught = sum(v == "caught" for _, v, *_ in results)
    print(f"\n{caught} of {len(results)} mutations caught")
    if any(v == "does not apply" for _, v, *_ in results):
        return 2
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
