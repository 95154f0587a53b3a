#!/usr/bin/env bash
# One call on a lent GPU (device tool): the bf16 learner and the sync transport on a ~1.1B Llama built locally.
# It needs only CUDA torch and transformers (the device has no vLLM or DeepSpeed). Writes $OUT/gpu_check.json.
#   run: scripts/gpu_check.sh               (on the device: OUT is set there)
#   smoke test here: OUT=/tmp scripts/gpu_check.sh --size tiny --device cpu --length 64 --steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=${OUT:-runs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
exec "$python" scripts/gpu_check.py --out "$out/gpu_check.json" "$@"
