#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 26 in one run on a lent CUDA machine (one H100 / H200), in under
# 8 minutes (BUDGET seconds, default 450, the whole run), so that a 15-minute device window holds a run
# and a rerun:
#   env        the card and library versions (into summary.txt)
#   tests      the tests that need a GPU: the compiled kernels against the float64 reference, bf16 on
#              model activations (-s prints their error figures)
#   launches   kernel launches of one non-first ZeroS layer and a softmax layer on CUDA (the real path of
#              the CPU count in tests/test_launches.py)
#   ops        the op table: B*T = 32768 per row, CUDA events, the fused kernels against fla's
#              chunk_simple_gla with a per-head decay and with a per-token gate
#   train      the 117M LM, ZeroS against softmax of equal parameters, seq_len 2048 and 8192 at 16k tokens
#              per step
#   train_long the same at seq_len 16384 with 32k tokens per step
#   profile    where the 117M ZeroS training step spends its time (seq_len 2048)
# Optional stages (not in the default list, too long for the window): train_torch, packed, compiled,
# kernel_stats (registers / spills for sm_90; needs no GPU).
#
#   OUT=gpu_out bash scripts/gpu_check.sh                  # every default stage
#   OUT=gpu_out bash scripts/gpu_check.sh ops train        # some stages
#   OUT=/tmp/dry DEVICE=cpu TINY=1 TESTS=tests/test_launches.py bash scripts/gpu_check.sh   # a dry run on CPU
#
# Each stage runs under `timeout` (its own limit, cut to what is left of BUDGET; skipped with under
# MIN_STAGE seconds left), writes its stdout (the Markdown tables) to $OUT/NAME.md and its log to
# $OUT/NAME.log as soon as it ends, and a failing stage does not stop the next. $OUT/summary.txt gets one
# line per stage (exit status, seconds) and the total. Wheels in .whl/ (e.g. fla-core, the op table's
# yardstick) are installed first into /tmp/site.
set -u
START=$SECONDS
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-450}
MIN_STAGE=${MIN_STAGE:-20}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PWD:/tmp/site"
fi

if [ "${TINY:-0}" = 1 ]; then  # the dry run's sizes: every command, in seconds on a CPU
    MODEL=(--hidden-size 32 --layers 2 --heads 2 --vocab-size 64 --chunk-size 16)
    TOKENS=64; LONG_TOKENS=128; SEQ=(16 32); LONG_SEQ=64; PROFILE_SEQ=32
    OP_ARGS=(--lengths 32 --tokens 64 --heads 2 --head-dim 16 --repeats 1 --methods zeros,sdpa)
    LAUNCH_ARGS=(--seq-len 64); STEPS=(--warmup 1 --steps 1)
else  # the README's 117M model and the op table's shape
    MODEL=(--hidden-size 768 --layers 12 --heads 12 --vocab-size 32000)
    TOKENS=16384; LONG_TOKENS=32768; SEQ=(2048 8192); LONG_SEQ=16384; PROFILE_SEQ=2048
    OP_ARGS=(--lengths ${OP_LENGTHS:-2048,4096,8192,16384} --tokens 32768 --heads 12 --head-dim 64 --repeats 10
             --methods ${OP_METHODS:-fused,fla,fla_g,sdpa})
    LAUNCH_ARGS=(--seq-len 2048 --heads 12); STEPS=(--warmup 3 --steps 6)
fi
PRECISION=(--device "$DEVICE" --precision bf16)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests launches ops train train_long profile)

summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME SECONDS COMMAND...: COMMAND under min(SECONDS, what is left of BUDGET)
    local name=$1 limit=$2 start=$SECONDS rc left
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt "$MIN_STAGE" ]; then
        summary "stage $name: SKIPPED, $left s of the $BUDGET s budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 10 "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
    rc=$?
    case $rc in
    0) summary "stage $name: ok after $((SECONDS - start)) s (limit $limit s)" ;;
    124 | 137) summary "stage $name: TIMED OUT after $((SECONDS - start)) s (limit $limit s)" ;;
    *) summary "stage $name: FAILED, exit $rc after $((SECONDS - start)) s (limit $limit s): $(tail -n 1 "$OUT/$name.log")" ;;
    esac
}

