#!/usr/bin/env bash
# finetune (fp32, fp16, bf16), prune and encode at XLM-R base's size on one GPU: steps/s, chunks/s,
# sentences/s, MFU and peak GPU memory; then analyze at the study's size on the GPU (scale.py --analyze-study
# --device cuda, into benchmarks/results/analyze-study-cuda.json; XLSUB_GPU_ANALYZE=0 skips it).
# Without CUDA it says so and exits 0. XLSUB_RESULTS=<folder> writes both measurements there (gpu.json and
# analyze-study-cuda.json), e.g. a folder that a remote runner copies back; each analyze section prints its
# seconds as it ends, so a run cut off by a time limit still shows how far it got.
#   bash benchmarks/gpu.sh [--json results.json]
#   XLSUB_RESULTS="$OUT" bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device here ($PY sees none): benchmarks/gpu.sh measures nothing on this machine"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -n "${XLSUB_RESULTS:-}" ]; then
    mkdir -p "$XLSUB_RESULTS"
fi
"$PY" benchmarks/gpu.py --device cuda ${XLSUB_RESULTS:+--json "$XLSUB_RESULTS/gpu.json"} "$@"
if [ "${XLSUB_GPU_ANALYZE:-1}" != 0 ]; then
    "$PY" benchmarks/scale.py --analyze-study --device cuda ${XLSUB_RESULTS:+--out "$XLSUB_RESULTS/analyze-study-cuda.json"}
fi
