"""What ``--overwrite`` and ``--ckpt_path`` may touch: an export replaces only an earlier export
(never a run's directory or a folder of other files), a run continues another run's checkpoint only
in a directory of its own, and what killed saves leave half-written is removed at the next start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from zeros_lm.atomic import TMP_MARK, remove_stale_temporaries, temporary_sibling
from zeros_lm.cli import train  # what train.py and zeros-lm train run

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict:
    """Every file under ``root`` (links as their target) and its content: to show nothing changed."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("Seed set to")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def a_run_directory(root: Path) -> Path:
    """What a training run leaves in its directory: the run lock, checkpoints, logs and an export."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step=0000004.ckpt").write_bytes(b"the run's checkpoint")
    os.symlink("step=0000004.ckpt", root / "checkpoints" / "last.ckpt")
    (root / "logs" / "version_0").mkdir(parents=True)
    (root / "logs" / "version_0" / "metrics.csv").write_text("step,loss\n")
    (root / ".run.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("the run's export")
    return root


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def left_by_a_killed_writer(path: Path, directory: bool = False) -> Path:
    """The temporary sibling of ``path`` that a writer killed mid-write leaves (its process is gone)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{dead_pid()}-0badc0de")
    if directory:
        tmp.mkdir()
        (tmp / "half").write_bytes(b"half")
    else:
        tmp.write_bytes(b"half a file")
    return tmp


# ------------------------------------------------------------------------------------------
# zeros_lm.export: --overwrite replaces an earlier export, nothing else
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    """A train.py checkpoint of a tiny model (weights, config, tokenizer)."""
    from conftest import tiny_model

    model = tiny_model("zeros", seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "step=0000010.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "zeros_lm": {"format": 1, "config": model.config.to_dict(),
                         "tokenizer_json": tiny_tokenizer.backend_tokenizer.to_str()},
            "global_step": 10,
        },
        path,
    )
    return path


