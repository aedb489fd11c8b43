"""How the "before" refit figures were measured: run with the main checkout's code on the path,

    PYTHONPATH=/path/to/main python benchmarks/results/2026-12-01-refit/refit_before_main.py out/r50 3

Idle plain session builds first (main's session_from_onnx, three times), then main's measure_refit three times
(hot refit under load on ORT CPU, batch 1); prints one JSON line with every trial and the medians.
"""

import json
import sys
import time

import numpy as np

from cema_deploy.bench import measure_refit
from cema_deploy.runtime import get_backend
from cema_deploy.runtime.backends.onnxrt import session_from_onnx

model_dir, reps = sys.argv[1], int(sys.argv[2])
with get_backend("ort-cpu", model_dir) as be:
    x = np.random.default_rng(0).standard_normal((1, *be.manifest.input.shape[1:])).astype(np.float32)
    idle = []
    for _ in range(3):
        t0 = time.perf_counter()
        s = session_from_onnx(f"{model_dir}/model.onnx", tensors=dict(be.tensors))
        idle.append((time.perf_counter() - t0) * 1e3)
        del s
    trials = [measure_refit(be, x) for _ in range(reps)]
keys = ["received_to_serving_ms", "build_ms", "received_to_first_new_response_ms", "max_latency_during_refit_ms"]
keys += ["steady_p99_ms", "failed_requests"]
med = {k: float(np.median([t[k] for t in trials])) for k in keys}
med["idle_build_ms"] = float(np.median(idle))
med["serving_vs_idle_build"] = med["received_to_serving_ms"] / med["idle_build_ms"]
med["max_latency_vs_steady_p99"] = med["max_latency_during_refit_ms"] / med["steady_p99_ms"]
med["first_new_vs_build_plus_p99"] = med["received_to_first_new_response_ms"] / (med["build_ms"] + med["steady_p99_ms"])
trial_rows = [{k: t[k] for k in keys} for t in trials]
print(json.dumps({"code": "main", "idle_all": idle, "trials": trial_rows, "median": med}))
