"""Recurrent states as files: ZeroSCache.save / load / copy, and generate.py --save-state / --load-state."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ATTENTION_TYPES, tiny_model

from zeros_lm import ZeroSCache

REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(do_sample=False, min_new_tokens=6, max_new_tokens=6)


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (1, n), generator=g)


def _read(model, ids):
    """The cache after reading ids (every token consumed)."""
    with torch.no_grad():
        return model(ids, use_cache=True).cache


def _continue(model, cache, ids, **kw):
    """generate() from a cache that already holds cache.get_seq_length() tokens, fed only the new ones."""
    mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, cache=cache, **kw)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_saved_state_continues_like_reading_everything_at_once(tmp_path, attention_type):
    model = tiny_model(attention_type)
    a, b = _ids(11, 0), _ids(5, 1)
    _read(model, a).save(tmp_path / "a.state", model)

    loaded = ZeroSCache.load(tmp_path / "a.state", model)
    assert loaded.get_seq_length() == 11 and loaded.num_tokens.tolist() == [11]
    with torch.no_grad():
        logits_loaded = model(b, cache=loaded).logits
        logits_full = model(torch.cat([a, b], 1)).logits[:, 11:]
    torch.testing.assert_close(logits_loaded, logits_full, rtol=1e-5, atol=1e-5)

    out = _continue(model, ZeroSCache.load(tmp_path / "a.state", model), b, **GREEDY)
    with torch.no_grad():
        ref = model.generate(torch.cat([a, b], 1), **GREEDY)
    assert torch.equal(out[:, -6:], ref[:, -6:])


def test_saved_state_is_the_same_size_whatever_the_prompt_length(tmp_path):
    model = tiny_model("zeros")
    _read(model, _ids(5, 0)).save(tmp_path / "short.state")
    _read(model, _ids(300, 0)).save(tmp_path / "long.state")
    from safetensors.torch import load_file

    short, long = (load_file(tmp_path / name) for name in ("short.state", "long.state"))
    assert {k: v.shape for k, v in short.items()} == {k: v.shape for k, v in long.items()}
    assert sum(v.nbytes for v in long.values()) == _read(model, _ids(3, 0)).nbytes


def test_a_batch_of_forks_from_one_state(tmp_path):
    model = tiny_model("zeros")
    a = _ids(9, 0)
    _read(model, a).save(tmp_path / "a.state", model)
    cache = ZeroSCache.load(tmp_path / "a.state", model)
    cache.batch_repeat_interleave(3)
    with torch.no_grad():
        torch.manual_seed(0)
        forks = _continue(model, cache, _ids(2, 1).repeat(3, 1), do_sample=True, max_new_tokens=8, min_new_tokens=8)
    assert forks.shape == (3, 10)
    assert len({tuple(row.tolist()) for row in forks}) > 1  # the forks sampled different continuations
    # each fork is a continuation of the same state: row i alone, from a fresh copy, gives the same logits
    for row in forks:
        single = ZeroSCache.load(tmp_path / "a.state", model)
        with torch.no_grad():
            logits_fork = model(row[None], cache=single).logits
            logits_full = model(torch.cat([a, row[None]], 1)).logits[:, 9:]
        torch.testing.assert_close(logits_fork, logits_full, rtol=1e-5, atol=1e-5)


def test_copy_forks_independently():
    model = tiny_model("zeros")
    cache = _read(model, _ids(7, 0))
    twin = cache.copy()
    with torch.no_grad():
        model(_ids(3, 1), cache=cache)  # advances the original only
        from_twin = model(_ids(3, 2), cache=twin).logits
        ref = model(torch.cat([_ids(7, 0), _ids(3, 2)], 1)).logits[:, 7:]
    assert twin.get_seq_length() == 10 and cache.get_seq_length() == 10
    torch.testing.assert_close(from_twin, ref, rtol=1e-5, atol=1e-5)


def test_state_of_another_model_is_refused(tmp_path):
    model = tiny_model("zeros", seed=0)
    _read(model, _ids(5, 0)).save(tmp_path / "a.state", model)
    with pytest.raises(ValueError, match="different model.*weights differ"):
        ZeroSCache.load(tmp_path / "a.state", tiny_model("zeros", seed=1))
    with pytest.raises(ValueError, match="different model.*attention_type"):
        ZeroSCache.load(tmp_path / "a.state", tiny_model("linear", seed=0))
    with pytest.raises(ValueError, match="different model.*num_hidden_layers"):
        ZeroSCache.load(tmp_path / "a.state", tiny_model("zeros", num_hidden_layers=3))
    # the same weights in bfloat16 are the same model
    assert ZeroSCache.load(tmp_path / "a.state", tiny_model("zeros", seed=0).to(torch.bfloat16)).get_seq_length() == 5


def test_bad_state_files_give_one_clear_error(tmp_path):
    model = tiny_model("zeros")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZeroSCache.load(tmp_path / "missing.state", model)
    (tmp_path / "text.state").write_text("not a state")
    with pytest.raises(ValueError, match="not a readable ZeroS state file"):
        ZeroSCache.load(tmp_path / "text.state", model)
    _read(model, _ids(5, 0)).save(tmp_path / "good.state", model)
    data = (tmp_path / "good.state").read_bytes()
    (tmp_path / "cut.state").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable ZeroS state file"):
        ZeroSCache.load(tmp_path / "cut.state", model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not a readable ZeroS state file"):
        ZeroSCache.load(tmp_path / "foreign.safetensors", model)
    with pytest.raises(ValueError, match="empty"):
        ZeroSCache(model.config).save(tmp_path / "empty.state")
    assert not (tmp_path / "empty.state").exists()


# ---------------------------------------------------------------------------------------------
# generate.py --save-state / --load-state
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model_dir(saved_models):
    return saved_models["zeros"]


def _generate_py(*args, stdin=None):
    return subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *map(str, args)],
        input=stdin or "", capture_output=True, text=True, timeout=300,
    )


def test_generate_py_save_then_load_equals_one_prompt(tiny_model_dir, tmp_path):
    state = tmp_path / "prompt.state"
    common = ["--greedy", "--max-new-tokens", "12", "--device", "cpu"]
    first, second = "def add(a, b):\n", "    return a"
    saved = _generate_py(tiny_model_dir, "--prompt", first, "--save-state", state, *common)
    assert saved.returncode == 0, saved.stderr
    assert state.is_file() and "saved the state" in saved.stderr
    loaded = _generate_py(tiny_model_dir, "--load-state", state, "--prompt", second, *common)
    assert loaded.returncode == 0, loaded.stderr
    whole = _generate_py(tiny_model_dir, "--prompt", first + second, *common)
    assert whole.returncode == 0, whole.stderr
    # the texts are equal when the tokenizer splits first + second at the same place (checked below)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok(first + second).input_ids == tok(first).input_ids + tok(second, add_special_tokens=False).input_ids
    assert loaded.stdout == whole.stdout and loaded.stdout.strip()


def test_generate_py_state_errors_overwrite_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.state"
    bad.write_text("garbage")
    res = _generate_py(tiny_model_dir, "--load-state", bad, "--prompt", "x", "--save-state", bad, "--device", "cpu")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and "bad.state" in res.stderr
    assert bad.read_text() == "garbage"  # not overwritten
    res = _generate_py(tiny_model_dir, "--load-state", tmp_path / "missing.state", "--prompt", "x")
    assert res.returncode != 0 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    res = _generate_py(tiny_model_dir, "--interactive", "--save-state", tmp_path / "s.state", stdin="/quit\n")
    assert res.returncode == 2 and "/save FILE" in res.stderr and not (tmp_path / "s.state").exists()


def test_generate_py_interactive_save_and_load(tiny_model_dir, tmp_path):
    state = tmp_path / "chat.state"
    turns = textwrap.dedent(f"""\
        import os
        /save {state}
        /quit
        """)
    res = _generate_py(tiny_model_dir, "--interactive", "--greedy", "--max-new-tokens", "4", "--device", "cpu",
                       stdin=turns)
    assert res.returncode == 0, res.stderr
    assert state.is_file()
    res = _generate_py(tiny_model_dir, "--interactive", "--greedy", "--max-new-tokens", "4", "--device", "cpu",
                       stdin=f"/load {state}\nimport sys\n/load {tmp_path / 'nope.state'}\n/quit\n")
    assert res.returncode == 0, res.stderr
    assert "loaded the state" in res.stderr and "does not exist" in res.stderr  # a bad /load does not end the session


# ---------------------------------------------------------------------------------------------
# generate.py: where a state goes, checked before generating; model directories that do not load
# ---------------------------------------------------------------------------------------------
def _generate_in_process(args, capsys, monkeypatch, stdin=""):
    from zeros_lm.cli import generate as cli

    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(stdin))
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory no file can be created in: read-only permissions, or (as root, whom permissions
    do not stop) a read-only file system."""
    candidate = tmp_path / "read-only"
    candidate.mkdir()
    candidate.chmod(0o555)
    for directory in (candidate, Path("/sys")):
        try:
            (directory / "probe.state").write_bytes(b"")
        except OSError:
            return directory
        (directory / "probe.state").unlink()
    pytest.skip("no unwritable directory on this machine")


