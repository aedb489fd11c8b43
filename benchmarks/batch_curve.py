"""Per-batch accuracy of one frontier run (issue 22's diagnosis of where the lead is lost within a corruption):
the default rule (random) on the demo models, the frontier's in-process runner (real EdgeRuntime on ORT, real local
deployment, ``--sync``), one seed; prints per corruption its accuracy and the accuracy of every edge batch (64 frames)
in stream order, so the batch where the first distilled blob lands shows.

Example (the curves of ``benchmarks/results/2026-12-04-carry/exploration/``):
    python benchmarks/batch_curve.py --levers effort --seed 0 --cloud-set calibration_distils=true
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.cloud.config import parse_method_settings


def main() -> None:
    from teacher_lead import LEVERS  # benchmarks/ is on sys.path when this runs as a script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levers", default="default", help=f"of {','.join(LEVERS)}")
    ap.add_argument("--cloud-set", action="append", default=[], help="KEY=VALUE: a CemaConfig field over the levers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--protocol", default="reset", choices=("reset", "continual"))
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--work", type=Path, default=Path("batch-curve-work"))
    ap.add_argument("--json", type=Path, default=None, help="also write the curves here")
    args = ap.parse_args()

    import torch

    from cema_deploy.demo.frontier import Job, run_job
    from cema_deploy.demo.models import load_model, resolve_models
    from cema_deploy.demo.stream import QUICK_CORRUPTIONS, corrupted_stream, digits_splits
    from cema_deploy.export.to_onnx import export_timm

    torch.set_num_threads(1)
    splits = digits_splits(0)
    models = resolve_models(None, None, splits, seed=0)
    edge_dir = args.work / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        edge = load_model(models.edge.name, models.edge.checkpoint)
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x, y, severity=args.severity, corruptions=QUICK_CORRUPTIONS, seed=args.seed)
    stream = stream.shuffled(args.seed)
    curves: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def on_batch(corruption: str, predictions: np.ndarray, labels: np.ndarray) -> None:
        hits = int((predictions == labels).sum())
        curves[corruption].append(round(100 * hits / len(labels)))
        counts[corruption][0] += hits
        counts[corruption][1] += len(labels)

    cloud = LEVERS[args.levers] | parse_method_settings(args.cloud_set)
    job = Job(rule="random", knob=args.share, protocol=args.protocol, severity=args.severity, seed=args.seed)
    res = run_job(
        job,
        work=args.work,
        edge_dir=edge_dir,
        teacher=(models.teacher.name, models.teacher.checkpoint),
        stream=stream,
        cloud=cloud,
        on_batch=on_batch,
    )
    for name, curve in curves.items():
        hits, n = counts[name]
        print(name, round(100 * hits / n, 1), curve)
    print(args.levers, parse_method_settings(args.cloud_set), "acc", round(res["accuracy"], 1), "share",
          round(res["share"], 1), "rollbacks", res["rollbacks"])  # fmt: skip
    if args.json is not None:
        doc: dict[str, Any] = {"job": job.key, "cloud": cloud, "accuracy": res["accuracy"], "share": res["share"]}
        args.json.write_text(json.dumps(doc | {"curves": curves}, indent=1))


if __name__ == "__main__":
    main()
