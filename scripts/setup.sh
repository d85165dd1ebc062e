#!/usr/bin/env bash
# Create .venv and install rsdet-compress with its test extras, the optional OpenVINO runtime and the
# PostgreSQL driver of the MLflow server mode, and Ray for search workers.
# torch/torchvision come from the package registry as a matching pair (pinned in pyproject.toml):
# a CPU-only torch from elsewhere next to the registry's torchvision fails with
# "operator torchvision::nms does not exist".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install --quiet -e ".[dev,openvino,server,cluster]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python - <<'PY'
import torch, torchvision
from torchvision.ops import nms
nms(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([1.0]), 0.5)  # fails loudly on a mismatched pair
print(f"rsdet-compress ready: torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
