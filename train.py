#!/usr/bin/env python
"""Pretrain a ZeroS language model: a thin wrapper of ``zeros-lm train`` (zeros_lm/cli/train.py).

    python train.py                                   # the embedded default (configs/default.yaml)
    python train.py --config configs/smoke.yaml       # a few steps
    python train.py --help
"""

import sys

from zeros_lm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
