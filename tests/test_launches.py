"""benchmarks/launches.py: the kernel launches of one non-first layer on the CUDA code path, counted on CPU.

A regression bound on the count (not a timing), and checks that the counter counts what it claims to.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.launches import (CUDA_PATH_PATCHES, OTHER, TRITON, LaunchCounter, count_launches, cuda_path_on_cpu,
                                 table)

pytest.importorskip("triton")
# The bounds are the CPU stand-in's counts; on a CUDA machine scripts/gpu_check.sh's launches stage counts the
# real path instead (and Triton there is not the interpreter this needs).
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CUDA path on CPU; gpu_check.sh counts on CUDA")

# Measured 2026-11 on the CPU stand-in (torch 2.13, Triton 3.9 interpreter; T = 128, bf16 autocast, fused core).
# Issue 26's targets are <= 30 forward, <= 45 backward and no float64 op: lower these as the kernels get
# there, never raise them.
# 161 / 234 with the per-token scalars in PyTorch (float32); 27 / 45 (2026-12-05) with the scalars, the logit
# s and RoPE + L2 norm in Triton kernels, the chunk layout built once per batch and the projection's
# gradient assembled in one concatenation.
ZEROS_FORWARD_BOUND, ZEROS_BACKWARD_BOUND = 27, 45
ZEROS_FLOAT64_FORWARD_BOUND, ZEROS_FLOAT64_BACKWARD_BOUND = 0, 0
# A softmax layer (projections, RoPE, one SDPA kernel, output projection) measured 15 / 24: a sane range.
SOFTMAX_FORWARD_RANGE, SOFTMAX_BACKWARD_RANGE = (8, 30), (12, 45)
SEQ_LEN = 128


@pytest.fixture(scope="module")
def zeros_counts():
    return count_launches("zeros", seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def softmax_counts():
    return count_launches("softmax", seq_len=SEQ_LEN)


@cpu_only
def test_zeros_layer_launches_stay_within_the_recorded_bound(zeros_counts):
    fwd, bwd = zeros_counts["forward"], zeros_counts["backward"]
    assert fwd["total"] <= ZEROS_FORWARD_BOUND, table({"zeros": zeros_counts}, "by_region", "region")
    assert bwd["total"] <= ZEROS_BACKWARD_BOUND, table({"zeros": zeros_counts}, "by_region", "region")
    assert fwd["float64"] <= ZEROS_FLOAT64_FORWARD_BOUND and bwd["float64"] <= ZEROS_FLOAT64_BACKWARD_BOUND
    # the fused core ran (count_launches raises otherwise), and the layer's own products were seen
    assert fwd["by_purpose"][TRITON] >= 1 and bwd["by_purpose"][TRITON] >= 1
    assert fwd["by_purpose"]["matmul"] >= 2 and bwd["by_purpose"]["matmul"] >= 2  # qkvu and o projections
    # every launch has a purpose and a region: the tables add up to the total
    for phase in (fwd, bwd):
        assert sum(phase["by_purpose"].values()) == sum(phase["by_region"].values()) == phase["total"]
    assert zeros_counts["patches_missing"] == [] or zeros_counts["device"] == "cuda"


@cpu_only
def test_softmax_layer_count_is_in_a_sane_range(softmax_counts):
    fwd, bwd = softmax_counts["forward"], softmax_counts["backward"]
    assert SOFTMAX_FORWARD_RANGE[0] <= fwd["total"] <= SOFTMAX_FORWARD_RANGE[1], fwd
    assert SOFTMAX_BACKWARD_RANGE[0] <= bwd["total"] <= SOFTMAX_BACKWARD_RANGE[1], bwd
    assert fwd["by_purpose"]["attention kernel"] == 1 and bwd["by_purpose"]["attention kernel"] == 1
    assert fwd["float64"] == bwd["float64"] == 0
    assert TRITON not in fwd["by_purpose"]


def test_the_counter_counts_each_launch_once_and_views_not_at_all():
    x = torch.randn(4, 8)
    counter = LaunchCounter()

    def count(fn):
        counter.records.clear()
        with counter, counter.counting("forward"):
            fn()
        return counter.summary("forward")

    one = count(lambda: x.exp())
    two = count(lambda: x.exp().mul(2.0))
    assert one["total"] == 1 and two["total"] == 2  # one more op, one more launch
    views = count(lambda: x.view(8, 4).transpose(0, 1)[1:].unsqueeze(0))
    assert views["total"] == 0
    noop = count(lambda: x.to(torch.float32).contiguous())  # nothing to do: no kernel
    assert noop["total"] == 0
    cast = count(lambda: x.double().sum())
    assert cast["total"] == 2 and cast["float64"] == 2 and cast["by_purpose"] == {"dtype cast": 1, "reduction / scan": 1}
    outside = count(lambda: x + 1)
    assert outside["by_region"] == {"outside the layer": 1} and outside["by_purpose"] == {OTHER: 1}


def test_backward_ops_are_counted_and_attributed_to_the_code_that_built_them():
    from zeros_lm.modeling_zeros import apply_rope

    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    cos, sin = torch.ones(1, 4, 1, 4), torch.zeros(1, 4, 1, 4)
    counter = LaunchCounter()
    with counter:
        with torch.autograd.set_detect_anomaly(True, check_nan=False), counter.counting("forward"):
            y = apply_rope(x, cos, sin)
        grad = torch.ones_like(y)
        with counter.counting("backward"):
            y.backward(grad)
    assert counter.summary("forward")["by_region"].keys() == {"RoPE"}
    bwd = counter.summary("backward")
    assert bwd["total"] > 0 and bwd["by_region"].get("RoPE", 0) == bwd["total"], bwd


@cpu_only
def test_cuda_path_patches_apply_while_counting_and_are_undone():
    import sys

    def functions():
        return {(name, attr): getattr(m, attr) for name, m in list(sys.modules.items())
                if name.startswith("zeros_lm") and m is not None for attr in CUDA_PATH_PATCHES if hasattr(m, attr)}

    with cuda_path_on_cpu() as (patched, missing):
        inside = functions()
    before = functions()
    assert patched and set(patched) | set(missing) == set(CUDA_PATH_PATCHES)
    assert all(inside[key] is not before[key] for key in before if key[1] in patched)
