"""The evidence report (benchmarks/report.py): its synthetic tasks are what they claim to be, and a
tiny end-to-end run writes a well-formed report.md, results.json and non-empty PNG plots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.tasks import IGNORE, contrast_examples, mqar_examples  # noqa: E402

PLOTS = ("lm_val_loss.png", "extrapolation.png", "mqar.png", "contrast.png")


def test_mqar_examples_are_associative_recall():
    g = torch.Generator().manual_seed(0)
    T, D, V = 64, 4, 64
    inputs, labels = mqar_examples(50, T, D, V, g)
    assert inputs.shape == labels.shape == (50, T)
    for seq, lab in zip(inputs.tolist(), labels.tolist()):
        keys, values = seq[0 : 2 * D : 2], seq[1 : 2 * D : 2]
        assert len(set(keys)) == D and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        pairs = dict(zip(keys, values))
        scored = [t for t, y in enumerate(lab) if y != IGNORE]
        assert len(scored) == D and all(t >= 2 * D for t in scored)
        assert sorted(seq[t] for t in scored) == sorted(keys)  # every key is queried once
        for t in scored:
            assert lab[t] == pairs[seq[t]] == seq[t + 1]  # the label is the value paired with the query key
        others = [x for t, x in enumerate(seq[2 * D :], start=2 * D) if t not in scored and t - 1 not in scored]
        assert set(others) <= {0}


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError):
        mqar_examples(2, 16, 8, 64, torch.Generator())


def test_contrast_target_is_the_difference_of_the_marked_vectors():
    g = torch.Generator().manual_seed(0)
    features, target = contrast_examples(40, 10, 5, g)
    assert features.shape == (40, 10, 8) and target.shape == (40, 5)
    x, flags = features[..., :5], features[..., 5:]
    assert torch.all(flags[:, :, 0].sum(1) == 1) and torch.all(flags[:, :, 1].sum(1) == 1)
    assert torch.all(flags[:, -1, 2] == 1) and torch.all(flags[:, :-1, 2] == 0)
    assert torch.all(flags[:, -1, :2] == 0) and torch.all((flags[:, :, 0] * flags[:, :, 1]) == 0)
    first = (flags[:, :, 0:1] * x).sum(1)
    second = (flags[:, :, 1:2] * x).sum(1)
    torch.testing.assert_close(target, first - second)


def test_bad_arguments_are_one_clear_error(capsys):
    assert report.main(["--smoke", "--sections", "lm,nonsense"]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert report.main(["--smoke", "--sections", "extrapolation"]) == 2
    assert "add 'lm'" in capsys.readouterr().err


def test_smoke_report_end_to_end(tmp_path):
    """The whole pipeline on tiny settings (the --smoke mode: --quick's code paths in seconds)."""
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "report.py"), "--smoke", "--device", "cpu", "--threads", "1",
           "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    md = (out / "report.md").read_text()
    for heading in ("# ZeroS vs softmax vs linear attention", "## Findings", "## 1. Language modelling",
                    "## 2. Length extrapolation", "## 3. MQAR", "## 4. Contrast"):
        assert heading in md
    assert "_Not run._" not in md and "incomplete" not in md and "n/a" not in md
    assert "report.py --smoke" in md and "Versions: python" in md and "wall time" in md
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md

    results = json.loads((out / "results.json").read_text())
    assert results["sections_done"] == list(report.SECTIONS)
    assert results["environment"]["device"] == "cpu" and results["wall_s"] > 0
    lm = results["lm"]
    assert set(lm) == set(report.MAIN_TYPES) | set(report.ABLATIONS)
    for r in lm.values():
        assert math.isfinite(r["final_val_loss"]) and r["tokens_per_s"] > 0 and len(r["curve"]) >= 2
        assert f"{r['final_val_ppl']:.2f}" in md  # the table shows the run's numbers
    extrap = results["extrapolation"]
    assert set(extrap["models"]) == set(report.MAIN_TYPES)
    assert all(len(m["per_position"]) == extrap["eval_length"] for m in extrap["models"].values())
    preset = report.PRESETS["smoke"]
    assert len(results["mqar"]["cells"]) == len(preset.mqar_lengths) * len(preset.mqar_widths) * 3
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in results["mqar"]["cells"])
    assert len(results["contrast"]["models"]) == len(report.CONTRAST_MODELS)
    assert all(math.isfinite(m["final_relative_error"]) for m in results["contrast"]["models"].values())


def test_full_modes_keep_the_issue_settings():
    """Both full presets (CPU-sized and GPU-sized) train every LM model on at least 10M tokens and
    cover MQAR lengths 64-512; the quick and smoke modes stay in float32 on a CPU."""
    for name in ("full", "full-gpu"):
        p = report.PRESETS[name]
        assert p.lm_steps * p.lm_batch * p.lm_seq >= 10_000_000
        assert min(p.mqar_lengths) == 64 and max(p.mqar_lengths) == 512
    assert report.default_precision("cuda", "full-gpu") == "bf16-mixed"
    assert report.default_precision("cpu", "quick") == report.default_precision("cpu", "smoke") == "32-true"


@pytest.mark.parametrize(
    "mkldnn, probe, expected",
    [
        (True, lambda: True, "bf16-mixed"),  # native bf16 matmuls: the full mode trains in bf16-mixed
        (True, lambda: False, "32-true"),
        (True, None, "32-true"),  # a build without the (private) probe
        (False, lambda: True, "32-true"),  # no oneDNN at all
    ],
    ids=["native-bf16", "no-native-bf16", "no-probe", "no-mkldnn"],
)
def test_cpu_precision_follows_the_bf16_probe(monkeypatch, mkldnn, probe, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe, raising=False)
    assert report.default_precision("cpu", "full") == expected
    for mode in ("quick", "smoke"):  # the short modes stay in float32 whatever the CPU
        assert report.default_precision("cpu", mode) == "32-true"
    assert report.default_precision("cuda", "quick") == "bf16-mixed"