FLA_PID=""
for s in "${STAGES[@]}"; do
    case $s in
    env)
        { command -v nvidia-smi >/dev/null && nvidia-smi -L
          timeout 60 $PY -c "import torch, transformers
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'
print('torch', torch.__version__, '| triton', tv, '| transformers', transformers.__version__, '|', name)"
          git log -1 --format='commit %h %cd' 2>/dev/null; } 2>&1 | tee -a "$OUT/summary.txt"
        # flash-linear-attention autotunes on first use: warm its on-disk cache (both gate forms) while the
        # tests run; the ops stage waits for it
        if [ "$DEVICE" = cuda ] && $PY -c "import fla" 2>/dev/null; then
            timeout -k 5 120 $PY - >"$OUT/fla_warm.log" 2>&1 <<'EOF' &
import time
import torch
from benchmarks.ops import fla_simple_gla, fla_simple_gla_gated, make_inputs
t = time.time()
for fn in (fla_simple_gla, fla_simple_gla_gated):
    x = make_inputs(4096, torch.device("cuda"), torch.bfloat16, True, 8, 12, 64)
    fn(*x).float().sum().backward()
torch.cuda.synchronize()
print(f"fla autotuned in {time.time() - t:.0f} s")
EOF
            FLA_PID=$!
        fi
        ;;
    tests)
        stage tests 120 $PY -m pytest -q -s -p no:cacheprovider ${TESTS:-tests/test_fused.py \
            tests/test_ops.py::test_auto_picks_fused_on_cuda tests/test_ops.py::test_fused_mode_with_the_real_kernels \
            tests/test_ops.py::test_fused_kernels_with_packed_sequences_sharing_chunks \
            tests/test_ops.py::test_shared_chunks_with_padding_and_extreme_logits \
            tests/test_packed.py::test_softmax_varlen_on_cuda_within_bf16_noise_of_the_mask}
        ;;
    launches)
        stage launches 60 $PY benchmarks/launches.py --device "$DEVICE" "${LAUNCH_ARGS[@]}" --ops \
            --json "$OUT/launches.json"
        ;;
    ops)
        [ -n "$FLA_PID" ] && wait "$FLA_PID"
        stage ops 120 $PY benchmarks/ops.py --device "$DEVICE" --dtype bf16 "${OP_ARGS[@]}"
        ;;
    train)
        stage train 100 $PY benchmarks/train.py "${PRECISION[@]}" --seq-lens "${SEQ[@]}" --tokens-per-step "$TOKENS" \
            "${STEPS[@]}" "${MODEL[@]}" --json "$OUT/train.json"
        ;;
    train_long)
        stage train_long 70 $PY benchmarks/train.py "${PRECISION[@]}" --seq-lens "$LONG_SEQ" \
            --tokens-per-step "$LONG_TOKENS" "${STEPS[@]}" "${MODEL[@]}" --json "$OUT/train_long.json"
        ;;
    profile)
        stage profile 45 $PY benchmarks/profile_step.py "${PRECISION[@]}" --seq-len "$PROFILE_SEQ" \
            --tokens-per-step "$TOKENS" --warmup 2 --steps 2 --rows 30 "${MODEL[@]}"
        ;;
    train_torch)  # the PyTorch chunked path of the same model (the before of the fused kernels)
        stage train_torch 120 $PY benchmarks/train.py "${PRECISION[@]}" --seq-lens "${SEQ[0]}" --tokens-per-step \
            "$TOKENS" --attentions zeros --attention-backend torch "${STEPS[@]}" "${MODEL[@]}"
        ;;
    packed)
        stage packed 150 $PY benchmarks/packed.py "${PRECISION[@]}" --seq-lens "${SEQ[0]}" --attentions zeros softmax \
            --repeats 3 --tokens-per-step "$TOKENS" "${MODEL[@]}"
        ;;
    compiled)
        stage compiled 300 $PY benchmarks/train.py "${PRECISION[@]}" --seq-lens ${COMPILED_SEQ_LENS:-${SEQ[*]}} \
            --tokens-per-step "$TOKENS" --attentions ${COMPILED_ATTENTIONS:-zeros softmax} "${STEPS[@]}" --compile \
            "${MODEL[@]}"
        ;;
    kernel_stats)
        stage kernel_stats 150 env -u TRITON_INTERPRET $PY benchmarks/kernel_stats.py
        ;;
    *)
        summary "unknown stage $s"
        ;;
    esac
done
[ -n "$FLA_PID" ] && kill "$FLA_PID" 2>/dev/null
wait
summary "total $((SECONDS - START)) s (budget $BUDGET s); tables in $OUT/*.md, logs in $OUT/*.log"
