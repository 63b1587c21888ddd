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

REPO = Path(__file__).resolve().parents[1]  # on sys.path through pytest's pythonpath (pyproject.toml)

from benchmarks import report  # noqa: E402
from benchmarks.evidence import presets  # noqa: E402
from benchmarks.evidence.harness import RowSkipped, build_row, row_overrides  # noqa: E402
from benchmarks.evidence.presets import ModelRow  # noqa: E402
from benchmarks.tasks import IGNORE, contrast_examples, mqar_default_pairs, mqar_examples, recall_accuracy  # noqa: E402

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


class _LookupModel:
    """A perfect MQAR solver: at every position it predicts the value paired with the current token
    among the key-value pairs opening the sequence (``shift`` moves its answer that many positions later)."""

    def __init__(self, num_pairs: int, vocab: int, shift: int = 0):
        self.num_pairs, self.vocab, self.shift = num_pairs, vocab, shift

    def eval(self):
        return self

    def __call__(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, seq in enumerate(input_ids.tolist()):
            pairs = dict(zip(seq[0 : 2 * self.num_pairs : 2], seq[1 : 2 * self.num_pairs : 2]))
            for t in range(input_ids.shape[1] - self.shift):
                if seq[t] in pairs:
                    logits[b, t + self.shift, pairs[seq[t]]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_a_perfect_lookup_scores_one_and_a_shifted_one_scores_zero():
    """The label sits at the query key's position (the model predicts the next token, the value):
    a perfect lookup scores 1.0 through recall_accuracy, the same lookup one position late 0."""
    T, V = 64, 64
    D = mqar_default_pairs(T)
    inputs, labels = mqar_examples(20, T, D, V, torch.Generator().manual_seed(3))
    assert recall_accuracy(_LookupModel(D, V), inputs, labels, batch_size=8, device="cpu") == 1.0
    assert recall_accuracy(_LookupModel(D, V, shift=1), inputs, labels, batch_size=8, device="cpu") == 0.0


def test_recall_loss_scores_the_labelled_positions_without_a_shift():
    """RecallLitModule's loss (LM head on the scored positions only) is the next-token cross-entropy
    of the full logits at the labelled positions, with no extra shift."""
    from benchmarks.tasks import RecallLitModule

    torch.manual_seed(0)
    module = RecallLitModule(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    batch = mqar_examples(4, 32, 2, 64, torch.Generator().manual_seed(5))
    logits = module.model(input_ids=batch[0], use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch[1].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(module._loss(batch), expected)


def test_mqar_query_gaps_follow_a_power_law():
    """Queries favour short gaps: the first query slot is used far more often than a late one."""
    T, V = 256, 512
    D = mqar_default_pairs(T)
    _, labels = mqar_examples(400, T, D, V, torch.Generator().manual_seed(4))
    slots = ((labels != IGNORE).nonzero()[:, 1] - 2 * D) // 2
    counts = torch.bincount(slots, minlength=(T - 2 * D) // 2)
    assert counts[0] > 3 * counts[-20:].float().mean()


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
    assert results["environment"]["device"] == "cpu" and "wall_s" in results  # recorded, not judged
    lm = results["lm"]
    rows = {r.key for r in report.MODEL_ROWS if "lm" in r.sections}
    assert set(lm) == (rows - set(results["lm_skipped"])) | set(report.ABLATIONS)
    assert set(report.MAIN_TYPES) <= set(lm)  # the smoke model has one layer: the hybrid rows are skipped
    assert {"hybrid", "hybrid_conv"} <= set(results["lm_skipped"]) and "Not run: hybrid (1 softmax layer in 4)" in md
    for r in lm.values():
        assert math.isfinite(r["final_val_loss"]) and r["tokens_per_s"] > 0 and len(r["curve"]) >= 2
        assert f"{r['final_val_ppl']:.2f}" in md  # the table shows the run's numbers
    extrap = results["extrapolation"]
    assert set(extrap["models"]) == rows - set(results["lm_skipped"])
    assert all(len(m["per_position"]) == extrap["eval_length"] for m in extrap["models"].values())
    preset = report.PRESETS["smoke"]
    mq_rows = {r.key for r in report.MODEL_ROWS if "mqar" in r.sections} - set(results["mqar"]["skipped"])
    assert "rounds to no layer" in results["mqar"]["skipped"]["softmax_half"]  # half of the smoke model's one layer
    assert len(results["mqar"]["cells"]) == len(preset.mqar_lengths) * len(preset.mqar_widths) * len(mq_rows)
    assert all(len(m["sweep"]) == len(preset.mqar_lrs) for m in results["mqar"]["models"].values())
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


def _tiny_builder(**fixed):
    from zeros_lm.training import ZeroSLitModule

    def build(**kwargs):
        return ZeroSLitModule(vocab_size=64, hidden_size=32, num_attention_heads=2,
                              **{"num_hidden_layers": 4, **fixed, **kwargs})  # a row may set its own depth
    return build


def test_model_rows_expand_hybrids_and_skip_unsupported_fields():
    every4 = ModelRow("h", "hybrid", "zeros", {"softmax_every": 4})
    assert row_overrides(every4, 8)["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + \
        ["linear_attention"] * 3 + ["full_attention"]
    with pytest.raises(RowSkipped, match="at least 4 layers"):
        row_overrides(every4, 2)
    half = ModelRow("s2", "softmax, half", "softmax", {"layers_fraction": 0.5})
    assert row_overrides(half, 4) == {"num_hidden_layers": 2}
    assert row_overrides(ModelRow("h2", "hybrid, half", "zeros", {"layers_fraction": 0.5, "softmax_every": 2}), 4) == \
        {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}  # the row's own depth
    with pytest.raises(RowSkipped, match="rounds to no layer"):
        row_overrides(half, 1)
    with pytest.raises(RowSkipped, match="`no_such_field`"):
        build_row(ModelRow("x", "X", "zeros", {"no_such_field": 4}), 4, _tiny_builder())
    with pytest.raises(RowSkipped, match="refused"):  # a field the model takes, with a value it refuses
        build_row(ModelRow("x", "X", "zeros", {"logit_type": "nonsense"}), 4, _tiny_builder())


def test_parameter_counts_are_matched_through_the_mlp_width():
    build = _tiny_builder()
    plain, _ = build_row(ModelRow("s", "softmax", "softmax"), 4, build)
    n = plain.num_parameters()
    for reference in (int(1.3 * n), int(0.8 * n)):  # far off either way: the MLP width moves to match
        module, overrides = build_row(ModelRow("s", "softmax", "softmax"), 4, build, reference)
        assert abs(module.num_parameters() - reference) <= presets.PARAM_TOLERANCE * reference
        assert overrides["intermediate_size"] == module.model.config.intermediate_size != plain.model.config.intermediate_size
    close, overrides = build_row(ModelRow("s", "softmax", "softmax"), 4, build, int(1.01 * n))
    assert "intermediate_size" not in overrides and close.num_parameters() == n  # within 5%: left alone
    # a row of half the depth keeps the reference's parameter count through a wider MLP
    half, overrides = build_row(ModelRow("s2", "softmax, half", "softmax", {"layers_fraction": 0.5}), 4, build, n)
    assert half.model.config.num_hidden_layers == 2 and overrides["num_hidden_layers"] == 2
    assert abs(half.num_parameters() - n) <= presets.PARAM_TOLERANCE * n
    assert half.model.config.intermediate_size > plain.model.config.intermediate_size


def test_rows_train_only_in_their_sections():
    """A row trains in the sections it names (ModelRow.sections); asking for it by name in another
    section notes why it is not there."""
    from types import SimpleNamespace

    from benchmarks.evidence.experiments import selected_rows

    keys = {r.key for r in presets.MODEL_ROWS}
    skipped: dict = {}
    lm_rows = {r.key for r in selected_rows(SimpleNamespace(models=None), "lm", skipped)}
    assert lm_rows == keys - {"softmax_half"} and not skipped
    assert {r.key for r in selected_rows(SimpleNamespace(models=None), "mqar", skipped)} == keys
    picked = selected_rows(SimpleNamespace(models=("softmax", "softmax_half")), "lm", skipped)
    assert [r.key for r in picked] == ["softmax"] and "not a row of the lm section" in skipped["softmax_half"]


def _smoke(tmp_path, *args):
    return report.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "out"),
                        "--cache-dir", str(tmp_path / "cache"), *args])


def test_sections_run_separately_add_up_to_one_report(tmp_path, monkeypatch):
    """lm in one invocation, extrapolation and mqar in the next (the lm models are reloaded from
    out/models); the first invocation's results survive, the rows are the data of MODEL_ROWS (a new
    row reaches the tables, a row the model cannot build is skipped with a note), and another
    mode's invocation into the same folder is refused without touching it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = (ModelRow("zeros", "ZeroS", "zeros"), ModelRow("softmax", "softmax", "softmax"),
            ModelRow("plain_out", "ZeroS without output norm", "zeros", {"use_output_norm": False}),
            ModelRow("future", "ZeroS + future field", "zeros", {"no_such_field": 4}))
    monkeypatch.setattr(presets, "MODEL_ROWS", rows)
    out = tmp_path / "out"
    assert _smoke(tmp_path, "--sections", "lm", "--models", "zeros,softmax,future") == 0
    first = json.loads((out / "results.json").read_text())
    assert set(first["lm"]) == {"zeros", "softmax"} and "no_such_field" in first["lm_skipped"]["future"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["softmax", "zeros"]

    assert _smoke(tmp_path, "--sections", "extrapolation,mqar", "--mqar-lrs", "3e-3", "--models", "zeros,future") == 0
    second = json.loads((out / "results.json").read_text())
    assert {c["model"] for c in second["mqar"]["cells"]} == {"zeros"}
    assert second["mqar"]["skipped"]["softmax"].startswith("not selected")
    # the MQAR section in two pieces: the second keeps the first's rows (same settings)
    assert _smoke(tmp_path, "--sections", "mqar", "--mqar-lrs", "3e-3", "--models", "softmax,plain_out") == 0
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    assert results["lm"] == first["lm"]  # kept from the first invocation
    assert results["extrapolation"] == second["extrapolation"]
    assert results["sections_done"] == ["lm", "extrapolation", "mqar"]
    assert set(results["extrapolation"]["models"]) == {"zeros", "softmax"}  # reloaded from out/models
    assert {c["model"] for c in results["mqar"]["cells"]} == {"zeros", "softmax", "plain_out"}
    assert [c for c in results["mqar"]["cells"] if c["model"] == "zeros"] == second["mqar"]["cells"]
    assert set(results["mqar"]["skipped"]) == {"future"}
    assert "| ZeroS without output norm |" in md.replace(" | ", " |\n| ")  # the new row is an MQAR column
    assert "ZeroS + future field (the model does not accept `no_such_field`" in md
    assert f"{first['lm']['zeros']['final_val_ppl']:.2f}" in md  # the first invocation's numbers are in the report
    commands = {r["command"] for r in results["section_runs"].values()}
    assert len(commands) == 3 and all(f"`{c}`" in md for c in commands)

    before = (out / "results.json").read_bytes()
    assert report.main(["--quick", "--sections", "mqar", "--out", str(out)]) == 2
    assert (out / "results.json").read_bytes() == before


def test_extrapolation_alone_needs_saved_models(tmp_path, capsys):
    assert _smoke(tmp_path, "--sections", "extrapolation") == 2
    assert "holds none: add 'lm'" in capsys.readouterr().err
    assert _smoke(tmp_path, "--sections", "mqar", "--models", "zeros,nonsense") == 2
    assert "unknown model" in capsys.readouterr().err
    assert _smoke(tmp_path, "--sections", "mqar", "--mqar-lrs", "0.01,-1") == 2
    assert "--mqar-lrs" in capsys.readouterr().err


def test_target_verdicts_met_not_met_and_open():
    """The issue's target per O(1)-state-dominant row: met only when perplexity and MQAR are both measured
    and within bounds; a measured miss is "not met"; a row with a part unmeasured is open, not failed."""
    from types import SimpleNamespace

    from benchmarks.evidence.markdown import target_findings

    def lm_row(ppl, share=0.0):
        return {"final_val_ppl": ppl, "softmax_share": share}

    def cells(key, accuracy):
        return [{"model": key, "attention_type": "zeros", "width": 64, "seq_len": 64, "accuracy": accuracy}]

    results = {
        "lm": {"softmax": lm_row(20.0, 1.0), "zeros": lm_row(30.0), "zeros_conv": lm_row(20.5),
               "hybrid_conv": lm_row(20.9, 0.25)},
        "mqar": {"cells": cells("softmax", 0.99) + cells("zeros", 0.97) + cells("zeros_conv", 0.96), "models": {}},
    }
    lines = target_findings(SimpleNamespace(results=results))
    verdict = {line.split(":")[0]: line for line in lines}
    assert "**not met**" in verdict["Target (100% ZeroS layers) ZeroS"]               # perplexity 50% off
    assert "met: perplexity 20.50" in verdict["Target (100% ZeroS layers) ZeroS + short conv"]
    assert "**not met**" not in verdict["Target (75% ZeroS layers) hybrid + short conv"]
    assert "open (not all of it measured)" in verdict["Target (75% ZeroS layers) hybrid + short conv"]
    assert "MQAR not measured" in verdict["Target (75% ZeroS layers) hybrid + short conv"]
    # a grid where softmax did not learn the task judges nothing (the issue's condition: >= 0.95 everywhere)
    results["mqar"]["cells"] = cells("softmax", 0.30) + cells("hybrid_conv", 0.98)
    results["lm"]["hybrid_conv"] = lm_row(20.5, 0.25)
    line = next(x for x in target_findings(SimpleNamespace(results=results)) if "hybrid + short conv" in x)
    assert line.startswith("Target (75% ZeroS layers) hybrid + short conv: open") and "MQAR not judged" in line
    # ... unless another softmax row of the same parameters learned it (half the layers): it is the baseline
    results["mqar"]["cells"] += cells("softmax_half", 0.97)
    line = next(x for x in target_findings(SimpleNamespace(results=results)) if "hybrid + short conv" in x)
    assert line.startswith("Target (75% ZeroS layers) hybrid + short conv: met")
    assert "0.980 vs softmax, half the layers 0.970 (within 0.05)" in line
    results["mqar"]["cells"][-1]["accuracy"] = 0.90  # it did not learn it either: nothing judged
    line = next(x for x in target_findings(SimpleNamespace(results=results)) if "hybrid + short conv" in x)
    assert "MQAR not judged" in line and "softmax, half the layers reaches only 0.900" in line


def test_mqar_findings_compare_against_the_softmax_row_that_learned_the_task():
    """Where softmax at the grid's depth stays below the floor but softmax in half the layers (same
    parameters) learns the task, the findings say so and compare ZeroS against the latter; the text
    names the half-depth row's layers and MLP width."""
    from types import SimpleNamespace

    from benchmarks.evidence.markdown import md_mqar

    def cells(key, accuracies):
        return [{"model": key, "attention_type": "zeros", "width": 64, "seq_len": T, "pairs": T // 16, "accuracy": a}
                for T, a in zip((64, 128), accuracies)]

    def model(**overrides):
        return {"parameters": 2.6e5, "lr": 3e-3, "sweep": [{"lr": 3e-3, "mean": 0.5}], "overrides": overrides}

    mq = {"layers": 4, "heads": 2, "vocab": 512, "steps": 100, "lrs": [3e-3], "lengths": [64, 128], "widths": [64],
          "cells": cells("zeros", (0.90, 0.80)) + cells("softmax", (0.40, 0.20)) + cells("softmax_half", (0.99, 0.97)),
          "models": {"softmax/64": model(), "softmax_half/64": model(num_hidden_layers=2, intermediate_size=516)}}
    findings: list = []
    md = "\n".join(md_mqar(SimpleNamespace(results={"mqar": mq}, preset=report.PRESETS["full"], sections=("mqar",)),
                           findings))
    assert "softmax, half the layers (width 64) has 2 layers, its MLP 516 wide to match" in md
    mq["models"]["softmax_half/64"] = model(num_hidden_layers=2)  # already within 5%: no width to name
    md = "\n".join(md_mqar(SimpleNamespace(results={"mqar": mq}, preset=report.PRESETS["full"], sections=("mqar",)), []))
    assert "softmax, half the layers (width 64) has 2 layers and the default MLP." in md
    text = "\n".join(findings)
    assert "**softmax (lowest 0.20) stays below 0.95 in part of the grid**, where softmax, half the layers" in text
    assert "undertraining" not in text
    assert "**ZeroS is below softmax, half the layers** (by more than 0.05) at width 64, length 64 (0.90 vs 0.99)" in text
    findings.clear()  # neither learned it: both named, and the gaps called partly undertraining
    mq["cells"][-1]["accuracy"] = 0.90
    md_mqar(SimpleNamespace(results={"mqar": mq}, preset=report.PRESETS["full"], sections=("mqar",)), findings)
    assert ("**softmax (lowest 0.20) and softmax, half the layers (lowest 0.90) stay below 0.95 in part of the grid**: "
            "the training budget does not solve the task") in "\n".join(findings)


def test_rows_from_several_invocations_name_their_commands():
    """LM rows trained by invocations of their own (--models, or another --out merged in): each command is
    listed at the top under the section it fed, the threads column shows what each row ran with, and the
    speed column says it compares only within one invocation."""
    from types import SimpleNamespace

    from benchmarks.evidence.markdown import md_lm, section_commands

    def lm_row(command, threads=None, ppl=30.0):
        row = {"parameters": 1e6, "train_tokens": 1e6, "final_val_loss": 3.4, "final_val_ppl": ppl,
               "tokens_per_s": 1000.0, "wall_s": 10.0, "document_resets": True, "command": command, "git_commit": "abc"}
        return row if threads is None else {**row, "threads": threads}

    results = {"lm": {"zeros": lm_row("report.py --models zeros", 2), "softmax": lm_row("report.py --models softmax", 1),
                      "zeros, no gates": lm_row("report.py --sections ablations")},
               "lm_data": {"sources": ["x"], "documents": 1, "tokens": 10, "vocab_size": 8, "train_blocks": 1, "val_blocks": 1}}
    run = SimpleNamespace(results=results, preset=presets.PRESETS["smoke"], device="cpu", precision="32-true")
    commands = "\n".join(section_commands(run))
    assert "`report.py --models zeros` (sections lm (some of its models)" in commands
    assert "`report.py --models softmax` (sections lm (some of its models)" in commands
    assert "`report.py --sections ablations` (sections ablations (some of its models)" in commands
    md = "\n".join(md_lm(run, []))
    assert "| torch threads |" in md and "| 1,000 | 2 |" in md and "| 1,000 | 1 |" in md
    assert "compare only within one invocation" in md
    results["lm"] = {k: {**r, "command": "report.py"} for k, r in results["lm"].items()}
    assert "compare only within one invocation" not in "\n".join(md_lm(run, []))


def smoke_piece(tmp_path, folder: str, *args: str) -> int:
    """One smoke-mode invocation of the report into ``tmp_path/folder`` (a data cache shared by the pieces)."""
    return report.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / folder),
                        "--cache-dir", str(tmp_path / "cache"), *args])


