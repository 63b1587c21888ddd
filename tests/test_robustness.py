"""Nothing lost, nothing hangs: killed data preparations, runs sharing a directory, exports into
occupied directories, racing checkpoint links, bad input of every kind (one ``error:`` line each)
and the torch version floor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from zeros_lm.training import ZeroSCheckpoint

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# last.ckpt link
# ------------------------------------------------------------------------------------------
def _fake_trainer():
    return types.SimpleNamespace(is_global_zero=True, strategy=types.SimpleNamespace(barrier=lambda *a: None))


def test_two_savers_linking_last_in_one_directory_do_not_collide(tmp_path, monkeypatch):
    """Another saver links last.ckpt while this one is between creating its temporary link and
    renaming it into place: both must succeed, and last.ckpt ends at the later target."""
    for name in ("step=1.ckpt", "step=2.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    link = str(tmp_path / "last.ckpt")
    real_symlink = os.symlink
    interleaved = []

    def symlink_then_other_saver(src, dst):
        real_symlink(src, dst)
        if not interleaved:
            interleaved.append(dst)
            ZeroSCheckpoint._link_checkpoint(_fake_trainer(), str(tmp_path / "step=1.ckpt"), link)

    monkeypatch.setattr(os, "symlink", symlink_then_other_saver)
    ZeroSCheckpoint._link_checkpoint(_fake_trainer(), str(tmp_path / "step=2.ckpt"), link)
    assert interleaved
    assert os.readlink(link) == "step=2.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
