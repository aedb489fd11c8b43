#!/usr/bin/env bash
# One-command GPU check: parity of every GPU backend here against ONNX Runtime CPU after a refit, hot-refit
# timing, bench rows, device and (Jetson) power mode, all in one JSON (default ./gpu-check.json).
# Usage: bash benchmarks/gpu_check.sh [--export DIR] [--json FILE] [--images N] ...   (--help for all options)
# See benchmarks/README.md, "GPU check", for what it checks and how to send us the JSON.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
