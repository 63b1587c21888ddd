#!/usr/bin/env bash
# The GPU checks and benchmarks of the fused kernels in one run, for a lent CUDA machine (H100 / H200):
# the tests that need a GPU (the compiled kernels against the float64 reference, bf16 on model
# activations), then the op, training and packed-training benchmarks. Each stage writes its log or
# Markdown table under $OUT as soon as it ends, so a run cut short still returns what it finished.
#
#   OUT=gpu_out bash scripts/gpu_check.sh                  # every stage
#   OUT=gpu_out bash scripts/gpu_check.sh ops train        # some stages
#
# Wheels in .whl/ (e.g. fla-core, the yardstick of the op table) are installed first into /tmp/site.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PWD:/tmp/site"
fi

# The 117M model of the README's training table, and the op table's shape.
MODEL=(--hidden-size 768 --layers 12 --heads 12 --vocab-size 32000 --tokens-per-step 16384)
OP_SHAPE=(--batch 2 --heads 12 --head-dim 64)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests profile ops train packed compiled)

summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND under a time limit into $OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    summary "stage $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
}

for s in "${STAGES[@]}"; do
    case $s in
    env)
        { nvidia-smi -L; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton',
triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0))"; } 2>&1 \
            | tee -a "$OUT/summary.txt"
        # flash-linear-attention autotunes on first use: warm its on-disk cache while the tests run
        if $PY -c "import fla" 2>/dev/null; then
            timeout 300 $PY - >"$OUT/fla_warm.txt" 2>&1 <<'EOF' &
import torch, time
from benchmarks.ops import fla_simple_gla, make_inputs
t = time.time()
x = make_inputs(4096, torch.device("cuda"), torch.bfloat16, True, 2, 12, 64)
fla_simple_gla(*x).float().sum().backward()
torch.cuda.synchronize()
print(f"fla autotuned in {time.time() - t:.0f} s")
EOF
        fi
        ;;
    tests)  # the compiled kernels against the reference, and the model in bf16 (-s prints its error figures)
        stage tests 240 $PY -m pytest -q -s -p no:cacheprovider ${TESTS:-tests/test_fused.py \
            tests/test_ops.py::test_auto_picks_fused_on_cuda tests/test_ops.py::test_fused_mode_with_the_real_kernels \
            tests/test_ops.py::test_fused_kernels_with_packed_sequences_sharing_chunks \
            tests/test_ops.py::test_shared_chunks_with_padding_and_extreme_logits \
            tests/test_packed.py::test_softmax_varlen_on_cuda_within_bf16_noise_of_the_mask}
        ;;
    profile)  # where the 117M ZeroS training step spends its time
        stage profile 120 $PY benchmarks/profile_step.py --device cuda --precision bf16 --seq-len 2048 \
            --warmup 3 --steps 3 --rows 40 "${MODEL[@]}"
        ;;
    ops)
        wait  # the fla warm-up
        stage ops 240 $PY benchmarks/ops.py --device cuda --dtype bf16 --lengths ${OP_LENGTHS:-2048,4096,8192,16384} \
            --repeats 10 "${OP_SHAPE[@]}"
        ;;
    train)
        stage train 240 $PY benchmarks/train.py --device cuda --precision bf16 --seq-lens 2048 8192 \
            --warmup 3 --steps 6 "${MODEL[@]}"
        ;;
    train_torch)  # the PyTorch chunked path of the same model (the before of the fused kernels)
        stage train_torch 120 $PY benchmarks/train.py --device cuda --precision bf16 --seq-lens 2048 \
            --attentions zeros --attention-backend torch --warmup 2 --steps 4 "${MODEL[@]}"
        ;;
    packed)
        stage packed 150 $PY benchmarks/packed.py --device cuda --precision bf16 --seq-lens 2048 \
            --attentions zeros softmax --repeats 3 --hidden-size 768 --layers 12 --heads 12 --vocab-size 32000 \
            --tokens-per-step 16384
        ;;
    compiled)
        stage compiled 300 $PY benchmarks/train.py --device cuda --precision bf16 --seq-lens ${COMPILED_SEQ_LENS:-2048 8192} \
            --attentions ${COMPILED_ATTENTIONS:-zeros softmax} --warmup 3 --steps 6 --compile "${MODEL[@]}"
        ;;
    *)
        summary "unknown stage $s"
        ;;
    esac
done
wait
