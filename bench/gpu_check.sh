#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100/H200, 16 cores, no network), run from anywhere:
#   bash bench/gpu_check.sh
# 1. GPU info (nvidia-smi)
# 2. build the CUDA extension: MAX_JOBS=16 OPD_FAST_CUDA_ARCHS=90 pip install -e .
# 3. pytest python_tests/test_cuda.py (skipped, not failed, if the file is not there), and
#    the CUDA-marked tests of python_tests/test_linear.py
# 4. training smoke run: two tiny random Qwen3 models in bf16, 8 OPD steps, tokens/s of rollout,
#    teacher scoring and training (bench/train_smoke.py); then the same on one rank under
#    torchrun: the FSDP2 path (fp32 master weights, bf16 compute, sharded checkpoint at the end)
# 4b. rollout tokens/s of the hf and vllm engines, small random Qwen3 in bf16 (bench_rollout.py;
#    vllm skipped with a message when it is not installed)
# 5. fused linear OPD, the issue-10 GPU row: N=32768, V=151,936, H=2048, bf16, fwd+bwd,
#    linear_opd_loss vs materialised logits vs chunked PyTorch (bench/bench_linear.py)
# 6. GPU benchmark: bf16 and fp32, N in {1024, 8192}, V=151,936, k=16, fwd_bwd and fwd,
#    opd_fast vs careful eager vs torch.compile(careful eager) vs the machine's floor (and the
#    reference, secondary); baselines that would not fit in GPU memory or in the time left are
#    skipped (the JSON says why)
# Each step has its own timeout and a failed step does not stop the next; the whole run stays
# within TOTAL_BUDGET_S (default 420 s = 7 min): the benchmark gets what the earlier steps left.
# Logs and the JSON go to $OUT (default bench/results/gpu-local); a summary is printed last.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-local}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-420}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
if [[ -n "${CUDA_HOME:-}" ]]; then
    export PATH="$CUDA_HOME/bin:$PATH"
fi
START_S=$(date +%s)
STEPS=()
CODES=()

elapsed() { echo $(($(date +%s) - START_S)); }

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND under `timeout`, output tee'd to $OUT/NAME.log
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "=== [$(elapsed) s] $name (timeout ${limit} s): $*"
    local code=0
    set +e
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    code=${PIPESTATUS[0]}
    set -e
    if [[ $code -eq 124 || $code -eq 137 ]]; then
        echo "=== $name: TIMED OUT after ${limit} s"
    fi
    echo "=== [$(elapsed) s] $name: exit $code"
    STEPS+=("$name")
    CODES+=("$code")
}

# 1. the machine
{
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv || true
    echo "nproc: $(nproc)"
    echo "CUDA_HOME=${CUDA_HOME:-unset}"
    nvcc --version 2>/dev/null | tail -2 || echo "nvcc not found"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" ||
        true
    git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git metadata here)"
} 2>&1 | tee "$OUT/nvidia-smi.txt" || true

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
case "$GPU_NAME" in
    *H200*) PEAK_GBPS=4800 ;;
    *H100*PCIe*) PEAK_GBPS=2000 ;;
    *) PEAK_GBPS=3350 ;;  # H100 SXM
esac

# 2. build (CPU + CUDA kernels, sm_90)
run_step build 240 env MAX_JOBS=16 OPD_FAST_CUDA_ARCHS=90 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
run_step build_info 60 "$PYTHON" -c \
    "import opd_fast, json; info = opd_fast.build_info(); print(json.dumps(info)); \
assert info.get('with_cuda'), 'extension built without CUDA kernels'"

# 3. CUDA tests
if [[ -f python_tests/test_cuda.py ]]; then
    run_step test_cuda 120 "$PYTHON" -m pytest python_tests/test_cuda.py -q
else
    echo "=== test_cuda: python_tests/test_cuda.py not found, skipped"
    STEPS+=("test_cuda(missing)")
    CODES+=("skipped")
fi

# 3b. the fused linear op on the GPU (its CUDA-marked tests)
run_step test_linear_cuda 60 "$PYTHON" -m pytest python_tests/test_linear.py -q -m cuda

