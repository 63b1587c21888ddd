"""``python -m zeros_lm.cli``: the same as the ``zeros-lm`` command."""

import sys

from zeros_lm.cli import main

sys.exit(main())
