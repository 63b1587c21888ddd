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
    assert points["zeros"]["params"] > points["softmax"]["params"]  # u projection and gates on top
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
