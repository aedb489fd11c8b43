"""Probe: the lead weights the cloud sends in one frontier ``lead`` run (quick models, 4 x 899, severity 5, seed 0).

Wraps ``LeadMixin._lead_for_blob`` to record every computation, then runs the job as ``benchmarks/lead_rules.py``
does (same work folder, so its export). Prints JSON: accuracy, share, publishes that carried weights, the mean
teacher-vs-replica disagreement on the scored uploads, the mean of the largest and smallest weight, seconds.

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/results/2026-12-03-lead/probe_lead.py continual 0.25
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cema_deploy.cloud.deployment.lead as lead_module
from cema_deploy.demo.frontier import Job, run_job
from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, resolve_models
from cema_deploy.demo.stream import QUICK_CORRUPTIONS, corrupted_stream, digits_splits

SEEN: list[dict[str, Any]] = []
_ORIGINAL = lead_module.LeadMixin._lead_for_blob


def _recorded(self: Any) -> Any:
    out = _ORIGINAL(self)
    if self._lead_last is not None and out[0] is not None:
        SEEN.append(dict(self._lead_last))
    return out


def main() -> None:
    torch.set_num_threads(1)
    lead_module.LeadMixin._lead_for_blob = _recorded  # type: ignore[method-assign]
    protocol, share = sys.argv[1], float(sys.argv[2])
    splits = digits_splits(0)
    quick = {"edge_spec": replace(EDGE_DEFAULT, epochs=4), "teacher_spec": replace(TEACHER_DEFAULT, epochs=8)}
    models = resolve_models(None, None, splits, seed=0, **quick)
    _, _, x, y = splits
    stream = corrupted_stream(x, y, severity=5, corruptions=QUICK_CORRUPTIONS, seed=0).shuffled(0)
    work = Path(__file__).parent / "work"
    res = run_job(
        Job(rule="lead", knob=share, protocol=protocol, severity=5, seed=0),
        work=work / "probe",
        edge_dir=work / "edge-model",
        teacher=(models.teacher.name, models.teacher.checkpoint),
        stream=stream,
    )
    w = np.array([s["weights"] for s in SEEN])
    out = {
        "accuracy": res["accuracy"],
        "share": res["share"],
        "publishes_with_lead": len(SEEN),
        "disagreement_pct_mean": statistics.mean(s["disagreement"] for s in SEEN),
        "frames_mean": statistics.mean(s["frames"] for s in SEEN),
        "max_weight_mean": float(w.max(1).mean()),
        "min_weight_mean": float(w.min(1).mean()),
        "lead_seconds_mean": statistics.mean(s["seconds"] for s in SEEN),
        "cloud_seconds": res["cloud_seconds"],
        "example_weights": SEEN[len(SEEN) // 2]["weights"],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
