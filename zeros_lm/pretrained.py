"""Load an exported model directory strictly: weights that do not fit its config are an error.

``from_pretrained`` only logs missing, unexpected or reshaped weights and initialises the missing ones at
random, so a directory whose weights file was replaced (say by a state file) loads and produces noise.
Everything in this package that loads a model directory (generation, ``--model.init_from``, the server)
goes through :func:`load_pretrained`, which refuses such a directory in one message.
"""

from __future__ import annotations

import torch

from .modeling_zeros import ZeroSForCausalLM

SHOWN_WEIGHT_NAMES = 3  # weight names an error about a model directory's weights shows per kind
_LOADING_PROBLEMS = (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                     ("mismatched_keys", "of another shape"))


def weights_problem(loading: dict) -> str | None:
    """What ``from_pretrained(..., output_loading_info=True)`` reports as wrong with the weights it
    read (missing, unexpected or mismatched ones), in a few words; None if nothing."""
    parts = []
    for key, word in _LOADING_PROBLEMS:
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in loading.get(key) or ())
        if names:
            more = f", ... {len(names) - SHOWN_WEIGHT_NAMES} more" if len(names) > SHOWN_WEIGHT_NAMES else ""
            parts.append(f"{len(names)} {word}: {', '.join(names[:SHOWN_WEIGHT_NAMES])}{more}")
    return "; ".join(parts) or None


class WeightsMismatchError(ValueError):
    """A model directory whose weights do not fit its ``config.json``."""


def load_pretrained(path, dtype: torch.dtype = torch.float32) -> ZeroSForCausalLM:
    """``ZeroSForCausalLM.from_pretrained(path, dtype=dtype)`` (in eval mode), or WeightsMismatchError
    naming the weights that are missing, unexpected or of another shape."""
    model, loading = ZeroSForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problem = weights_problem(loading)
    if problem:
        raise WeightsMismatchError(
            f"the weights in '{path}' do not fit its config.json ({problem}); it would generate noise: "
            "export the model again (python -m zeros_lm.export CHECKPOINT DIR)"
        )
    return model


__all__ = ["SHOWN_WEIGHT_NAMES", "WeightsMismatchError", "load_pretrained", "weights_problem"]