def export(args, capsys) -> tuple[int, str]:
    from zeros_lm import export as export_module

    code = export_module.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_export_overwrite_never_replaces_a_run_directory(checkpoint, tmp_path, capsys):
    """#25 item 1: `export runs/live/checkpoints/last.ckpt runs/live --overwrite` deleted the run."""
    run = a_run_directory(tmp_path / "live")
    before = tree(run)
    code, err = export([checkpoint, run, "--overwrite", "--no-check"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: the export target {run} is a training run's directory (it holds .run.lock, ")
    assert "--overwrite only ever replaces an earlier export" in line
    assert tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]  # no temporary export left beside it


@pytest.mark.parametrize("occupant", ["a run lock", "notes", "a subdirectory"])
def test_export_overwrite_never_replaces_a_directory_of_other_files(checkpoint, tmp_path, capsys, occupant):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an export's file, among others
    if occupant == "a run lock":
        (out / ".run.lock").write_text("")
    elif occupant == "notes":
        (out / "notes.txt").write_text("my notes")
    else:
        (out / "data").mkdir()
        (out / "data" / "corpus.txt").write_text("text")
    before = tree(out)
    code, err = export([checkpoint, out, "--overwrite", "--no-check"], capsys)
    assert code == 2
    assert "--overwrite only ever replaces an earlier export" in one_error_line(err)
    assert tree(out) == before


def test_export_overwrite_still_replaces_an_earlier_export(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_zeros.py", "generation_config.json"):
        (out / name).write_text("the earlier export")
    code, err = export([checkpoint, out, "--overwrite", "--no-check"], capsys)
    assert code == 0, err
    assert (out / "config.json").read_text() != "the earlier export"


def test_export_errors_exit_2_like_every_other_misuse(checkpoint, tmp_path, capsys):
    """Minor of #25: export errors exited 1."""
    code, err = export([tmp_path / "missing.ckpt", tmp_path / "out", "--no-check"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: cannot read the checkpoint")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    code, err = export([checkpoint, tmp_path / "out", "--no-check"], capsys)
    assert code == 2 and "is not empty" in one_error_line(err)


def test_an_export_removes_what_a_killed_export_left_beside_it(checkpoint, tmp_path, capsys):
    """Minor of #25: a killed export's temporary directory stayed beside the target for good."""
    out = tmp_path / "hf"
    stale = left_by_a_killed_writer(out, directory=True)
    live = temporary_sibling(out)  # another export, writing right now (this process)
    live.mkdir()
    unrelated = left_by_a_killed_writer(tmp_path / "other", directory=True)
    code, err = export([checkpoint, out, "--no-check"], capsys)
    assert code == 0, err
    assert not stale.exists()
    assert live.is_dir() and unrelated.is_dir()


# ------------------------------------------------------------------------------------------
# train.py: --export.dirpath and --ckpt_path
# ------------------------------------------------------------------------------------------
NO_DATA = ("--data.train_files", "/no/such/corpus")  # reaching the data is a different error


def train_args(root: Path, *extra) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "smoke.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *NO_DATA,
        *extra,
    ]


def run_main(args: list, capsys) -> tuple[int, str]:
    saved, sys.argv = sys.argv, ["train.py"]
    try:
        code = train.main([str(a) for a in args])
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_dirpath_holding_other_files_is_refused_even_with_overwrite(tmp_path, capsys, overwrite):
    """#25 item 3: --overwrite deleted any non-empty --export.dirpath."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.json").write_text("{}")
    before = tree(folder)
    extra = ["--export.dirpath", folder] + (["--overwrite"] if overwrite else [])
    code, err = run_main(train_args(tmp_path / "run", *extra), capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: the export directory {folder} holds files that are not part of an export (notes.txt)")
    assert "--overwrite only ever replaces an earlier export" in line
    assert tree(folder) == before


@pytest.mark.parametrize("where", ["root", "parent", "checkpoints"])
def test_export_dirpath_may_not_be_the_run_directory_or_its_checkpoints(tmp_path, capsys, where):
    root = tmp_path / "runs" / "run"
    export_dir = {"root": root, "parent": tmp_path / "runs", "checkpoints": root / "checkpoints"}[where]
    code, err = run_main(train_args(root, "--export.dirpath", export_dir), capsys)
    assert code == 2
    assert "give --export.dirpath a directory of its own" in one_error_line(err)


def test_an_earlier_export_in_export_dirpath_is_still_replaced_with_overwrite(tmp_path, capsys):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model.safetensors").write_bytes(b"an earlier model")
    code, err = run_main(train_args(tmp_path / "run", "--export.dirpath", export_dir, "--overwrite"), capsys)
    assert code == 2 and "/no/such/corpus" in one_error_line(err)  # past the directory checks, at the data


def _fake_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}}, path)  # readable: what the cheap check before any data work needs
    return path


def test_a_checkpoint_of_another_run_is_not_continued_in_a_directory_holding_a_run(tmp_path, capsys):
    """#25 item 2: continuing run B from its checkpoint in run A's directory mixed the two runs."""
    run_a = a_run_directory(tmp_path / "a")
    before = tree(run_a)
    b_checkpoint = _fake_checkpoint(tmp_path / "b" / "checkpoints" / "step=0000002.ckpt")
    code, err = run_main(train_args(run_a, "--ckpt_path", b_checkpoint), capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: --ckpt_path {b_checkpoint} is a checkpoint of another run (in {b_checkpoint.parent})")
    assert f"{run_a} holds a run of its own" in line
    assert tree(run_a) == before


@pytest.mark.parametrize("target", ["its own run", "a new directory"])
def test_a_checkpoint_is_continued_in_its_own_run_or_a_new_directory(tmp_path, capsys, target):
    own = tmp_path / "b"
    b_checkpoint = _fake_checkpoint(own / "checkpoints" / "step=0000002.ckpt")
    (own / "hf").mkdir()
    (own / "hf" / "config.json").write_text("b's export")
    root = own if target == "its own run" else tmp_path / "new"
    code, err = run_main(train_args(root, "--ckpt_path", b_checkpoint), capsys)
    assert code == 2 and "/no/such/corpus" in one_error_line(err)  # past the directory checks, at the data


# ------------------------------------------------------------------------------------------
# Killed saves: their temporaries are removed at the next start
# ------------------------------------------------------------------------------------------
def test_remove_stale_temporaries_keeps_live_writers_and_other_files(tmp_path):
    dead_file = left_by_a_killed_writer(tmp_path / "step=0000002.ckpt")
    dead_dir = left_by_a_killed_writer(tmp_path / "step=0000004.ckpt", directory=True)
    live = temporary_sibling(tmp_path / "step=0000006.ckpt")
    live.write_bytes(b"being written by this process")
    other_host = tmp_path / f".x{TMP_MARK}another-host-{dead_pid()}-0badc0de"
    other_host.write_bytes(b"written on another machine")
    (tmp_path / "step=0000002.ckpt").write_bytes(b"a checkpoint")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, "step=0000002.ckpt"])
    assert remove_stale_temporaries(tmp_path, of="step=0000006.ckpt") == []


def test_a_new_run_removes_what_killed_checkpoint_saves_left(tmp_path):
    """Minor of #25: a save killed mid-write left its temporary checkpoint (file, or DeepSpeed's
    directory) in the checkpoint directory for good."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from zeros_lm.callbacks import ZeroSCheckpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step=0000002.ckpt").write_bytes(b"a whole checkpoint")
    half_file = left_by_a_killed_writer(checkpoints / "step=0000004.ckpt")
    half_dir = left_by_a_killed_writer(checkpoints / "step=0000006.ckpt", directory=True)
    strategy = types.SimpleNamespace(checkpoint_io=TorchCheckpointIO(), broadcast=lambda obj, src=0: obj)
    trainer = types.SimpleNamespace(strategy=strategy, is_global_zero=True)
    ZeroSCheckpoint(dirpath=str(checkpoints)).setup(trainer, None, "fit")
    assert not half_file.exists() and not half_dir.exists()
    assert [p.name for p in checkpoints.iterdir()] == ["step=0000002.ckpt"]
