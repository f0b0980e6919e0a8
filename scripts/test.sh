#!/usr/bin/env bash
# Install what the tests need (first run only) and run the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup_reference.sh || [ $? -eq 3 ]  # 3: registry unreachable; the parity tests skip, saying so
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false
exec "${EVOMERGE_VENV:-.venv}/bin/python" -m pytest tests "$@"
