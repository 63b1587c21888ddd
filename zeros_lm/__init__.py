"""zeros-lm: language models built on ZeroS (zero-sum linear attention)."""

__version__ = "0.1.0"