@pytest.fixture
def two_rows(monkeypatch):
    """The report's model rows cut to ZeroS and softmax, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(presets, "MODEL_ROWS", (ModelRow("zeros", "ZeroS", "zeros"), ModelRow("softmax", "softmax", "softmax")))


def test_pieces_in_separate_folders_merge_into_one_report(tmp_path, two_rows, capsys):
    """Two invocations side by side, each into its own folder; --merge adds the second's lm rows (with their saved
    models) and mqar rows to the first's, each keeping its command. A folder without results, or MQAR rows
    trained at other settings (or another seed), is one clear error and leaves the target folder as it was."""

    def piece(folder, *args):
        return smoke_piece(tmp_path, folder, "--mqar-lrs", "3e-3", *args)

    assert piece("a", "--sections", "lm,mqar", "--models", "zeros") == 0
    assert piece("b", "--sections", "lm,mqar", "--models", "softmax") == 0
    assert piece("c", "--sections", "mqar", "--models", "softmax", "--set", "mqar_steps=3") == 0
    a, b = tmp_path / "a", tmp_path / "b"
    before = (a / "results.json").read_bytes()
    assert piece("a", "--sections", "", "--merge", str(tmp_path / "c")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps 3 vs" in err
    # another seed draws other training data and other held-out sets: not the same table either
    assert piece("e", "--sections", "mqar", "--models", "softmax", "--seed", "7") == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["mqar"]["seed"] == 7
    assert "One seed per model (`--seed 7`" in (tmp_path / "e" / "report.md").read_text()
    assert "One seed per model." in (b / "report.md").read_text()
    assert piece("a", "--sections", "", "--merge", str(tmp_path / "e")) == 2
    assert "seed 7 vs 1234" in capsys.readouterr().err
    assert piece("a", "--sections", "", "--merge", str(b), "--merge", str(tmp_path / "nothing")) == 2
    assert "holds no results.json" in capsys.readouterr().err
    assert (a / "results.json").read_bytes() == before and sorted(p.name for p in (a / "models").iterdir()) == ["zeros"]

    assert piece("a", "--sections", "", "--merge", str(b)) == 0
    results, theirs = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert set(results["lm"]) == {"zeros", "softmax"} and results["lm"]["softmax"] == theirs["lm"]["softmax"]
    assert sorted(p.name for p in (a / "models").iterdir()) == ["softmax", "zeros"]
    assert {c["model"] for c in results["mqar"]["cells"]} == {"zeros", "softmax"} and not results["mqar"]["skipped"]
    md = (a / "report.md").read_text()
    assert f"`{theirs['lm']['softmax']['command']}` (sections lm (some of its models), mqar (some of its models)" in md
    # into a folder with no rows of its own: the sections' records (settings, command) come with the rows
    assert piece("d", "--sections", "", "--merge", str(b)) == 0
    fresh = json.loads((tmp_path / "d" / "results.json").read_text())
    assert fresh["section_runs"]["mqar"] == theirs["section_runs"]["mqar"] and set(fresh["sections_done"]) == {"lm", "mqar"}
    assert fresh["mqar"]["models"] == theirs["mqar"]["models"] and fresh["lm"] == theirs["lm"]


def test_mqar_accuracy_curve_is_recorded_and_changes_nothing(tmp_path, monkeypatch):
    """--set mqar_curve_every=N scores the held-out sets every N steps and at the end: the last point is
    the row's final accuracy, the trained rows equal a run without the curve, and the report shows it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--smoke", "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
              "--sections", "mqar", "--models", "zeros", "--mqar-lrs", "3e-3"]
    assert report.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert report.main([*common, "--out", str(tmp_path / "curve"), "--set", "mqar_curve_every=4"]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())["mqar"]
    mq = json.loads((tmp_path / "curve" / "results.json").read_text())["mqar"]
    assert mq["cells"] == plain["cells"]  # scoring on the way does not change the run
    (sweep,) = mq["models"]["zeros/32"]["sweep"]
    preset = report.PRESETS["smoke"]
    assert [p["step"] for p in sweep["curve"]] == [4, preset.mqar_steps]
    final = {c["seq_len"]: c["accuracy"] for c in mq["cells"]}
    assert sweep["curve"][-1]["accuracy"] == [round(final[T], 4) for T in preset.mqar_lengths]
    assert "curve" not in plain["models"]["zeros/32"]["sweep"][0]
    md = (tmp_path / "curve" / "report.md").read_text()
    assert "Accuracy during training" in md and "| ZeroS | 32 | 0.003 | 4 |" in md
    assert "Accuracy during training" not in (tmp_path / "plain" / "report.md").read_text()


