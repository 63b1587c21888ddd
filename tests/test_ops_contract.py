"""The chunk core's contract (zeros_lm/ops_contract.py): one chunk-size rule, one flat ordering."""

import warnings

import pytest
import torch

from zeros_lm.configuration_zeros import ZeroSConfig
from zeros_lm.ops_contract import (ChunkScalars, CoreLayout, check_chunk_size, flatten, kernel_chunk_size,
                                   unflatten)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "64", None])
def test_one_chunk_size_rule_for_the_op_and_the_config(bad):
    with pytest.raises(ValueError, match=f"zeros_attention: chunk_size must be a positive integer, got {bad!r}"):
        check_chunk_size(bad, "zeros_attention: chunk_size")
    with pytest.raises(ValueError, match=f"ZeroSConfig.chunk_size must be a positive integer, got {bad!r}"):
        ZeroSConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, chunk_size=bad)


def test_kernel_chunk_keeps_tiles_and_says_when_it_rounds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_chunk_size(64, 10_000) == 64
        assert kernel_chunk_size(128, 10_000) == 128
        assert kernel_chunk_size(64, 5) == 16          # a short call: one tile of the smallest size
        assert kernel_chunk_size(64, 40) == 64
    for requested, tile in ((8, 16), (48, 64), (100, 128)):
        with pytest.warns(UserWarning, match=f"chunk_size = {requested} is not a power of two"):
            assert kernel_chunk_size(requested, 10_000) == tile


def test_flat_convention_round_trips():
    B, H, N, C, d = 2, 3, 2, 4, 5
    tok = lambda: torch.randn(B, H, N * C)  # noqa: E731
    chunk = lambda: torch.randn(B, H, N)  # noqa: E731
    scalars = ChunkScalars(tok(), tok(), tok(), tok(), tok(), chunk(), chunk(), chunk(), chunk())
    q, k, v = (torch.randn(B, N * C, H, d) for _ in range(3))
    starts = torch.randn(B, H, 3, d, d)
    layout = CoreLayout(torch.zeros(B, N, dtype=torch.long), torch.full((B, N), -1), 0, C, plan=None,
                        segments=torch.zeros(B, N * C, dtype=torch.long))
    args, kwargs = flatten(q, k, v, scalars, starts, layout)
    assert len(args) == 17 and args[3] is scalars.s and args[11] is scalars.sb1 and args[12] is starts
    q2, k2, v2, scalars2, starts2, layout2 = unflatten(args, **kwargs)
    assert (q2, k2, v2, starts2) == (q, k, v, starts)
    assert all(x is y for x, y in zip(scalars2.tensors(), scalars.tensors()))
    assert layout2 == layout
    scalars.check(B, H, N * C, N, "here")
    with pytest.raises(ValueError, match=r"here: sb0 must have shape \(2, 3, 2\)"):
        ChunkScalars(*scalars.tensors()[:7], torch.zeros(1), scalars.sb1).check(B, H, N * C, N, "here")
    with pytest.raises(TypeError, match="17 positional arguments"):
        unflatten(args[:-1])
