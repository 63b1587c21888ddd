"""The benchmark scripts run end to end at a tiny size and print what the README shows: the op
benchmark (benchmarks/ops.py) and the training-throughput benchmark (benchmarks/train.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, args: list, env: dict) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell} |")]


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


def test_op_benchmark_at_a_tiny_length(clean_env):
    out = run("ops.py", ["--lengths", 64, "--repeats", 1, "--threads", 1, "--device", "cpu"], clean_env)
    assert "## forward + backward" in out and "## forward only" in out
    rows = table_rows(out, "64")
    assert len(rows) == 2  # one row per table
    for row in rows:
        # T, tok/s of zeros, sdpa and naive, zeros / sdpa, then the three peaks: all measured
        assert len(row) == 8, row
        assert all(number(c) > 0 for c in row[1:4]), row
        assert row[4].endswith("x") and number(row[4]) > 0
        assert all(c.endswith("MiB") for c in row[5:]), row
    agreement = re.search(r"float64: chunked ([\d.e+-]+), recurrent ([\d.e+-]+); float32: chunked ([\d.e+-]+), "
                          r"recurrent ([\d.e+-]+)", out)
    assert agreement, out
    f64c, f64r, f32c, f32r = map(float, agreement.groups())
    assert max(f64c, f64r) < 1e-9 and max(f32c, f32r) < 1e-4
    step = re.search(r"Recurrent single-token step \(B=1, H=8, d=64\): [\d,]+ us, state ([\d,]+) bytes", out)
    assert step and int(step.group(1).replace(",", "")) >= 3 * 8 * 64 * 64 * 4  # three d x d float32 per head


def test_training_benchmark_at_a_tiny_size(clean_env, tmp_path):
    results = tmp_path / "train.json"
    out = run("train.py", ["--seq-lens", 16, "--tokens-per-step", 32, "--hidden-size", 32, "--layers", 1,
                           "--heads", 2, "--vocab-size", 64, "--chunk-size", 8, "--warmup", 1, "--steps", 1,
                           "--json", results], clean_env)
    data = json.loads(results.read_text())
    points = {r["attention"]: r for r in data["results"]}
    assert set(points) == {"zeros", "softmax"}
    for r in points.values():
        assert "error" not in r, r
        assert r["seq_len"] == 16 and r["batch"] == 2 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    # equal parameters: softmax gets a wider MLP for ZeroS's u projection and gates, within half an MLP unit
    mlp_unit = 3 * 32 * 1  # gate, up and down rows of one MLP channel, hidden 32, 1 layer
    assert points["softmax"]["intermediate_size"] > points["zeros"]["intermediate_size"]
    assert abs(points["zeros"]["params"] - points["softmax"]["params"]) <= mlp_unit / 2
    rows = table_rows(out, "16")
    assert [r[1] for r in rows] == ["zeros", "softmax"]
    assert rows[1][-1] == "1.00x"  # softmax against itself


def test_profile_of_a_training_step(clean_env):
    """benchmarks/profile_step.py: the ZeroS layer's named ranges, once per layer and step, and the tables."""
    out = run("profile_step.py", ["--seq-len", 16, "--tokens-per-step", 32, "--hidden-size", 32, "--layers", 2,
                                  "--heads", 2, "--vocab-size", 64, "--chunk-size", 8, "--warmup", 1, "--steps", 2,
                                  "--rows", 5], clean_env)
    ranges = {row[0]: row for row in (r for name in ("zeros_lm.op", "zeros_lm.scalars", "zeros_lm.core")
                                      for r in table_rows(out, name))}
    assert set(ranges) == {"zeros_lm.op", "zeros_lm.scalars", "zeros_lm.core"}
    assert all(row[1] == "2" and number(row[2]) > 0 for row in ranges.values()), ranges  # 2 layers, CPU time
    assert "## by self cpu time" in out and "aten::" in out


