#!/usr/bin/env bash
# One-command GPU check: parity of every GPU backend here against ONNX Runtime CPU after a refit, hot-refit
# timing, bench rows, device and (Jetson) power mode, all in one JSON (default ./gpu-check.json).
# Where PyTorch sees CUDA (a cloud machine) it also times the cloud's adaptation step on the GPU and writes the
# edges-per-GPU figure to cloud-step.json (benchmarks/cloud_step.py; CLOUD_STEP=0 skips it).
# Usage: bash benchmarks/gpu_check.sh [--export DIR] [--json FILE] [--images N] ...   (--help for all options)
# See benchmarks/README.md, "GPU check", for what it checks and how to send us the JSON.
set -euo pipefail
PY="${PYTHON:-python3}"
HERE="$(dirname "$0")"
status=0
"$PY" "$HERE/gpu_check.py" "$@" || status=$?
if [[ "${CLOUD_STEP:-1}" != 0 ]] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export_dir="${CLOUD_STEP_EXPORT:-out/r50}"
    [[ -f "$export_dir/manifest.json" ]] || "$PY" -m cema_deploy export resnet50 --out "$export_dir"
    "$PY" "$HERE/cloud_step.py" "$export_dir" --teacher "${CLOUD_STEP_TEACHER:-resnet101}" --device cuda \
        --json cloud-step.json || status=$?
fi
exit "$status"
