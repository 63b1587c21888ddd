"""The oldest torch that zeros-lm works with, checked when the package is imported.

transformers 5.x disables its PyTorch side below torch 2.6 ("PyTorch >= 2.6 is required"), after
which the model classes cannot even be imported; ``pip`` would keep an older torch that an
environment already has (for example the one in a Docker base image) if the package accepted it.
``pyproject.toml`` states the same floor (``torch>=2.6``); a test checks that the two agree.
"""

from __future__ import annotations

import re

__all__ = ["TORCH_MIN_VERSION", "check_torch_version"]

TORCH_MIN_VERSION = "2.6"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string; local parts and pre-releases are ignored, so
    ``2.6.0a0+gitabc`` (what NVIDIA's containers ship) counts as 2.6.0."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ImportError(f"zeros-lm cannot read the installed torch version {version!r}")
    return tuple(int(x) for x in match.group(1).split("."))


def check_torch_version(version: str | None = None) -> None:
    """Raise an ImportError saying what to do if ``version`` (default: the installed torch's) is
    older than :data:`TORCH_MIN_VERSION`."""
    if version is None:
        import torch

        version = str(torch.__version__)
    floor = _release(TORCH_MIN_VERSION)
    if _release(version)[: len(floor)] < floor:
        raise ImportError(
            f"zeros-lm needs torch >= {TORCH_MIN_VERSION} (transformers 5 disables PyTorch below it), "
            f"found torch {version}; upgrade it, e.g. pip install 'torch>={TORCH_MIN_VERSION}'"
        )