def test_matched_mlp_width_at_the_117m_shape():
    """The LM table's softmax model has ZeroS's parameter count (116.8M) within 1%, at a tensor-core width."""
    import argparse

    from benchmarks.train import PARAM_TOLERANCE, add_model_options, matched_mlp_width

    p = argparse.ArgumentParser()
    add_model_options(p)
    args = p.parse_args("--hidden-size 768 --layers 12 --heads 12 --vocab-size 32000".split())
    width, count, target = matched_mlp_width(args, "softmax", "zeros")
    assert 116e6 < target < 117.5e6 and abs(count - target) <= PARAM_TOLERANCE * target
    assert width > 2048 and width % 8 == 0  # wider than the default 8/3 * 768


def test_op_benchmark_holds_tokens_fixed_and_gates_the_yardstick_per_token(monkeypatch):
    """B = tokens / T per row; the fla yardstick with a per-token gate gets a (B, T, H) log gate <= 0 that
    carries the logits' gradient (fla itself is only on GPU machines: a stand-in records the call)."""
    import sys
    import types

    import torch

    from benchmarks import ops as bench

    args = types.SimpleNamespace(tokens=32768, batch=1)
    assert [bench.batch_for(args, T) for T in (2048, 16384, 65536)] == [16, 2, 1]
    assert bench.batch_for(types.SimpleNamespace(tokens=None, batch=3), 2048) == 3
    calls = []

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, **kwargs):
        calls.append((g, g_gamma))
        return (v * (g.exp()[..., None] if g is not None else 1.0), None)

    fla = types.ModuleType("fla")
    fla.ops = types.ModuleType("fla.ops")
    fla.ops.simple_gla = types.ModuleType("fla.ops.simple_gla")
    fla.ops.simple_gla.chunk_simple_gla = chunk_simple_gla
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", fla.ops)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", fla.ops.simple_gla)
    q, k, v, s, g1, gh = bench.make_inputs(8, torch.device("cpu"), torch.float32, True, 2, 3, 4)
    bench.fla_simple_gla_gated(q, k, v, s, g1, gh).sum().backward()
    (g, gamma), = calls
    assert gamma is None and g.shape == (2, 8, 3) and bool((g <= 0).all())
    assert s.grad is not None and s.grad.abs().sum() > 0
    bench.fla_simple_gla(q, k, v, s, g1, gh)
    assert calls[-1][0] is None and calls[-1][1].shape == (3,)  # the per-head decay form


def test_launch_count_script_prints_its_tables(clean_env):
    out = run("launches.py", ["--attentions", "softmax", "--seq-len", 64], clean_env)
    assert "## By what the op does" in out and "## By where it is called" in out
    total = table_rows(out, "**total**")
    assert len(total) == 2 and all(number(c) > 0 for row in total for c in row[1:]), total
    assert table_rows(out, "attention kernel")[0][1:] == ["1", "1"]


def test_readout_precision_table_ranks_the_schemes():
    """benchmarks/readout_precision.py (docs/gpu.md's table): at a logit spread of 0.01 the readout's terms
    cancel ~200x; float32-grade products keep ~1e-6, plain TF32 and a bfloat16 state fail (>= 1e-2), and the
    kernels' scheme (the state split into 16-bit high + low parts, q as is, coefficients after the product)
    stays within 1e-3 of float64 in bfloat16 and far within it in float16."""
    sys.path.insert(0, str(REPO))
    from benchmarks.readout_precision import readout_errors

    errors = readout_errors(0.01)
    assert errors["cancellation"] >= 100
    assert errors["tf32x3 (float32-grade products)"] <= 1e-5
    assert errors["TF32, coefficients in q"] >= 1e-2 and errors["bf16 state, coefficients after"] >= 1e-1
    assert 1e-5 <= errors["bf16 high + low state, coefficients after"] <= 1e-3
    assert errors["fp16 high + low of state / max, coefficients after"] <= 1e-4
    assert readout_errors(2.0)["bf16 high + low state, coefficients after"] <= 1e-4  # little cancellation: better
