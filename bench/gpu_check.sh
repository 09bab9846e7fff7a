#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, 16 cores, no network), from anywhere:
#   bash bench/gpu_check.sh              # evidence in $OUT (default bench/results/gpu-local)
#   bash bench/gpu_check.sh --dry-run    # GPU steps stubbed to sleep their timeouts
# Within 540 s of wall time, build included, in priority order: the machine; build (sm_90);
# correctness of every kernel and teacher form (one pytest call); device numerics against
# fp64 on the GPU; compute-sanitizer racecheck, memcheck, synccheck; the training smoke run
# and FSDP2 on one rank; the benchmarks. Each step gets what the steps before it left, a step
# that cannot get its minimum is skipped with a line saying so, and a failure does not stop
# the next. At most 8 files come back: summary.json (printed last), logs.tar.gz and the
# benchmark JSON. The steps, the budget and the evidence: bench/gpu_check.py; how to read
# them: bench/results/README.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
if [[ -n "${CUDA_HOME:-}" ]]; then
    export PATH="$CUDA_HOME/bin:$PATH"
fi
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