@pytest.mark.parametrize("flag", ["--save-state", "--save-final-state"])
@pytest.mark.parametrize("where", ["missing", "a file", "a directory", "unwritable"])
def test_generate_py_checks_where_a_state_goes_before_generating(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                 flag, where):
    (tmp_path / "file").write_text("a file")
    target, message = {
        "missing": (tmp_path / "missing" / "s.state", "the directory of '{t}' does not exist"),
        "a file": (tmp_path / "file" / "s.state", "the directory of '{t}' ('{p}') is not a directory"),
        "a directory": (tmp_path, "'{t}' is a directory; give a file name"),
        "unwritable": (None, "cannot write into the directory '{p}'"),
    }[where]
    if target is None:
        target = _unwritable_dir(tmp_path) / "s.state"
    code, out, err = _generate_in_process(
        [tiny_model_dir, "--prompt", "def f(x):", flag, target, "--greedy", "--max-new-tokens", 4, "--device", "cpu"],
        capsys, monkeypatch)
    assert code == 2 and out == ""  # nothing generated
    assert _error_lines(err) == [l for l in err.strip().splitlines()]  # one error line, no traceback
    assert len(_error_lines(err)) == 1
    assert _error_lines(err)[0].startswith(f"error: {flag}: " + message.format(t=target, p=target.resolve().parent))
    assert (tmp_path / "file").read_text() == "a file"


