"""One way in: ``zeros-lm <command>`` dispatches to the same code as the root scripts."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "zeros_lm.cli", *args], capture_output=True, text=True, timeout=120)


def test_usage_and_unknown_command():
    res = _cli()
    assert res.returncode == 2 and "usage: zeros-lm <command>" in res.stdout
    for name in ("train", "generate", "export"):
        assert f"  {name} " in res.stdout
    res = _cli("bogus")
    assert res.returncode == 2 and res.stderr.strip() == "error: unknown command 'bogus'; choose one of " + ", ".join(
        __import__("zeros_lm.cli", fromlist=["COMMANDS"]).COMMANDS)


def test_commands_reach_their_modules():
    res = _cli("generate", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: zeros-lm generate") and "--save-state" in res.stdout
    res = _cli("export", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: zeros-lm export") and "--dtype" in res.stdout
    res = _cli("train", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: zeros-lm train") and "--model.hidden_size" in res.stdout
    res = _cli("generate", "/nonexistent-model-dir", "--prompt", "x")
    assert res.returncode == 2 and "does not exist" in res.stderr
