#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#   scripts/test.sh                  the default suite (about 14 minutes on 2 cores, plus set-up): everything but `slow`
#   scripts/test.sh --all            also the `slow` tier: multi-process runs, the registry matrix, the quickstart (about 40 more minutes)
#   scripts/test.sh -k sft -x        a subset
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  tier=()
  shift
fi
scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
.venv/bin/ruff check posttrain reward_models tests scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "${tier[@]}" "$@"
