#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#   scripts/test.sh                  the default suite (about 15 minutes on 2 cores)
#   scripts/test.sh -k sft -x        a subset
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
.venv/bin/ruff check posttrain reward_models tests scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
