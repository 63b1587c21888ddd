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

from zeros_lm.cli import train  # what train.py and zeros-lm train run
from zeros_lm.training import ZeroSCheckpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(clean_env):
    """The subprocess environment, importing zeros_lm from this checkout."""
    return dict(clean_env, PYTHONPATH=str(REPO))


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


def test_importing_the_package_under_an_old_torch_says_what_is_wrong(env):
    code = "import torch; torch.__version__ = '2.5.1'; import zeros_lm"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: zeros-lm needs torch >= 2.6 (transformers 5 disables PyTorch below it), found torch 2.5.1; "
        "upgrade it, e.g. pip install 'torch>=2.6'"
    )


def test_selfcheck_runs_every_attention_type_forward(env):
    proc = subprocess.run(
        [sys.executable, "-m", "zeros_lm.selfcheck"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for attention_type in ("zeros", "softmax", "linear"):
        assert f"{attention_type}: forward pass (2, 24) -> (2, 24, 300), finite" in proc.stdout


# ------------------------------------------------------------------------------------------
# Data preparation killed mid-way; a cache locked by a live process
# ------------------------------------------------------------------------------------------
PREPARE_SCRIPT = """
import sys, time
from zeros_lm import data as D

corpus_dir, tokenizer_dir, cache_dir, mode = sys.argv[1:5]
if mode == "slow":  # each batch takes a while, so that the preparation can be killed mid-way
    tokenize = D.corpus._tokenize_batch  # patched where the corpus stage looks it up

    def slow_tokenize(*args, **kwargs):
        time.sleep(0.3)
        return tokenize(*args, **kwargs)

    D.corpus._tokenize_batch = slow_tokenize
corpus = D.prepare_corpus(
    train_files=D.resolve_files(corpus_dir), tokenizer=tokenizer_dir, cache_dir=cache_dir,
    seq_len=32, sample_by="line", num_proc=2, val_fraction=0.1,
)
print("prepared", len(corpus.train), "training blocks", flush=True)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"{marker!r} never appeared: {seen.decode(errors='replace')[-2000:]}"
        ready, _, _ = select.select([proc.stderr], [], [], min(left, 1.0))
        if ready:
            seen += os.read(proc.stderr.fileno(), 65536)
    return seen.decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_preparation_with_workers_blocks_nothing_and_leaves_nothing(tmp_path, tiny_tokenizer, env):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for i in range(16):  # 16 files x 480 lines: one document per line, 30 batches of 256 to tokenise
        lines = [" ".join(words[(i + j + k) % len(words)] for k in range(8)) for j in range(480)]
        (corpus / f"part{i:02d}.txt").write_text("\n".join(lines) + "\n")
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    cache = tmp_path / "cache"
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE_SCRIPT)
    args = [sys.executable, str(script), str(corpus), str(tokenizer_dir), str(cache)]
    env = {k: v for k, v in env.items() if k not in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    first = subprocess.Popen(args + ["slow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: list[int] = []
    second = None
    try:
        _read_until(first, "Tokenising the training data (num_proc=2)", timeout=300)  # datasets' progress bar
        time.sleep(1.0)  # mid-way through the tokenisation
        workers = _children(first.pid)
        assert workers, "the preparation should be running worker processes"
        assert list(cache.glob("work-*")), "the preparation's work folder"
        first.kill()
        first.wait(timeout=30)
        # A new preparation in the same cache completes, removing what the killed one left:
        # its work folder and the processes it had forked (workers, a datasets manager).
        second = subprocess.Popen(args + ["fast"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err.decode()[-3000:]
        assert "prepared" in out.decode()
        assert not [w for w in workers if _alive(w)], "processes of the killed preparation live on"
        assert not list(cache.glob("work-*"))
        assert not list(cache.glob("*/*.tmp-*"))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_a_cache_locked_by_a_live_process_is_waited_for_then_one_clear_error(tmp_path, monkeypatch, capsys, env):
    from zeros_lm import data as D

    cache = tmp_path / "cache"
    holder_code = (
        "import sys, time; from pathlib import Path; from zeros_lm import _locks; "
        f"_locks.acquire(Path({str(cache / '.lock')!r})); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "doc.txt").write_text("some text to train on\n" * 50)
        monkeypatch.setenv(D.LOCK_TIMEOUT_ENV, "1")
        with pytest.raises(D.DataError) as e:
            D.prepare_corpus(train_files=[str(tmp_path / "doc.txt")], cache_dir=str(cache), seq_len=8, num_proc=1)
        message = str(e.value)
        assert f"the data cache {cache} is still locked by process {holder.pid} after 1 s" in message
        assert "--data.cache_dir" in message and D.LOCK_TIMEOUT_ENV in message
        assert f"Waiting for process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # Once its holder is gone (killed, not released), the lock is free.
    monkeypatch.setenv(D.LOCK_TIMEOUT_ENV, "0")
    corpus = D.prepare_corpus(train_files=[str(tmp_path / "doc.txt")], cache_dir=str(cache), seq_len=8, num_proc=1,
                              tokenizer_vocab_size=300, val_fraction=0.0)
    assert len(corpus.train) > 0


# ------------------------------------------------------------------------------------------
# Export: never into an occupied directory unless told, and then as a whole
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """A checkpoint directory as train.py leaves it (two step files and last.ckpt), holding a tiny
    model's weights, config and tokenizer, plus a truncated copy of the newest and a text file."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("ckpts")
    model = tiny_model("zeros", seed=3)
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "zeros_lm": {"format": 1, "config": model.config.to_dict(), "tokenizer_json": tiny_tokenizer.backend_tokenizer.to_str()},
        "global_step": 10,
    }
    good = root / "step=0000010.ckpt"
    torch.save(checkpoint, good)
    bad = root / "step=0000020.ckpt"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # killed mid-copy
    os.symlink(bad.name, root / "last.ckpt")
    text = root / "notes.ckpt.txt"
    text.write_text("not a checkpoint\n")
    return types.SimpleNamespace(dir=root, good=good, bad=bad, last=root / "last.ckpt", text=text, model=model)


def _export(args, capsys) -> tuple[int, str]:
    from zeros_lm import export

    code = export.main(args)
    return code, capsys.readouterr().err


def test_export_refuses_a_non_empty_directory_and_leaves_it_alone(checkpoints, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    code, err = _export([str(checkpoints.good), str(out), "--no-check"], capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: the export target {out} is not empty (it holds config.json, model-00001-of-00002.safetensors); "
        "choose another directory, or replace it as a whole with --overwrite"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
    assert (out / "config.json").read_text() == "{}"


def test_export_overwrite_replaces_the_directory_as_a_whole(checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    out.mkdir()
    for stale in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "config.json"):
        (out / stale).write_text("from another model")
    code, err = _export([str(checkpoints.good), str(out), "--overwrite", "--no-check"], capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not names & {"model.safetensors.index.json", "model-00001-of-00002.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or old directory left
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, checkpoints.model(input_ids=ids).logits)


def test_a_failed_overwrite_leaves_the_old_export_intact(checkpoints, tmp_path, monkeypatch):
    from zeros_lm import export

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("the old model")

    def crash(model, tokenizer, out_dir, generation, dtype):
        Path(out_dir, "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(export, "_export_model", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_from_checkpoint(str(checkpoints.good), str(out), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "the old model"


@pytest.mark.parametrize("which", ["bad", "last", "text"])
def test_export_of_an_unreadable_checkpoint_names_the_newest_readable_one(checkpoints, tmp_path, capsys, which):
    path = getattr(checkpoints, which)
    code, err = _export([str(path), str(tmp_path / "out")], capsys)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: cannot read the checkpoint {path}")
    assert line.endswith(f"the newest readable checkpoint there is {checkpoints.good}: use that one")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# train.py: a run owns its directory; every bad input is one error line before any data work
# ------------------------------------------------------------------------------------------
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small corpus and a data cache shared by this module's training runs."""
    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        lines = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(10)) for j in range(300)]
        (corpus / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return types.SimpleNamespace(corpus=str(corpus), cache=str(root / "cache"))


def tiny_args(root: Path, data, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "smoke.yaml"),
        "--trainer.default_root_dir", str(root),
        "--data.train_files", data.corpus,
        "--data.cache_dir", data.cache,
        "--data.tokenizer_vocab_size", "300",
        "--data.seq_len", "32",
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "4",
        "--checkpoint.every_n_train_steps", "2",
        "--trainer.val_check_interval", "2",
        *extra,
    ]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    saved, sys.argv = sys.argv, ["train.py"]
    try:
        code = train.main(args)
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("Seed set to")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


NO_DATA = ("--data.train_files", "/no/such/corpus")  # reaching the data would be a different error


def _old_run(root: Path) -> None:
    """What an earlier run leaves: step checkpoints, last.ckpt, an export."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step=0000800.ckpt").write_bytes(b"the earlier run")
    os.symlink("step=0000800.ckpt", root / "checkpoints" / "last.ckpt")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("the earlier run")


def test_a_new_run_into_a_directory_holding_a_run_is_refused(tmp_path, tiny_data, capsys):
    root = tmp_path / "run"
    _old_run(root)
    code, err = run_main(tiny_args(root, tiny_data, *NO_DATA, "--model.attention_type", "softmax"), capsys)
    assert code == 2
    assert one_error_line(err) == (
        f"error: {root} holds another run (1 checkpoint(s) in {root / 'checkpoints'} and an export in {root / 'hf'}); "
        "continue it with --ckpt_path last, start a new run in another --trainer.default_root_dir, "
        "or replace it with --overwrite"
    )
    assert (root / "checkpoints" / "step=0000800.ckpt").read_bytes() == b"the earlier run"
    assert (root / "hf" / "config.json").read_text() == "the earlier run"


def test_an_export_directory_holding_another_model_is_refused_too(tmp_path, tiny_data, capsys):
    export = tmp_path / "elsewhere"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"another model")
    code, err = run_main(tiny_args(tmp_path / "run", tiny_data, *NO_DATA, "--export.dirpath", str(export)), capsys)
    assert code == 2 and f"an export in {export}" in one_error_line(err)


def test_overwrite_replaces_the_earlier_run_entirely(tmp_path, tiny_data, capsys):
    root = tmp_path / "run"
    _old_run(root)
    code, err = run_main(tiny_args(root, tiny_data, "--overwrite"), capsys)
    assert code == 0, err[-3000:]
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=0000002.ckpt", "step=0000004.ckpt"]  # nothing of the earlier run
    assert os.readlink(root / "checkpoints" / "last.ckpt") == "step=0000004.ckpt"
    assert (root / "hf" / "model.safetensors").is_file()
    assert (root / "hf" / "config.json").read_text() != "the earlier run"


def test_overwrite_and_resume_together_is_an_error(tmp_path, tiny_data, capsys):
    code, err = run_main(tiny_args(tmp_path / "run", tiny_data, *NO_DATA, "--overwrite", "--ckpt_path", "last"), capsys)
    assert code == 2 and "--ckpt_path" in one_error_line(err) and "--overwrite" in err


def test_a_directory_in_use_by_a_live_run_is_refused(tmp_path, tiny_data, capsys, env):
    root = tmp_path / "run"
    root.mkdir()
    holder_code = (
        "import time; from pathlib import Path; from zeros_lm import _locks; "
        f"_locks.acquire(Path({str(root / '.run.lock')!r})); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_main(tiny_args(root, tiny_data, *NO_DATA), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert one_error_line(err) == (
        f"error: another run (process {holder.pid}) is using {root} right now; wait for it to finish, "
        "or give this one another --trainer.default_root_dir"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--model.num_attention_heads", "3"), "num_attention_heads (3) must divide hidden_size (64)"),
        (("--model.hidden_size", "36", "--model.num_attention_heads", "4"), "head dimension hidden_size / num_attention_heads = 9 must be even"),
        (("--model.chunk_size", "0"), "--model.chunk_size must be a positive integer, got 0"),
        (("--model.learning_rate", "0"), "--model.learning_rate must be a positive number, got 0"),
        (("--model.learning_rate", "-0.001"), "--model.learning_rate must be a positive number, got -0.001"),
        (("--trainer.max_steps", "0"), "--trainer.max_steps must be a positive number of optimizer steps"),
        (("--model.conv_size", "100000000"), "--model.conv_size must be at most 64 (a short convolution"),
        (("--model.softmax_every", "3"), "--model.softmax_every (3) is larger than num_hidden_layers (2)"),
    ],
)
def test_bad_model_and_trainer_arguments_are_one_line_before_any_data_work(tmp_path, tiny_data, capsys, extra, message):
    code, err = run_main(tiny_args(tmp_path / "run", tiny_data, *NO_DATA, *extra), capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_yaml_syntax_error_names_the_file(tmp_path, tiny_data, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("trainer:\n  max_steps: [1, 2\nmodel:\n  hidden_size: 64\n")
    code, err = run_main(tiny_args(tmp_path / "run", tiny_data, "--config", str(bad)), capsys)
    assert code == 2
    assert one_error_line(err).startswith(f"error: {bad}: not valid YAML at line ")


@pytest.mark.parametrize("given", ["last", "path"])
def test_resuming_from_an_unreadable_checkpoint_names_the_newest_readable_one(tmp_path, tiny_data, capsys, checkpoints, given):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(checkpoints.dir, root / "checkpoints", symlinks=True)
    ckpt = "last" if given == "last" else str(root / "checkpoints" / "step=0000020.ckpt")
    code, err = run_main(tiny_args(root, tiny_data, *NO_DATA, "--ckpt_path", ckpt), capsys)
    assert code == 2
    line = one_error_line(err)
    shown = root / "checkpoints" / ("last.ckpt (-> step=0000020.ckpt)" if given == "last" else "step=0000020.ckpt")
    assert line.startswith(f"error: cannot read the checkpoint {shown}: truncated")
    assert line.endswith(f"the newest readable checkpoint there is {root / 'checkpoints' / 'step=0000010.ckpt'}: use that one")


def _run_with_a_checkpoint_of(root: Path, **changes) -> None:
    """A run directory whose last checkpoint holds the model of ``tiny_args`` (configs/smoke.yaml),
    with ``changes``. No weights: a resume compares the stored config before it reads them."""
    import yaml

    from zeros_lm import ZeroSConfig
    from zeros_lm.checkpoint import CHECKPOINT_KEY, config_fields, model_state

    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["model"]
    config = ZeroSConfig(**{k: v for k, v in smoke.items() if k in config_fields()}, vocab_size=300, **changes)
    (root / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, CHECKPOINT_KEY: model_state(config), "global_step": 4},
               root / "checkpoints" / "step=0000004.ckpt")
    os.symlink("step=0000004.ckpt", root / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("extra, named", [
    (("--model.conv_size", "4"), "(--model.conv_size 4 asked for, 0 in the checkpoint)"),
    (("--model.hidden_size", "128", "--model.softmax_every", "2", "--model.use_gates", "false"),
     "(--model.hidden_size 128 asked for, 64 in the checkpoint; --model.use_gates false asked for, true in the checkpoint; --model.layer_types "
     '["linear_attention", "full_attention"] asked for, null in the checkpoint; --model.softmax_every 2 asked for, '
     "0 in the checkpoint)"),
])
def test_resuming_with_another_model_names_the_fields_before_any_data_work(tmp_path, tiny_data, capsys, extra, named):
    root = tmp_path / "run"
    _run_with_a_checkpoint_of(root)
    code, err = run_main(tiny_args(root, tiny_data, *NO_DATA, "--ckpt_path", "last", *extra), capsys)
    assert code == 2
    assert one_error_line(err) == (
        f"error: --ckpt_path last: {root / 'checkpoints' / 'last.ckpt'} was trained with another model {named}; "
        "resume with the run's own model options, or start a new run in another --trainer.default_root_dir"
    )


@pytest.mark.parametrize("extra", [(), ("--model.attention_backend", "torch", "--model.chunk_size", "8")])
def test_resuming_with_the_same_model_goes_on_to_the_data(tmp_path, tiny_data, capsys, extra):
    """The run's own options (and a change of how the model runs, not of what it computes) pass the
    comparison: the next thing to fail is the missing corpus."""
    root = tmp_path / "run"
    _run_with_a_checkpoint_of(root)
    code, err = run_main(tiny_args(root, tiny_data, *NO_DATA, "--ckpt_path", "last", *extra), capsys)
    assert code == 2
    assert one_error_line(err) == "error: no such file or directory: '/no/such/corpus'"


def test_ctrl_c_exits_130_without_a_traceback_and_the_run_holds_its_directory(tmp_path, tiny_data, capsys, env):
    root = tmp_path / "run"
    args = tiny_args(root, tiny_data, "--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "1000")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=dict(env, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # "Training:" is printed once the data is ready, just before the first step.
        deadline = time.monotonic() + 300
        seen = ""
        while "Training:" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen + proc.stderr.read().decode()[-3000:]
            seen += proc.stdout.readline().decode()
        # While it trains, the directory is its own.
        code, err = run_main(tiny_args(root, tiny_data, *NO_DATA), capsys)
        assert code == 2 and f"another run (process {proc.pid}) is using {root}" in err
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()[-3000:]
    assert "Traceback" not in stderr.decode()
    assert stderr.decode().strip().splitlines()[-1].startswith("Interrupted at step ")


# ------------------------------------------------------------------------------------------
# Structured data: non-string text and malformed lines name the file and the row
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, where, what",
    [
        ("ints.jsonl", '{"text": "fine"}\n{"text": 1}\n', "line 2", "an int (1)"),
        ("lists.jsonl", '{"text": ["a", "b"]}\n', "line 1", "a list (['a', 'b'])"),
        ("records.json", '[{"text": "fine"}, {"text": {"nested": true}}]', "record 2", "a dict ({'nested': True})"),
    ],
)
def test_json_text_that_is_not_a_string_names_file_and_row(tmp_path, name, content, where, what):
    from zeros_lm.data import DataError, prepare_corpus

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        prepare_corpus(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), seq_len=4, num_proc=1)
    assert str(e.value) == (
        f"{path}, {where}: the text column 'text' holds {what}, not a string; fix that row, or choose another "
        "column with --data.text_column"
    )


@pytest.mark.parametrize("values, row, what", [([1, 2], 1, "an int (1)"), ([["a"], ["b", "c"]], 1, "a list (['a'])")])
def test_parquet_text_that_is_not_a_string_names_file_and_row(tmp_path, values, row, what):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zeros_lm.data import DataError, prepare_corpus

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": values}), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, row {row}: the text column 'text' holds {re.escape(what)}"):
        prepare_corpus(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), seq_len=4, num_proc=1)


def test_a_malformed_jsonl_line_is_named_in_the_last_line_of_the_error(tmp_path, tiny_data, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "no closing brace"\n{"text": "fine"}\n')
    code, err = run_main(tiny_args(tmp_path / "run", tiny_data, "--data.train_files", str(path)), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {path}, line 3: not valid JSON (Expecting ',' delimiter at column 28); fix or remove that line"
    )


def test_tokenising_refuses_non_string_text_from_any_source():
    from zeros_lm.data import DataError, _tokenize_batch

    with pytest.raises(DataError, match=r"the text column holds an int \(7\), not a string"):
        _tokenize_batch({"text": ["fine", 7]}, tokenizer_json="unused")


def test_streamed_json_text_that_is_not_a_string_names_file_and_row(tmp_path):
    from zeros_lm.data import DataError, TextDataModule

    path = tmp_path / "ints.jsonl"
    path.write_text('{"text": 5}\n{"text": 6}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, line 1: the text column 'text' holds an int \(5\)"):
        TextDataModule(train_files=[str(path)], streaming=True, cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=300)