def test_mqar_zero_init_residual_reaches_every_model_and_is_recorded(tmp_path, monkeypatch):
    """The MQAR section builds every model with the mode's mqar_zero_init_residual (default off) and
    records it; --set mqar_zero_init_residual=true turns it on and the report says it changed the
    mode's setting. Results written before the setting existed read as trained without it."""
    import benchmarks.tasks as tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = []
    make = tasks.make_task_module

    def recording(kind, **kwargs):
        seen.append(kwargs["zero_init_residual"])
        return make(kind, **kwargs)

    monkeypatch.setattr(tasks, "make_task_module", recording)
    common = ["--smoke", "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
              "--sections", "mqar", "--models", "zeros,softmax", "--mqar-lrs", "3e-3"]
    assert report.main([*common, "--out", str(tmp_path / "off")]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert report.main([*common, "--out", str(tmp_path / "on"), "--set", "mqar_zero_init_residual=true"]) == 0
    assert seen and all(seen)
    on, off = ({json.loads((tmp_path / d / "results.json").read_text())["mqar"]["zero_init_residual"]} for d in ("on", "off"))
    assert (on, off) == ({True}, {False})
    md_on, md_off = ((tmp_path / d / "report.md").read_text() for d in ("on", "off"))
    assert "initialised to zero" in md_on and "mqar_zero_init_residual=True" in md_on
    assert "the default init" in md_off and "mqar_zero_init_residual=" not in md_off
    assert report.mqar_setting({"layers": 2}, "zero_init_residual") is False


def test_mqar_report_says_when_the_grid_is_one_length(tmp_path, monkeypatch):
    """A grid of several lengths is a mixture; a grid of one length (--set mqar_lengths=32) is reported as
    a smaller grid, not as a mixture."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--smoke", "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
              "--sections", "mqar", "--models", "zeros", "--mqar-lrs", "3e-3"]
    assert report.main([*common, "--out", str(tmp_path / "two")]) == 0
    assert report.main([*common, "--out", str(tmp_path / "one"), "--set", "mqar_lengths=32"]) == 0
    two, one = ((tmp_path / d / "report.md").read_text() for d in ("two", "one"))
    assert "on a mixture of the lengths 32, 64" in two and "smaller grid" not in two
    assert "on the length 32 alone (**one length: a smaller grid**" in one and "mixture of the lengths" not in one


def test_merged_ablations_bring_their_section_record(tmp_path, monkeypatch):
    """Ablations run again into a folder of their own and merged replace every ablation row here: the
    section's record (command, commit, settings) and its seconds are then theirs, not the earlier run's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(presets, "MODEL_ROWS", (ModelRow("zeros", "ZeroS", "zeros"),))

    def piece(folder, *args):
        return smoke_piece(tmp_path, folder, *args)

    assert piece("a", "--sections", "lm,ablations") == 0
    assert piece("b", "--sections", "ablations", "--seed", "7") == 0
    # a marker in the other folder's per-section record, to see that the merge copies it (not a timing check)
    other = tmp_path / "b" / "results.json"
    marked = json.loads(other.read_text())
    marked["section_seconds"]["ablations"] = MARKER = -1.0
    other.write_text(json.dumps(marked))
    assert piece("a", "--sections", "", "--merge", str(tmp_path / "b")) == 0
    results, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert results["section_runs"]["ablations"] == theirs["section_runs"]["ablations"]
    assert results["section_seconds"]["ablations"] == MARKER
    assert results["section_runs"]["lm"]["command"] != theirs["section_runs"]["ablations"]["command"]
    assert all(results["lm"][k] == theirs["lm"][k] for k in report.ABLATIONS)
    assert f"`{theirs['section_runs']['ablations']['command']}` (sections ablations" in (tmp_path / "a" / "report.md").read_text()


def test_a_merged_section_brings_its_record_where_its_rows_replace_all_of_the_section(tmp_path):
    """One rule for lm, mqar and ablations: the section's record (its command) comes with the
    merged rows when they make up all of the section here, and stays this folder's when rows of the
    section here are not among them."""
    lm_data = {"sources": ["x"]}

    def results(lm_rows, command):
        return {"preset": {"name": "full"}, "lm_data": lm_data, "sections_done": ["lm"],
                "lm": {k: {"final_val_ppl": 30.0} for k in lm_rows},
                "section_runs": {"lm": {"command": command}}}

    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(results(["zeros", "softmax"], "theirs")))
    mine = results(["zeros"], "here")  # every lm row here is among theirs: their record describes the section
    report.merge_rows(mine, other, "full")
    assert mine["section_runs"]["lm"]["command"] == "theirs"
    assert set(mine["lm"]) == {"zeros", "softmax"}
    mine = results(["zeros", "linear"], "here")  # "linear" stays from here: so does the record
    report.merge_rows(mine, other, "full")
    assert mine["section_runs"]["lm"]["command"] == "here"
    assert set(mine["lm"]) == {"zeros", "softmax", "linear"}


