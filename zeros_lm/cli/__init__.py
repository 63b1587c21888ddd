"""The command line: ``zeros-lm <command> [options]`` (one entry point, as litgpt and the HF CLIs have).

    zeros-lm train    [--config FILE.yaml ...] [--model.hidden_size 384 ...]     pretrain (train.py)
    zeros-lm generate MODEL_DIR [--prompt TEXT ...]                               stream text (generate.py)
    zeros-lm export   CHECKPOINT OUT_DIR [...]                                    checkpoint -> HF directory
    zeros-lm linearize TEACHER --out DIR [...]                                    softmax model -> ZeroS / hybrid
    zeros-lm serve    MODEL_DIR [--port 8000 ...]                                 OpenAI-compatible server (serve.py)

``zeros-lm <command> --help`` lists a command's options. The root scripts ``train.py`` and
``generate.py`` and ``python -m zeros_lm.export`` are thin wrappers of the same code.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line description); each module has main(argv) -> exit status
COMMANDS = {
    "train": ("zeros_lm.cli.train", "pretrain a model (LightningCLI: --config, --model.*, --data.*, --trainer.*)"),
    "generate": ("zeros_lm.cli.generate", "stream text from a model directory, with its recurrent state"),
    "export": ("zeros_lm.export", "export a training checkpoint as a Hugging Face directory"),
    "linearize": ("zeros_lm.cli.linearize", "convert a pretrained softmax model (Llama family, GGUF) into ZeroS"),
    "serve": ("zeros_lm.cli.serve", "serve a model directory over an OpenAI-compatible HTTP API"),
}
EXIT_USAGE = 2


def _usage() -> str:
    lines = ["usage: zeros-lm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines + ["", "zeros-lm <command> --help shows the options of a command."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"zeros-lm {command}", *rest]  # what the command's --help and errors call it; its own arguments
    return module.main(rest)
