#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job on a tiny local model.
# Writes runs/quickstart/ (summary.json, plots/, checkpoints/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m posttrain.quickstart "$@"
