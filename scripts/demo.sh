#!/usr/bin/env bash
# The main job on embedded defaults: build the demo model family locally, then merge it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${EVOMERGE_VENV:-.venv}/bin/python" scripts/demo.py "$@"
