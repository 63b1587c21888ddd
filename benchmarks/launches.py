#!/usr/bin/env python
"""Kernel launches of one whole non-first ZeroS layer, forward and backward, on the CUDA code path: counted
on any machine, a CPU included, by purpose.

    python benchmarks/launches.py                       # ZeroS and softmax layers, T = 128, bf16 autocast
    python benchmarks/launches.py --attentions zeros --ops   # also every op name, by where it is called
    python benchmarks/launches.py --json launches.json

The layer is the attention module of layer 1 of a two-layer model (projections, RoPE and L2 norm, gates, the
logit s, the op, the per-head output norm, the output projection), run under bf16 autocast on its own input
(the first layer's output; float32, as the residual stream is), with the fused core (the Triton kernels) as
``attention_backend="auto"`` picks it on CUDA. Every aten op dispatched below autograd is recorded by a
TorchDispatchMode, the ops inside the core's custom ops included, and every Triton kernel launch by a hook on
Triton's launcher. Views, ``detach`` and the custom-op calls themselves launch nothing and are not counted;
everything else is a launch on CUDA (an allocation through the caching allocator is counted too: it costs
the host about as much). float64 ops (any float64 input or output) are counted apart as well.

On a machine without CUDA the same code path runs on CPU tensors: Triton's interpreter runs the kernels
(TRITON_INTERPRET=1 is set here before Triton is imported, unless the environment says otherwise), CPU
autocast stands in for CUDA autocast, and CUDA_PATH_PATCHES makes the few places that choose by device
choose as on CUDA (documented there; restored afterwards). The counts do not depend on B or the head count,
and on T only through the number of chunks where something loops over them. Differences from a GPU count:
CPU autocast's op lists are not CUDA's (both cast the projections to bf16 and keep the norms float32), and
SDPA picks the CPU flash kernel (one op forward, one backward, like CUDA's).

Prints two Markdown tables (by what the op does, by where it is called), each with forward / backward and
their float64 ops. ``count_launches`` returns the same as a dict (tests/test_launches.py bounds it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys

import torch

if not torch.cuda.is_available():  # before anything imports Triton (it reads this once, on import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# What an aten op does, by its name (the overload packet: "mm" for aten.mm.default). Anything not named
# here is "other" (elementwise arithmetic, comparisons, where, exp ...). NO_LAUNCH purposes are not counted.
OP_PURPOSES = {
    "view (no kernel)": (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "transpose", "t", "permute", "expand",
        "expand_as", "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "split_with_sizes", "narrow",
        "alias", "detach", "diagonal", "unfold", "view_as", "lift_fresh", "chunk", "movedim", "flatten",
        "unflatten", "view_as_real", "view_as_complex", "_neg_view", "_conj", "real", "imag"),
    "dtype cast": ("_to_copy", "to", "_autocast_to_reduced_precision", "_autocast_to_full_precision", "type_as"),
    "layout copy": (
        "clone", "contiguous", "copy_", "constant_pad_nd", "pad", "cat", "stack", "flip", "roll", "repeat",
        "repeat_interleave", "index_select", "gather", "index", "_unsafe_index", "index_put_", "index_put",
        "_index_put_impl_", "index_add_", "index_add", "index_copy_", "scatter", "scatter_", "scatter_add",
        "scatter_add_", "masked_scatter", "tril", "triu", "narrow_copy", "select_backward", "slice_backward",
        "index_select_backward", "unbind_copy", "split_with_sizes_copy"),
    "allocation": (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
        "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "fill_", "zero_", "arange",
        "scalar_tensor", "linspace"),
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "_scaled_mm", "einsum"),
    "attention kernel": (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
        "_flash_attention_backward", "_efficient_attention_backward"),
    "norm": ("native_layer_norm", "native_layer_norm_backward", "linalg_vector_norm", "norm", "_fused_rms_norm",
             "_fused_rms_norm_backward"),
    "reduction / scan": ("sum", "mean", "amax", "amin", "max", "min", "cumsum", "cummax", "cummin", "_logcumsumexp",
                         "logcumsumexp", "prod", "any", "all", "argmax", "argmin", "logsumexp", "_cummax_helper",
                         "_cummin_helper", "cumprod"),
    "host sync": ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose"),
}
OTHER = "other"
TRITON = "Triton kernel"
CUSTOM_OP_CALL = "custom-op call (no kernel)"  # the op node of a non-aten custom op; its body is counted
NO_OP = "returns its input (no kernel)"  # a non-in-place op whose outputs are its inputs (``to`` the same dtype)
# Work the CPU stand-in does that the CUDA path does not: the interpreter computes bfloat16 wrong, so ops_fused
# hands it float32 copies of bfloat16 operands (and casts the results back). Recorded, not counted.
INTERPRETER_ONLY = "interpreter only (not on CUDA)"
INTERPRETER_FUNCTIONS = ("_interpreted_bf16", "_from_interpreted")
NO_LAUNCH = ("view (no kernel)", CUSTOM_OP_CALL, NO_OP, INTERPRETER_ONLY)
PURPOSE_OF_OP = {name: purpose for purpose, names in OP_PURPOSES.items() for name in names}

# Where an op is called: the innermost function of zeros_lm on the call stack (for backward ops of autograd's
# own nodes, the stack that created the node) that is named here; other zeros_lm functions are "layer body"
# (projections, gates, L2 and output norms), no zeros_lm function at all "outside the layer".
REGION_OF_FUNCTION = {
    "_chunk_scalars": "per-token scalars",
    "_scalars_forward": "per-token scalars",
    "_scalars_backward": "per-token scalars",
    "_logits": "logit s",
    "apply_rope": "RoPE",
    "chunk_core_fused": "custom-op wrapper",
    "zeros_chunk_fused": "custom-op wrapper",
    "_zeros_chunk_forward": "custom-op wrapper",
    "_zeros_chunk_backward": "custom-op wrapper",
    "_zeros_chunk_backward_autograd": "custom-op wrapper",
    "_chunked_fused": "chunk layout (pack, pad)",
    "deviation_logits_fused": "logit s",
    "_logit_backward": "logit s",
    "rope_normalize_fused": "RoPE",
    "_rope_backward": "RoPE",
    "_forward_impl": "custom-op wrapper",
    "_backward_impl": "custom-op wrapper",
    "_backward": "custom-op wrapper",
    "_chunked": "chunk layout (pack, pad)",
    "_dispatch": "op entry (casts, masks)",
    "zeros_attention": "op entry (casts, masks)",
}
LAYER_BODY = "layer body (projections, gates, norms)"
OUTSIDE = "outside the layer"


def purpose_of(func) -> str:
    if func.namespace != "aten":
        return CUSTOM_OP_CALL
    return PURPOSE_OF_OP.get(func.overloadpacket.__name__, OTHER)


# ------------------------------------------------------------------------------------------------------------
# Choosing as on CUDA, on CPU tensors
# ------------------------------------------------------------------------------------------------------------

def _cpu_autocast_dtype(q):
    """The 16-bit dtype CUDA autocast would hand the op (here: CPU autocast's), else None."""
    if not torch.is_autocast_enabled(q.device.type):
        return None
    dtype = torch.get_autocast_dtype(q.device.type)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _blocked_cumsum(original):
    def cumsum_tokens(x, blocked=None):  # the two-level scan cumsum_tokens runs on CUDA
        return original(x, True if blocked is None else blocked)
    return cumsum_tokens


# zeros_lm function name -> a wrapper factory (original -> replacement). Applied in every loaded zeros_lm
# module that holds the function under that name, only while counting on CPU tensors. When the fused core
# does not run with them, count_launches raises: update this table to the code's new choice points.
CUDA_PATH_PATCHES = {
    "fused_applies": lambda original: lambda q, v: True,                      # mode "auto" takes the fused core
    "_autocast_product_dtype": lambda original: _cpu_autocast_dtype,           # autocast's 16-bit dtype reaches it
    "_tensor_core_products": lambda original: lambda x: x.dtype in (torch.float16, torch.bfloat16),
    "cumsum_tokens": _blocked_cumsum,
}


@contextlib.contextmanager
def cuda_path_on_cpu():
    """Apply CUDA_PATH_PATCHES; yields (patched names, names found nowhere)."""
    import zeros_lm  # noqa: F401  (loads ops and the model)
    from zeros_lm import ops  # noqa: F401
    with contextlib.suppress(ImportError):
        from zeros_lm import ops_fused  # noqa: F401
    modules = [m for name, m in list(sys.modules.items()) if m is not None and
               (name == "zeros_lm" or name.startswith("zeros_lm."))]
    undo, patched, missing = [], [], []
    for name, factory in CUDA_PATH_PATCHES.items():
        holders = [m for m in modules if callable(getattr(m, name, None))]
        if not holders:
            missing.append(name)
            continue
        originals = {}
        for m in holders:
            original = getattr(m, name)
            if id(original) not in originals:
                originals[id(original)] = factory(original)
            undo.append((m, name, original))
            setattr(m, name, originals[id(original)])
        patched.append(name)
    try:
        yield patched, missing
    finally:
        for m, name, original in reversed(undo):
            setattr(m, name, original)


# ------------------------------------------------------------------------------------------------------------
# The counter
# ------------------------------------------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')


def _zeros_lm_dir() -> str:
    import zeros_lm
    return os.path.dirname(os.path.abspath(zeros_lm.__file__)) + os.sep


def _region(functions) -> str:
    """functions: (file, name) of the zeros_lm frames, innermost first."""
    for _, name in functions:
        if name in REGION_OF_FUNCTION:
            return REGION_OF_FUNCTION[name]
    return LAYER_BODY if functions else OUTSIDE


class LaunchCounter(TorchDispatchMode):
    """Records every aten op dispatched (and the Triton kernels launched) while active, per phase."""

    def __init__(self):
        super().__init__()
        self.root = _zeros_lm_dir()
        self.phase = None
        self.records = collections.defaultdict(list)  # phase -> [(purpose, region, op name, float64)]
        self.in_kernel = 0

    # the call site
    def _live_functions(self):
        frame, out = sys._getframe(2), []
        while frame is not None:
            if frame.f_code.co_filename.startswith(self.root):
                out.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        return out

    def _node_functions(self):
        node = torch._C._current_autograd_node()
        stack = node.metadata.get("traceback_") if node is not None else None
        if not stack:
            return []
        frames = [m.groups() for entry in stack for m in _FRAME.finditer(entry)]
        return [(f, n) for f, n in reversed(frames) if f.startswith(self.root)]

    def record(self, purpose, name, float64, functions=None):
        if self.phase is None or self.in_kernel:
            return
        if functions is None:
            functions = self._live_functions() or self._node_functions()
        if functions and functions[0][1] in INTERPRETER_FUNCTIONS:
            purpose = INTERPRETER_ONLY
        self.records[self.phase].append((purpose, _region(functions), name, float64))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        purpose = purpose_of(func)
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if purpose == CUSTOM_OP_CALL:
            body = _custom_op_body(func)
            self.record(purpose, str(func.overloadpacket), False)
            if body is not None:  # run its Python body under this mode, so that its ops are counted
                with self:
                    return body(*args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        outs = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        if outs and not func.overloadpacket.__name__.endswith("_") and all(
                any(o is x for x in tensors) for o in outs):
            purpose = NO_OP  # e.g. ``to`` or ``contiguous`` with nothing to do (seen inside custom ops' bodies)
        float64 = any(x.dtype == torch.float64 for x in tensors + outs)
        self.record(purpose, func.overloadpacket.__name__, float64)
        return out

    @contextlib.contextmanager
    def counting(self, phase):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def summary(self, phase) -> dict:
        records = [r for r in self.records[phase] if r[0] not in NO_LAUNCH]
        by = lambda i: dict(collections.Counter(r[i] for r in records).most_common())  # noqa: E731
        f64 = [r for r in records if r[3]]
        return {
            "total": len(records),
            "float64": len(f64),
            "by_purpose": by(0),
            "by_region": by(1),
            "float64_by_purpose": dict(collections.Counter(r[0] for r in f64).most_common()),
            "float64_by_region": dict(collections.Counter(r[1] for r in f64).most_common()),
            "ops": dict(collections.Counter(f"{r[1]}: {r[2]}" for r in records).most_common()),
        }


def _custom_op_body(func):
    """The Python function behind a torch.library.custom_op (private API; None where it is not one)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
        opdef = _maybe_get_opdef(func)
    except (ImportError, AttributeError):
        return None
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


@contextlib.contextmanager
def triton_launch_hook(counter: LaunchCounter):
    """Counts each Triton kernel launch (compiled or interpreted) as a TRITON record, and keeps the
    interpreter's own tensor handling out of the count."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    classes = [jit.JITFunction, interpreter.InterpretedFunction]
    saved = [(cls, cls.run) for cls in classes]

    def wrap(run):
        def hooked(self, *args, warmup=False, **kwargs):
            if not warmup:
                name = getattr(getattr(self, "fn", None), "__name__", "kernel")
                counter.record(TRITON, name, False)
            counter.in_kernel += 1
            try:
                return run(self, *args, warmup=warmup, **kwargs)
            finally:
                counter.in_kernel -= 1
        return hooked

    for cls, run in saved:
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in saved:
            cls.run = run


# ------------------------------------------------------------------------------------------------------------
# One layer
# ------------------------------------------------------------------------------------------------------------

class _Captured(Exception):
    pass


def _layer_and_input(attention_type, T, heads, head_dim, chunk_size, batch, device):
    """(layer 1's attention module, its input hidden states (B, T, hidden) float32, its other positional
    arguments (the MixerContext, ...), its keyword arguments)."""
    from zeros_lm import ZeroSConfig, ZeroSForCausalLM

    torch.manual_seed(0)
    hidden = heads * head_dim
    cfg = ZeroSConfig(vocab_size=256, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                      intermediate_size=2 * hidden, chunk_size=chunk_size, attention_type=attention_type,
                      attention_backend="auto", tie_word_embeddings=False)
    model = ZeroSForCausalLM(cfg).to(device).train()
    attn = model.model.layers[1].attn
    if getattr(attn, "has_zero_order", False):
        raise RuntimeError("launches.py: layer 1 carries the zero-order term; it is meant to be a non-first layer")
    captured = {}

    def grab(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():  # the first layer runs as it would (no counting): its output is layer 1's input
            model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    x, *rest = captured["args"]  # the hidden states, then the mixer's context (and cache) as the block passes them
    return attn, x.detach(), rest, captured["kwargs"]


def count_launches(attention_type: str = "zeros", *, seq_len: int = 128, heads: int = 2, head_dim: int = 64,
                   chunk_size: int = 64, batch: int = 1, device: str | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launches of one forward and one backward of layer 1's attention (see the module docstring).

    Returns {"forward": summary, "backward": summary, "triton_kernels": {phase: {name: n}}, "device", "patched",
    "patches_missing", ...}; a summary is {"total", "float64", "by_purpose", "by_region", "float64_by_purpose",
    "float64_by_region", "ops"} (counts of launches; views and custom-op calls excluded).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type != "cuda"
    counter = LaunchCounter()
    with contextlib.ExitStack() as stack:
        patched, missing = stack.enter_context(cuda_path_on_cpu()) if on_cpu else ([], [])
        attn, x, rest, kwargs = _layer_and_input(attention_type, seq_len, heads, head_dim, chunk_size, batch, device)
        x.requires_grad_(True)
        stack.enter_context(triton_launch_hook(counter))

        def forward():
            with torch.autocast(device.type, dtype=dtype):
                return attn(x, *rest, **kwargs)

        out = forward()  # warm-up: lazy imports, Triton's compile (or rewrite) and autotuning
        grad = torch.randn_like(out)
        out.backward(grad)
        attn.zero_grad(set_to_none=True)
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        with counter:
            # anomaly mode keeps each autograd node's forward stack (for the backward's regions); no NaN checks
            with torch.autograd.set_detect_anomaly(True, check_nan=False), counter.counting("forward"):
                out = forward()
            with counter.counting("backward"):
                out.backward(grad)
    result = {"attention": attention_type, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
              "chunk_size": chunk_size, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
              "device": device.type, "patched": patched, "patches_missing": missing,
              "triton_version": _triton_version()}
    for phase in ("forward", "backward"):
        result[phase] = counter.summary(phase)
    result["triton_kernels"] = {phase: dict(collections.Counter(r[2] for r in counter.records[phase]
                                                                if r[0] == TRITON)) for phase in ("forward", "backward")}
    fused_ran = result["forward"]["by_purpose"].get(TRITON, 0) > 0
    if attention_type == "zeros" and _triton_version() and not fused_ran:
        raise RuntimeError("launches.py: the fused core did not run (no Triton kernel was launched); "
                           f"CUDA_PATH_PATCHES found {patched} (missing {missing}): update it to the code's "
                           "choice points")
    return result


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

def table(results: dict, key: str, title: str) -> str:
    """One Markdown table: rows = the union of the results' ``key`` entries; per attention forward / backward
    launches (float64 ones in brackets)."""
    rows = []
    for r in results.values():
        for phase in ("forward", "backward"):
            rows += [k for k in r[phase][key] if k not in rows]
    head = ["| " + title + " | " + " | ".join(f"{a} fwd | {a} bwd" for a in results) + " |",
            "|---|" + "---:|" * (2 * len(results))]

    def cell(r, phase, k):
        n, f64 = r[phase][key].get(k, 0), r[phase][f"float64_{key}"].get(k, 0)
        return f"{n}" + (f" ({f64})" if f64 else "") if n else "-"

    body = ["| " + k + " | " + " | ".join(f"{cell(r, 'forward', k)} | {cell(r, 'backward', k)}"
                                          for r in results.values()) + " |" for k in rows]
    total = ["| **total** | " + " | ".join(
        " | ".join(f"**{r[p]['total']}**" + (f" ({r[p]['float64']})" if r[p]["float64"] else "")
                   for p in ("forward", "backward")) for r in results.values()) + " |"]
    return "\n".join(head + body + total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attentions", nargs="+", default=["zeros", "softmax"], choices=["zeros", "softmax", "linear"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda when there is one (the real path), else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="the autocast dtype")
    p.add_argument("--ops", action="store_true", help="also list every op by where it is called")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    results = {a: count_launches(a, seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim,
                                 chunk_size=args.chunk_size, batch=args.batch, device=args.device, dtype=dtype)
               for a in args.attentions}
    first = next(iter(results.values()))
    where = ("CUDA" if first["device"] == "cuda" else
             f"CPU standing in for CUDA (Triton interpreter; patched: {', '.join(first['patched']) or 'nothing'}"
             + (f"; not found: {', '.join(first['patches_missing'])}" if first["patches_missing"] else "") + ")")
    print(f"# Kernel launches of one non-first layer: T = {args.seq_len}, B = {args.batch}, {args.heads} heads of "
          f"{args.head_dim}, chunk {args.chunk_size}, {args.dtype} autocast, fused core; {where}; "
          f"torch {torch.__version__}, Triton {first['triton_version']}\n")
    print("Launches (float64 ones in brackets); views, detach and custom-op calls launch nothing and are left out.\n")
    print("## By what the op does\n")
    print(table(results, "by_purpose", "purpose") + "\n")
    print("## By where it is called\n")
    print(table(results, "by_region", "region") + "\n")
    for a, r in results.items():
        kernels = {p: ", ".join(f"{k} x{n}" for k, n in r["triton_kernels"][p].items()) or "none"
                   for p in ("forward", "backward")}
        print(f"{a}: Triton kernels forward: {kernels['forward']}; backward: {kernels['backward']}")
    if args.ops:
        for a, r in results.items():
            for phase in ("forward", "backward"):
                print(f"\n## {a} {phase}: every op (region: op x count)\n")
                for k, n in r[phase]["ops"].items():
                    print(f"- {k} x{n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
