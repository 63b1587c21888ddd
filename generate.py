#!/usr/bin/env python
"""Stream text from a saved ZeroS model: a thin wrapper of ``zeros-lm generate`` (zeros_lm/cli/generate.py).

    python generate.py MODEL_DIR --prompt "def main():" --max-new-tokens 200
"""

import sys

from zeros_lm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
