"""generate.py's decoding options default to "unset": the model's generation_config.json applies."""

import shutil
import subprocess
import sys
from pathlib import Path

from transformers import GenerationConfig

REPO = Path(__file__).resolve().parents[1]


def _generate_module():
    from zeros_lm.cli import generate

    return generate


def test_unset_options_leave_the_generation_config_in_charge():
    gen = _generate_module()
    args = gen.parse_args(["model"])
    assert gen.generation_kwargs(args, GenerationConfig(max_new_tokens=7, do_sample=True)) == {"prefill_chunk_size": 2048}
    # a config without a length gets the CLI's default length, and nothing else
    assert gen.generation_kwargs(args, GenerationConfig()) == {
        "prefill_chunk_size": 2048, "max_new_tokens": gen.DEFAULT_MAX_NEW_TOKENS}
    # options given on the command line win; a sampling option asks for sampling; --greedy forces greedy
    given = gen.parse_args(["model", "--max-new-tokens", "5", "--top-k", "3", "--repetition-penalty", "1.2"])
    assert gen.generation_kwargs(given, GenerationConfig(max_new_tokens=7)) == {
        "prefill_chunk_size": 2048, "max_new_tokens": 5, "top_k": 3, "do_sample": True, "repetition_penalty": 1.2}
    greedy = gen.parse_args(["model", "--greedy", "--temperature", "0.5"])
    assert gen.generation_kwargs(greedy, GenerationConfig())["do_sample"] is False
    assert "temperature" not in gen.generation_kwargs(greedy, GenerationConfig())


def test_generate_py_uses_the_exported_generation_config(saved_models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_models["zeros"], model_dir)
    GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=0, pad_token_id=1).save_pretrained(model_dir)
    res = subprocess.run([sys.executable, str(REPO / "generate.py"), str(model_dir), "--prompt", "import os",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "generated: 3 tokens" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "generate.py"), str(model_dir), "--prompt", "import os",
                          "--device", "cpu", "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "generated: 5 tokens" in res.stderr
