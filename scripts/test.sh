#!/usr/bin/env bash
# Install ascend-graph with its test dependencies into .venv and run the test suite.
# This is the test command README.md gives, and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
PIP=".venv/bin/pip"
# torch first, pinned: a plain "torch" would pull a CUDA build.
$PIP install -q torch==2.13.0
$PIP install -q -e ".[test]"

# vLLM 0.32.0 (pinned to torch 2.13.0) is a CUDA wheel; its config and compilation
# modules import on a CPU machine when installed without its dependencies, plus the
# light ones those modules import (versions are vLLM's own pins).
$PIP install -q vllm==0.32.0 --no-deps
$PIP install -q psutil cbor2 "pyzmq>=25.0.0" "aiohttp>=3.14.3" "requests>=2.33.0" \
  "oss-harmony>=0.0.11" "openai>=2.25.0" "pillow>=12.3.0" pybase64 cachetools msgspec \
  cloudpickle uvloop py-cpuinfo "prometheus_client>=0.18.0" "xgrammar==0.2.8" \
  "fastapi>=0.133.0,<0.137.0" partial-json-parser "llguidance>=1.7.0,<1.8.0" einops
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch changed to {v}')"

export VLLM_TARGET_DEVICE=cpu
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
exec .venv/bin/python -m pytest -q "$@"