def test_mqar_pieces_at_other_learning_rates_join_into_one_sweep(tmp_path, two_rows, capsys):
    """A row trained at another learning rate in a folder of its own and merged joins the row's sweep:
    both learning rates are listed (each with its command), the cells are the best one's, and the text says
    that not every row was swept alike. The same learning rate twice, or another setting, is refused."""

    def piece(folder, *args):
        return smoke_piece(tmp_path, folder, "--sections", "mqar", *args)

    assert piece("x", "--models", "zeros,softmax", "--mqar-lrs", "3e-3") == 0
    assert piece("y", "--models", "zeros", "--mqar-lrs", "2e-2") == 0
    x, y = (json.loads((tmp_path / d / "results.json").read_text())["mqar"] for d in ("x", "y"))
    assert piece("x", "--sections", "", "--merge", str(tmp_path / "y")) == 0
    merged = json.loads((tmp_path / "x" / "results.json").read_text())["mqar"]
    assert merged["lrs"] == [3e-3, 2e-2]
    (key,) = [k for k in merged["models"] if k.startswith("zeros/")]
    sweep = merged["models"][key]["sweep"]
    assert [s["lr"] for s in sweep] == [3e-3, 2e-2]
    assert [s["command"] for s in sweep] == [x["models"][key]["command"], y["models"][key]["command"]]
    best = max((x, y), key=lambda mq: mq["models"][key]["sweep"][0]["mean"])
    assert merged["models"][key]["lr"] == best["models"][key]["lr"]
    assert [c for c in merged["cells"] if c["model"] == "zeros"] == [c for c in best["cells"] if c["model"] == "zeros"]
    assert [c for c in merged["cells"] if c["model"] == "softmax"] == [c for c in x["cells"] if c["model"] == "softmax"]
    md = (tmp_path / "x" / "report.md").read_text()
    assert "learning rates swept over 0.003, 0.02 (not every model at each" in md
    assert f"`{y['models'][key]['command']}`" in md and f"`{x['models'][key]['command']}`" in md

    before = (tmp_path / "x" / "results.json").read_bytes()
    assert piece("x", "--sections", "", "--merge", str(tmp_path / "y")) == 2
    assert "at learning rate 0.02 is here and there" in capsys.readouterr().err
    assert piece("z", "--models", "zeros", "--mqar-lrs", "1e-2", "--set", "mqar_steps=3") == 0
    assert piece("x", "--sections", "", "--merge", str(tmp_path / "z")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps 3 vs" in err and "lrs" not in err
    assert (tmp_path / "x" / "results.json").read_bytes() == before