def test_generate_py_interactive_save_to_a_bad_place_is_an_error_line_and_the_session_goes_on(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.state"
    turns = f"/save {tmp_path / 'missing' / 's.state'}\nimport os\n/save {tmp_path}\nimport sys\n/save {good}\n/quit\n"
    code, out, err = _generate_in_process(
        [tiny_model_dir, "--interactive", "--greedy", "--max-new-tokens", 4, "--device", "cpu"], capsys, monkeypatch,
        stdin=turns)
    assert code == 0, err
    assert _error_lines(err) == [
        f"error: /save: the directory of '{tmp_path / 'missing' / 's.state'}' does not exist",
        f"error: /save: '{tmp_path}' is a directory; give a file name",
    ]
    assert out.strip() and good.is_file() and "Traceback" not in err


def test_generate_py_load_state_of_a_directory_says_so(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, out, err = _generate_in_process([tiny_model_dir, "--load-state", tmp_path, "--prompt", "x"], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == f"error: --load-state: '{tmp_path}' is a directory, not a state file"


def test_generate_py_refuses_a_model_directory_whose_weights_do_not_fit(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Weights that do not fit config.json (here another file in model.safetensors) would load as a
    half-random model that prints noise and exits 0: it is an error naming what is wrong."""
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    save_file({"layers.0.0": torch.zeros(3), "num_tokens": torch.zeros(1)}, broken / "model.safetensors",
              metadata={"format": "pt"})
    code, out, err = _generate_in_process([broken, "--prompt", "def f(x):", "--device", "cpu"], capsys, monkeypatch)
    assert code == 2 and out == ""
    line = err.strip()
    assert line.startswith(f"error: the weights in '{broken}' do not fit its config.json (")
    assert " missing: " in line and "2 unexpected: layers.0.0, num_tokens)" in line


# ---------------------------------------------------------------------------------------------
# A save replaces nothing but, when asked, a state file
# ---------------------------------------------------------------------------------------------
def test_a_save_never_replaces_another_file_and_a_state_file_only_when_asked(tmp_path):
    from zeros_lm.cache_zeros import is_state_file

    model = tiny_model("zeros")
    cache = _read(model, _ids(5, 0))
    other = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, other)
    before = other.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="exists and is not a ZeroS state file; it is left alone"):
            cache.save(other, model, overwrite=overwrite)
    assert other.read_bytes() == before and not is_state_file(other)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        cache.save(tmp_path, model)
    cache.save(tmp_path / "a.state", model)
    first = (tmp_path / "a.state").read_bytes()
    longer = _read(model, _ids(9, 1))
    with pytest.raises(FileExistsError, match="the state file .* exists; replace it with overwrite=True"):
        longer.save(tmp_path / "a.state", model)
    assert (tmp_path / "a.state").read_bytes() == first
    longer.save(tmp_path / "a.state", model, overwrite=True)
    assert ZeroSCache.load(tmp_path / "a.state", model).get_seq_length() == 9


def test_generate_py_refuses_to_save_a_state_over_another_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The issue's case: --save-state hf/model.safetensors wrote a state over the model's weights."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, hf)
    weights = (hf / "model.safetensors").read_bytes()
    args = [hf, "--prompt", "def f(x):", "--greedy", "--max-new-tokens", 4, "--device", "cpu"]
    code, out, err = _generate_in_process([*args, "--save-state", hf / "model.safetensors", "--overwrite-state"],
                                          capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --save-state: '{hf / 'model.safetensors'}' exists and is not a ZeroS state file; "
                           "it is left alone: choose another file name")
    assert (hf / "model.safetensors").read_bytes() == weights
    state = tmp_path / "s.state"
    code, _, err = _generate_in_process([*args, "--save-state", state], capsys, monkeypatch)
    assert code == 0, err
    saved = state.read_bytes()
    code, out, err = _generate_in_process([*args, "--save-final-state", state], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --save-final-state: the state file '{state}' exists; replace it with "
                           "--overwrite-state, or choose another file name")
    assert state.read_bytes() == saved
    code, _, err = _generate_in_process([*args, "--save-final-state", state, "--overwrite-state"], capsys, monkeypatch)
    assert code == 0, err
    assert state.read_bytes() != saved


def test_generate_py_saves_the_state_of_a_one_token_prompt(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A one-token prompt leaves nothing in the state (its token is the one generation starts from):
    the file holds that pending token, and continuing from it equals the prompt itself."""
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tiny_model_dir)("d").input_ids) == 1
    common = ["--greedy", "--max-new-tokens", 6, "--device", "cpu"]
    state = tmp_path / "one.state"
    code, _, err = _generate_in_process([tiny_model_dir, "--prompt", "d", "--save-state", state, *common],
                                        capsys, monkeypatch)
    assert code == 0, err
    code, loaded, err = _generate_in_process([tiny_model_dir, "--load-state", state, "--prompt", "", *common],
                                             capsys, monkeypatch)
    assert code == 0, err
    code, whole, err = _generate_in_process([tiny_model_dir, "--prompt", "d", *common], capsys, monkeypatch)
    assert code == 0, err
    assert loaded == whole and whole.strip()
    # Before any text there is nothing to save: an error line, and the session goes on.
    code, _, err = _generate_in_process([tiny_model_dir, "--interactive", *common], capsys, monkeypatch,
                                        stdin=f"/save {tmp_path / 'nothing.state'}\n/quit\n")
    assert code == 0 and _error_lines(err) == ["error: /save: nothing to save yet: no text has been read"]
    assert not (tmp_path / "nothing.state").exists()


# ---------------------------------------------------------------------------------------------
# The weights' fingerprint covers every weight
# ---------------------------------------------------------------------------------------------
def test_the_weights_fingerprint_covers_every_weight(tmp_path):
    """A model whose weights differ only after the leading elements of each is another model; the same
    weights in bfloat16 are the same model."""
    model = tiny_model("zeros", seed=0)
    _read(model, _ids(5, 0)).save(tmp_path / "a.state", model)
    changed = tiny_model("zeros", seed=0)
    with torch.no_grad():
        for p in changed.parameters():
            p.view(-1)[-1] += 1.0  # the last element of every weight
    with pytest.raises(ValueError, match="different model.*the weights differ"):
        ZeroSCache.load(tmp_path / "a.state", changed)
    one = tiny_model("zeros", seed=0)
    with torch.no_grad():
        next(p for p in one.parameters() if p.numel() > 256).view(-1)[300] += 1.0  # one element of one weight
    with pytest.raises(ValueError, match="the weights differ"):
        ZeroSCache.load(tmp_path / "a.state", one)
    assert ZeroSCache.load(tmp_path / "a.state", tiny_model("zeros", seed=0).to(torch.bfloat16)).get_seq_length() == 5


def test_state_files_of_earlier_formats_keep_their_fingerprint_rule():
    """Files of formats 1 and 2 were fingerprinted on the leading elements of each weight: that rule
    still checks them (tests/fixtures holds files of format 1); new files carry the current format."""
    from zeros_lm import cache_zeros as C

    assert C.STATE_FILE_FORMAT not in (C.STATE_FILE_FORMAT_NAMED, C.STATE_FILE_FORMAT_TUPLES)
    model = tiny_model("zeros", seed=0)
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1.0
    unchanged = tiny_model("zeros", seed=0)
    for old in (C.STATE_FILE_FORMAT_NAMED, C.STATE_FILE_FORMAT_TUPLES):
        assert C._state_identity({}, model, old) == C._state_identity({}, unchanged, old)  # the old rule's blind spot
    assert C._state_identity({}, model) != C._state_identity({}, unchanged)
