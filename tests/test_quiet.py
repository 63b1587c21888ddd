"""The training command silences exactly the noise of every run (Lightning's litlogger tip, its note
about our model summary, the pytree FutureWarning, the model summary's empty FLOPs column); other
log lines and warnings stay."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from zeros_lm.callbacks import ModelSummaryWithoutFlops
from zeros_lm.cli import train


def test_only_the_known_noise_is_silenced(caplog):
    train.quiet_known_noise()
    with caplog.at_level(logging.INFO):
        rank_zero_info(train.LITLOGGER_TIP + " and experiment tracking, try installing [litlogger](...)")
        rank_zero_info(train.OUR_SUMMARY_NOTE + ". Skipping setting a default `ModelSummary` callback.")
        rank_zero_info("Trainer already configured with model summary callbacks: [<class 'MySummary'>].")
        rank_zero_info("Data: loaded 10 training blocks")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["Trainer already configured with model summary callbacks: [<class 'MySummary'>].",
                     "Data: loaded 10 training blocks"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        train.quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("`treespec.children_specs` is deprecated.", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated (but not a FutureWarning)", UserWarning)
    assert [str(w.message)[:24] for w in caught] == ["`treespec.children_specs", "`isinstance(treespec, Le"]


def test_model_summary_drops_only_an_empty_flops_column(monkeypatch):
    printed = []
    monkeypatch.setattr("lightning.pytorch.callbacks.model_summary.log.info", printed.append)
    modes = {"train": 1, "eval": 0}
    empty = [("Name", ["model"]), ("Params", ["1 K"]), ("FLOPs", ["0  "])]
    ModelSummaryWithoutFlops.summarize(empty, 1000, 1000, 0.004, modes, total_flops=0)
    counted = [("Name", ["model"]), ("Params", ["1 K"]), ("FLOPs", ["2 M"])]
    ModelSummaryWithoutFlops.summarize(counted, 1000, 1000, 0.004, modes, total_flops=2_000_000)
    header_empty, header_counted = (p.strip().splitlines()[0] for p in printed)
    assert "Params" in header_empty and "FLOPs" not in header_empty
    assert "FLOPs" in header_counted
