"""The rollback guard on one frontier point (issue 22, item 6): rollbacks per corruption, blobs held, the guard's
precision and recall from the label-aware audit, and accuracy, for the default rule (random 10 %) on the continual
protocol, in the frontier's in-process runner (real EdgeRuntime on ORT, real local deployment, ``--sync``).

Cheaper than ``benchmarks/teacher_lead.py`` (no teacher rows, so no gap closed: the floor ``bn_adapt`` only), so the
same point can be run with the code before and after a change of the guard (``PYTHONPATH`` of either checkout).

``--rollback-set collapse_ratio=0`` sets :class:`~cema_deploy.runtime.updates.rollback.RollbackConfig` fields for
the run's edge (recorded in the JSON); ``--dump DIR`` saves each verdict's judged logits and labels
(``verdict-<version>.npz``) so a rule can be replayed offline on the same frames.

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/verdict_guard.py --out guard.json --severity 3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON written here")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/verdict-guard-work"))
    ap.add_argument("--rollback-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a RollbackConfig field for the edge (repeatable), e.g. collapse_ratio=0")  # fmt: skip
    ap.add_argument("--cloud-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a CemaConfig field for the cloud (repeatable), e.g. gate=true")  # fmt: skip
    ap.add_argument("--dump", type=Path, default=None, help="save each verdict's logits and labels here")
    args = ap.parse_args()
    rollback_set = {k: float(v) for k, v in (a.split("=", 1) for a in args.rollback_set)}
    from cema_deploy.cloud.config import parse_method_settings

    cloud_set = parse_method_settings(args.cloud_set)

    import numpy as np
    import torch

    import cema_deploy.runtime.edge as edge_module
    from cema_deploy.demo.baselines import run_baseline
    from cema_deploy.demo.diagnosis import Diagnosis
    from cema_deploy.demo.frontier import Job, run_job
    from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, load_model, resolve_models
    from cema_deploy.demo.stream import CORRUPTIONS, corrupted_stream, digits_splits
    from cema_deploy.export.to_onnx import export_timm
    from cema_deploy.runtime.updates.rollback import RollbackConfig

    if rollback_set:  # run_job builds the edge with RollbackConfig(): give it these fields
        fields = {k: int(v) if k in ("window", "min_samples", "hold_frames") else v for k, v in rollback_set.items()}
        edge_module.RollbackConfig = lambda: RollbackConfig(**fields)  # type: ignore[assignment,misc]
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
        audit = Diagnosis.audit

        def dumping(self: Diagnosis, j: Any, frames: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
            audit(self, j, frames, old, new)
            y = np.asarray([self.labels.get(_key(f), -1) for f in frames], np.int64)
            np.savez(args.dump / f"verdict-{j.version}.npz", old=old, new=new, labels=y)

        from cema_deploy.demo.diagnosis import _key

        Diagnosis.audit = dumping  # type: ignore[method-assign]

    torch.set_num_threads(1)
    splits = digits_splits(0)
    edge_spec, teacher_spec = replace(EDGE_DEFAULT, epochs=4), replace(TEACHER_DEFAULT, epochs=8)  # --quick-models
    models = resolve_models(None, None, splits, seed=0, edge_spec=edge_spec, teacher_spec=teacher_spec)
    edge = load_model(models.edge.name, models.edge.checkpoint)
    edge_dir = args.work / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x, y, severity=args.severity, corruptions=CORRUPTIONS, seed=args.seed).shuffled(args.seed)
    floor = 100 * run_baseline("bn_adapt", edge, stream, protocol="continual").accuracy
    job = Job(rule="random", knob=args.share, protocol="continual", severity=args.severity, seed=args.seed)
    t0 = time.perf_counter()
    res = run_job(job, work=args.work, edge_dir=edge_dir, teacher=(models.teacher.name, models.teacher.checkpoint),
                  stream=stream, diagnose=True, cloud=cloud_set or None)  # fmt: skip
    d = res["diagnosis"]
    per = [int(c["rollbacks"]) for c in d["corruptions"]]
    doc: dict[str, Any] = {
        "severity": args.severity,
        "seed": args.seed,
        "share": args.share,
        "rollback_set": rollback_set,
        "cloud_set": cloud_set,
        "bn_adapt": floor,
        "accuracy": res["accuracy"],
        "uploaded_pct": res["share"],
        "rollbacks": res["rollbacks"],
        "rollbacks_per_corruption": per,
        "held_per_corruption": [int(c.get("held", 0)) for c in d["corruptions"]],
        "audit": d["audit"],
        "seconds": round(time.perf_counter() - t0, 1),
        "diagnosis": d,
    }
    args.out.write_text(json.dumps(doc, indent=2))
    a = d["audit"]
    print(f"severity {args.severity}: accuracy {res['accuracy']:.2f} (bn_adapt {floor:.2f}), rollbacks "
          f"{res['rollbacks']} (per corruption {per}), precision {a['precision']}, recall {a['recall']}, verdicts "
          f"{a['verdicts']}, held {sum(doc['held_per_corruption'])}")  # fmt: skip


if __name__ == "__main__":
    main()
