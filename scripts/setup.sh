#!/usr/bin/env bash
# Set up zeros-lm in a virtual environment at .venv (created if missing): torch first, then the rest.
#
# torch is installed first and pinned to 2.13.0 only when the environment has none (or one older than the
# floor in zeros_lm/_torch_floor.py): on a CPU machine
# that is the CPU wheel (a plain `pip install torch` would pull a CUDA build of several GB). With a
# torch already present (e.g. your own CUDA build in an activated venv) it is kept as it is.
#
#   ZEROS_VENV=path   use another venv location;  ZEROS_VENV=none   install into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${ZEROS_VENV:-.venv}"
if [ "$venv" != "none" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
else
  py=python3
fi

"$py" -m pip install -q --upgrade pip
# No torch, or one below the package's floor (zeros_lm/_torch_floor.py): install the pinned one first,
# so that pip never resolves the floor by pulling a default (CUDA) build on a CPU machine.
if ! "$py" -c "import sys; sys.path.insert(0, 'zeros_lm'); from _torch_floor import check_torch_version; check_torch_version()" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".[dev,gguf]"
"$py" -c "import torch, transformers, lightning, deepspeed; print(f'zeros-lm ready: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}')" 2>&1 | grep -v "^\[" || true
