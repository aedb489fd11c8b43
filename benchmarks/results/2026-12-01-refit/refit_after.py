"""How the "after" refit figures were measured (this branch's measure_refit: idle builds, then 3 refits):

    python benchmarks/results/2026-12-01-refit/refit_after.py out/r50 3 '{}'
    python benchmarks/results/2026-12-01-refit/refit_after.py out/r50 3 '{"refit_path": "plain"}'

The JSON argument is passed to the ort-cpu backend (the ablations: refit_path, allow_spinning;
the ablation JSONs were written when refit_path was still called refit_mode).
"""

import json
import sys

import numpy as np

from cema_deploy.bench import measure_refit
from cema_deploy.runtime import get_backend

model_dir, reps = sys.argv[1], int(sys.argv[2])
opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
with get_backend("ort-cpu", model_dir, **opts) as be:
    x = np.random.default_rng(0).standard_normal((1, *be.manifest.input.shape[1:])).astype(np.float32)
    r = measure_refit(be, x, repeats=reps)
keys = ["received_to_serving_ms", "build_ms", "warmup_ms", "received_to_first_new_response_ms"]
keys += ["first_new_response_latency_ms", "max_latency_during_refit_ms", "failed_requests"]
median = {**{k: r[k] for k in keys}, "idle_build_ms": r["idle_build_ms"], "steady_p99_ms": r["steady_p99_ms"]}
out = {"code": "branch", "opts": opts, "refit_path": r["refit_path"], "idle_all": r["idle_build_ms_all"]}
out |= {"trials": [{k: t[k] for k in keys} for t in r["trials"]], "median": {**median, **r["targets"]}}
print(json.dumps(out))