# 4. the trainer end to end on the GPU
run_step train_smoke 90 "$PYTHON" bench/train_smoke.py --device cuda --out "$OUT/train-smoke.json"
run_step train_smoke_fsdp2 120 "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node 1 bench/train_smoke.py --device cuda --out "$OUT/train-smoke-fsdp2.json"

# 4b. rollout tokens/s of both engines: a small random Qwen3 in bf16, 256 sequences x 128 tokens
ROLLOUT_ARGS=(--model random-qwen3 --hidden 1024 --layers 8 --device cuda --dtype bfloat16
    --max-new-tokens 128 --rounds 3 --out "$OUT/rollout-gpu.json")
run_step rollout_hf 120 "$PYTHON" bench/bench_rollout.py --engine hf "${ROLLOUT_ARGS[@]}"
if "$PYTHON" -c "import vllm" 2> /dev/null; then
    run_step rollout_vllm 180 "$PYTHON" bench/bench_rollout.py --engine vllm "${ROLLOUT_ARGS[@]}"
else
    echo "=== rollout_vllm: vLLM is not installed for $PYTHON, skipped (pip install vllm)"
    STEPS+=("rollout_vllm(no vllm)")
    CODES+=("skipped")
fi

# 5. fused linear OPD (targets: peak extra memory < 1.5 GB, time <= 1.1x materialised)
run_step bench_linear 90 "$PYTHON" bench/bench_linear.py --device cuda \
    --n 32768 --hidden 2048 --dtypes bf16 --vocab 151936 --k 16 --repeats 3 \
    --impls fused materialised chunked_torch --max-row-s 40 --out "$OUT/bench-linear-gpu.json"

# 6. benchmark with what is left of the budget (at least 90 s; baselines stop 45 s early)
BENCH_LIMIT=$((TOTAL_BUDGET_S - $(elapsed)))
if ((BENCH_LIMIT < 90)); then BENCH_LIMIT=90; fi
run_step bench "$BENCH_LIMIT" "$PYTHON" bench/bench_opd.py --device cuda \
    --n 1024 8192 --dtypes bf16 fp32 --vocab 151936 --k 16 \
    --variant student_topk --estimator pg --modes fwd_bwd fwd \
    --impls opd_fast careful careful_compile floor reference \
    --settle-s 0 --load-retries 0 \
    --peak-gbps "$PEAK_GBPS" --time-budget-s $((BENCH_LIMIT - 45)) \
    --out "$OUT/bench-gpu.json"

# summary (printed last, so the end of the output carries it)
{
    echo
    echo "===== summary ($(elapsed) s total, GPU: ${GPU_NAME:-unknown}, peak ${PEAK_GBPS} GB/s) ====="
    for i in "${!STEPS[@]}"; do
        printf '  %-20s %s\n' "${STEPS[$i]}" "${CODES[$i]}"
    done
    if [[ -f "$OUT/test_cuda.log" ]]; then
        echo "--- test_cuda (last lines)"
        tail -5 "$OUT/test_cuda.log"
    fi
    if [[ -f "$OUT/train-smoke.json" ]]; then
        echo "--- train smoke"
        cat "$OUT/train-smoke.json"
    fi
    if [[ -f "$OUT/train-smoke-fsdp2.json" ]]; then
        echo "--- train smoke, FSDP2 on one rank"
        cat "$OUT/train-smoke-fsdp2.json"
    fi
    if [[ -f "$OUT/rollout-gpu.json" ]]; then
        echo "--- rollout tokens/s"
        grep -h '^\(hf\|vllm\): ' "$OUT/rollout_hf.log" "$OUT/rollout_vllm.log" 2> /dev/null || true
    fi
    if [[ -f "$OUT/bench_linear.log" ]]; then
        echo "--- bench_linear"
        sed -n '/^| N |/,$p' "$OUT/bench_linear.log"
    fi
    if [[ -f "$OUT/bench.log" ]]; then
        echo "--- bench"
        sed -n '/^(effective bandwidth/,$p' "$OUT/bench.log"
    fi
    echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
} 2>&1 | tee "$OUT/summary.txt"

for code in "${CODES[@]}"; do
    if [[ "$code" != "0" && "$code" != "skipped" ]]; then
        exit 1
    fi
done
exit 0
