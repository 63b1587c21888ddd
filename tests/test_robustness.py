"""Nothing lost, nothing hangs: killed data preparations, runs sharing a directory, exports into
occupied directories, racing checkpoint links, bad input of every kind (one ``error:`` line each)
and the torch version floor."""

from __future__ import annotations

import os
import re
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


# ------------------------------------------------------------------------------------------
# The torch floor: one number in pyproject.toml, the package and the Docker base image
# ------------------------------------------------------------------------------------------
def _pyproject_torch_floor() -> str:
    import re

    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch\s*>=\s*([\d.]+)", torch_dep.strip())
    assert match, f"pyproject's torch requirement should be a plain floor, got {torch_dep!r}"
    return match.group(1)


def test_pyproject_floor_and_docker_base_image_agree_with_the_package_check():
    import re

    from zeros_lm._torch_floor import TORCH_MIN_VERSION, _release

    assert _pyproject_torch_floor() == TORCH_MIN_VERSION
    assert _release(TORCH_MIN_VERSION) >= (2, 6)  # what transformers 5.x needs
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-", dockerfile, re.M)
    assert base, "the Dockerfile's base image should be an official pytorch/pytorch tag"
    assert _release(base.group(1)) >= _release(TORCH_MIN_VERSION)
    assert "python -m zeros_lm.selfcheck" in dockerfile  # the build step proves the image works


@pytest.mark.parametrize("version", ["2.5.1", "2.5.1+cu124", "2.4.0", "1.13.1"])
def test_an_older_torch_is_refused_with_a_clear_message(version):
    from zeros_lm._torch_floor import check_torch_version

    with pytest.raises(ImportError, match=rf"torch >= 2\.6 .*found torch {re.escape(version)}"):
        check_torch_version(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+ecf3bae40a", "2.13.0+cpu", "3.0"])
def test_torch_at_or_above_the_floor_is_accepted(version):
    from zeros_lm._torch_floor import check_torch_version

    check_torch_version(version)


def test_importing_the_package_under_an_old_torch_says_what_is_wrong(clean_env):
    code = "import torch; torch.__version__ = '2.5.1'; import zeros_lm"
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: zeros-lm needs torch >= 2.6 (transformers 5 disables PyTorch below it), found torch 2.5.1; "
        "upgrade it, e.g. pip install 'torch>=2.6'"
    )


def test_selfcheck_runs_every_attention_type_forward(clean_env):
    proc = subprocess.run(
        [sys.executable, "-m", "zeros_lm.selfcheck"], env=clean_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for attention_type in ("zeros", "softmax", "linear"):
        assert f"{attention_type}: forward pass (2, 24) -> (2, 24, 300), finite" in proc.stdout
