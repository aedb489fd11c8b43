"""Probe: what lead weights the cloud sends in one frontier lead run (continual, 0.25, seed 0, quick models)."""
import json, statistics, sys
from dataclasses import replace
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
import cema_deploy.cloud.deployment.lead as L
seen = []
orig = L.LeadMixin._lead_for_blob
def wrapped(self):
    out = orig(self)
    if self._lead_last is not None and out[0] is not None:
        seen.append(dict(self._lead_last))
    return out
L.LeadMixin._lead_for_blob = wrapped
from cema_deploy.demo.frontier import Job, run_job
from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, resolve_models
from cema_deploy.demo.stream import QUICK_CORRUPTIONS, corrupted_stream, digits_splits
splits = digits_splits(0)
models = resolve_models(None, None, splits, seed=0, edge_spec=replace(EDGE_DEFAULT, epochs=4), teacher_spec=replace(TEACHER_DEFAULT, epochs=8))
_, _, x, y = splits
stream = corrupted_stream(x, y, severity=5, corruptions=QUICK_CORRUPTIONS, seed=0).shuffled(0)
work = Path("/work/wt-lead/benchmarks/results/2026-12-03-lead/work")
res = run_job(Job(rule="lead", knob=float(sys.argv[2]), protocol=sys.argv[1], severity=5, seed=0), work=work / "probe", edge_dir=work / "edge-model",
              teacher=(models.teacher.name, models.teacher.checkpoint), stream=stream)
w = np.array([s["weights"] for s in seen])
print(json.dumps({"accuracy": res["accuracy"], "share": res["share"], "publishes_with_lead": len(seen),
                  "disagreement_pct_mean": statistics.mean(s["disagreement"] for s in seen),
                  "frames_mean": statistics.mean(s["frames"] for s in seen),
                  "max_weight_mean": float(w.max(1).mean()), "min_weight_mean": float(w.min(1).mean()),
                  "lead_seconds_mean": statistics.mean(s["seconds"] for s in seen),
                  "cloud_seconds": res["cloud_seconds"],
                  "example_weights": seen[len(seen)//2]["weights"]}, indent=1))
