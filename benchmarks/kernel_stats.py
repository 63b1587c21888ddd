#!/usr/bin/env python
"""The fused kernels compiled for a Hopper GPU (sm_90) without one: shared memory, registers and spills.

Triton's ahead-of-time compiler builds each kernel of zeros_lm/ops_fused.py with the launchers' block
sizes and launch options, and ptxas (the one Triton ships) reports registers and spills: a proxy for
speed that needs no GPU (a kernel that spills is slow). Prints one Markdown table, a row per kernel and
head dimension (issue 26's target: no spills at d = 64, bf16, sm_90).

    python benchmarks/kernel_stats.py                      # bf16, d = 64 and 128, chunk 64
    python benchmarks/kernel_stats.py --head-dim 128 --dtype fp32

Exit status 3 when this Triton's compile API differs (tests skip then).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402

TRITON_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SM90 = 90
HEAD_DIMS = (64, 128)  # the head sizes the table covers by default
FLOAT_ARGS = ("scale",)  # the kernels' float (not pointer, not constexpr) arguments


def kernel_builds(head_dim: int, chunk: int, dtype: str, has_seg: bool = False):
    """(kernel, compile-time constants, launch options) of each kernel, as the launchers use them."""
    from zeros_lm import ops_fused as of

    q = torch.empty(1, chunk, 1, head_dim, dtype=TRITON_DTYPES[dtype])
    z = of._meta(q, q, chunk)
    consts = {"K": z["K"], "V": z["V"], "C": chunk, "DOT_PREC": z["DOT_PREC"], "LOWP": z["LOWP"], "F32": z["F32"],
              "HAS_SEG": has_seg}
    split, whole = dict(BK=z["BK_SPLIT"], BV=z["BV"]), dict(BK=z["BK"], BV=z["BV"])
    backward = dict(BK=z["BK"], BV=z["BV_BWD"])
    # The training path: no incoming state, no valid map, no zero-order gate (a non-first layer); the
    # launchers' default tiles and launch options (a GPU autotunes the states and output kernels' d_v block).
    scalars = dict(HAS_G0=False, HAS_VALID=False, HAS_STATE=False)
    logit = dict(D=head_dim, BT=of.LOGIT_BLOCK)
    return consts, [(of._scalars_fwd_kernel, dict(scalars, STORE_OUT=False), of._SCALARS_LAUNCH),
                    (of._states_fwd_kernel, dict(split, STORE_OUT=True, HAS_START=False), of._STATES_LAUNCH),
                    (of._output_fwd_kernel, whole, of._OUTPUT_LAUNCH),
                    (of._states_bwd_kernel, dict(split, HAS_START=False, LOAD_DOUT=False), of._STATES_LAUNCH),
                    (of._chunk_bwd_q_kernel, backward, of._CHUNK_BWD_LAUNCH),
                    (of._chunk_bwd_kv_kernel, backward, of._CHUNK_BWD_LAUNCH),
                    (of._scalars_bwd_kernel, dict(scalars, HAS_DOUT=False), of._SCALARS_LAUNCH),
                    # the layer's neighbours of the op: RoPE + L2 norm of q and k, the deviation logit s
                    (of._rope_norm_fwd_kernel, dict(D=head_dim, BR=of.ROPE_ROWS), {}),
                    (of._rope_norm_bwd_kernel, dict(D=head_dim, BR=of.ROPE_ROWS), {}),
                    (of._logit_fwd_kernel, dict(logit, HAS_VALID=False, HAS_SEG=False), of._LOGIT_LAUNCH),
                    (of._logit_bwd_kernel, dict(logit, HAS_VALID=False, HAS_SEG=False), of._LOGIT_LAUNCH)]


def ptxas_report(ptx: str) -> str:
    """ptxas -v on the PTX for sm_90a: 'R registers, S B spill stores, L B spill loads', or '-'."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newest PTX
        ptxas = os.path.join(bin_dir, name)
        if not os.path.exists(ptxas):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        text = out.stdout + out.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if regs and spills:
            return f"{regs.group(1)} | {spills.group(1)} | {spills.group(2)}"
    return "- | - | -"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS), help="one or more head dimensions")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(TRITON_DTYPES), default="bf16")
    p.add_argument("--packed", action="store_true", help="the variant for packed sequences sharing chunks")
    p.add_argument("--no-ptxas", action="store_true", help="shared memory only (faster)")
    args = p.parse_args()
    import triton

    from zeros_lm import ops_fused as of
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return 3
    # q, k, v, the output, its gradient and dq, dk, dv are in the model dtype (the launchers pass them so).
    pointers = {**{n: args.dtype for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "x", "y", "dy", "dx", "u",
                                           "du")}, "counts": "i64",
                "chunk_load": "i32", "chunk_store": "i32", "load_slot": "i32", "seg": "i32", "valid": "i1"}
    dims = ", ".join(map(str, args.head_dim))
    print(f"# fused kernels for sm_90: d = {dims}, chunk {args.chunk_size}, {args.dtype}"
          f"{', packed sequences' if args.packed else ''}, Triton {triton.__version__}\n")
    print("| kernel | warps | shared bytes | registers | spill stores B | spill loads B | d |\n"
          "|---|---:|---:|---:|---:|---:|---:|", flush=True)
    failed = 0
    for head_dim in args.head_dim:
        consts, builds = kernel_builds(head_dim, args.chunk_size, args.dtype, args.packed)
        for kernel, blocks, launch in builds:
            names = [param.name for param in kernel.params]
            constexprs = {n: v for n, v in {**consts, **blocks}.items() if n in names}
            signature = {n: "constexpr" if n in constexprs else "i32" if n in of.INT_ARGS else
                         "fp32" if n in FLOAT_ARGS else "*" + pointers.get(n, "fp32") for n in names}
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            except TypeError:
                return 3
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", SM90, 32), options=dict(launch))
            except Exception as err:  # one kernel the compiler rejects leaves the others' rows
                failed += 1
                print(f"| {kernel.__name__} | {launch.get('num_warps', 4)} | compile failed: "
                      f"{type(err).__name__} | - | - | - | {head_dim} |", flush=True)
                print(f"{kernel.__name__} (d = {head_dim}): {str(err).strip()[-2000:]}", file=sys.stderr)
                continue
            stats = "- | - | -" if args.no_ptxas else ptxas_report(compiled.asm["ptx"])
            print(f"| {kernel.__name__} | {launch.get('num_warps', 4)} | {compiled.metadata.shared} | {stats} | "
                  f"{head_dim} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
