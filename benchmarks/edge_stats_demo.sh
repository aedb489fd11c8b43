#!/usr/bin/env bash
# The edge's own statistics in the quick demo (4 corruptions x 300 digits, models trained 4 epochs), edge alone vs
# PyTorch no adaptation and test-batch BN, at edge batch 64 and 1, shuffled and sorted streams. Seed 0 only: a first
# look, not the target protocol (settings on seeds 0-2, report on 3-5, full stream).
# The teacher is the edge checkpoint itself (edge-alone methods never use it; this skips training one).
# Usage: benchmarks/edge_stats_demo.sh [OUT_DIR]   (needs the demo extra; trains the quick edge model once, cached)
set -euo pipefail
out=${1:-benchmarks/results/2026-12-03-edge-stats}
mkdir -p "$out"
ckpt=$(ls "${CEMA_DEPLOY_CACHE:-$HOME/.cache/cema-deploy}"/models/edge-resnet10t-*.safetensors 2>/dev/null | head -1 || true)
teacher=()
[ -n "$ckpt" ] && teacher=(--teacher "resnet10t=$ckpt")
methods=${METHODS:-no_adapt,bn_adapt,edge_stats,edge_stats_ema,edge_stats_alpha}
for batch in ${BATCHES:-64 1}; do
  for stream in ${STREAMS:-shuffled sorted}; do
    sev=3,5
    [ "$stream" = sorted ] && sev=1,3,5
    tag="demo-b${batch}-${stream}"
    python -m cema_deploy demo --quick --seed 0 --severity "$sev" --methods "$methods" --edge-batch "$batch" \
      --stream "$stream" "${teacher[@]}" --out "/tmp/cema-edge-stats/$tag" --json > "$out/$tag.json"
    echo "wrote $out/$tag.json"
  done
done
