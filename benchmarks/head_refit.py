"""What a refittable head adds (issue 22 item 3, ``export --refit head``, beyond the paper), on ONE seed: the default
rule (random, share 0.1) in the frontier's in-process runner (real EdgeRuntime on ORT, real local deployment,
``--sync``), once with the edge exported ``--refit norms`` (the paper's) and once ``--refit head`` (the classifier's
weight and bias refittable: the demo's heads have 10 classes), each further head learning rate given by
``--head-lrs``. A first look in the manner of ``benchmarks/teacher_lead.py``, not the issue's target protocol
(>= 3 tuning + 3 held-out seeds, severities 3 and 5).

Per protocol: the edge's ``no_adapt`` and ``bn_adapt`` (the floor), the teacher's rows (``teacher_adapted`` is the
ceiling), then each run's accuracy, uploaded share, rollbacks and gap closed. Prints a table and writes
``head_refit.json``.

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/head_refit.py --out OUT --quick-models --all-corruptions \\
        --per-corruption 0
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
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-corruption", type=int, default=300, help="0: the whole test split (899)")
    ap.add_argument("--protocols", default="reset,continual")
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--head-lrs", default="", help="comma-separated head_lr values run besides the default (0)")
    ap.add_argument("--diagnose", action="store_true", help="run_job(diagnose=True): per corruption, the audit")
    ap.add_argument(
        "--only", default="", help="comma-separated variants to run (norms, head, head_episode, head_lr=X); default all"
    )
    ap.add_argument("--quick-models", action="store_true", help="the demo --quick models (edge 4, teacher 8 epochs)")
    ap.add_argument("--all-corruptions", action="store_true", help="the 13 corruptions (default: demo --quick's 4)")
    ap.add_argument(
        "--rows-from",
        type=Path,
        nargs="+",
        help="take each protocol's baseline and teacher rows (floor, ceiling) from a teacher_lead.py JSON of the same "
        "models, stream and seed instead of recomputing them (~75 s of CPU per protocol)",
    )
    args = ap.parse_args()

    import torch

    from cema_deploy.demo.baselines import run_baseline
    from cema_deploy.demo.frontier import Job, run_job
    from cema_deploy.demo.gap import floor_of, gap_closed
    from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, load_model, resolve_models
    from cema_deploy.demo.stream import CORRUPTIONS, QUICK_CORRUPTIONS, corrupted_stream, digits_splits
    from cema_deploy.demo.teacher_ceiling import teacher_runs
    from cema_deploy.export.to_onnx import export_timm

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = digits_splits(0)
    edge_spec, teacher_spec = EDGE_DEFAULT, TEACHER_DEFAULT
    if args.quick_models:
        edge_spec, teacher_spec = replace(EDGE_DEFAULT, epochs=4), replace(TEACHER_DEFAULT, epochs=8)
    models = resolve_models(None, None, splits, seed=0, edge_spec=edge_spec, teacher_spec=teacher_spec)
    edge = load_model(models.edge.name, models.edge.checkpoint)
    teacher = load_model(models.teacher.name, models.teacher.checkpoint)
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "norms": ("norms", {}),
        "head": ("head", {}),
        "head_episode": ("head", {"head_scope": "episode"}),
    }
    for lr in filter(None, args.head_lrs.split(",")):
        variants[f"head_lr={lr}"] = ("head", {"head_lr": float(lr)})
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    edge_dirs = {}
    for refit in ("norms", "head"):
        edge_dirs[refit] = args.out / "work" / f"edge-model-{refit}"
        if not (edge_dirs[refit] / "manifest.json").exists():
            export_timm(models.edge.name, edge_dirs[refit], model=edge, img_size=splits[0].shape[1], refit=refit)
    _, _, x, y = splits
    n = args.per_corruption or len(y)
    corruptions = CORRUPTIONS if args.all_corruptions else QUICK_CORRUPTIONS
    stream = corrupted_stream(x[:n], y[:n], severity=args.severity, corruptions=corruptions, seed=args.seed).shuffled(
        args.seed
    )
    doc: dict[str, Any] = {
        "what": "one seed: NOT the issue's target protocol",
        "severity": args.severity,
        "seed": args.seed,
        "corruptions": list(corruptions),
        "per_corruption": n,
        "share": args.share,
        "models": {
            "edge": [models.edge.name, 100 * models.edge.clean_accuracy],
            "teacher": [models.teacher.name, 100 * models.teacher.clean_accuracy],
        },
        "protocols": {},
    }
    earlier: dict[str, Any] | None = None
    for path in args.rows_from or []:
        got = json.loads(path.read_text())
        same = {k: got[k] for k in ("severity", "seed", "corruptions", "per_corruption", "models")}
        if same != {k: doc[k] for k in same}:
            raise SystemExit(f"{path} is of another stream or models: {same}")
        earlier = {"protocols": {**(earlier or {}).get("protocols", {}), **got["protocols"]}}
    doc["rows_from"] = [str(p) for p in args.rows_from or []]
    for protocol in args.protocols.split(","):
        if earlier is not None:
            rows = dict(earlier["protocols"][protocol]["rows"])
        else:
            rows = {
                b: 100 * run_baseline(b, edge, stream, protocol=protocol).accuracy for b in ("no_adapt", "bn_adapt")
            }
            t = teacher_runs(teacher, stream, protocol=protocol)
            rows |= {k: 100 * float(r.correct.mean()) for k, r in t.items()}
        floor, ceiling = floor_of(rows), rows["teacher_adapted"]
        out: dict[str, Any] = {"rows": rows, "floor": floor, "teacher_ceiling": ceiling, "runs": {}}
        doc["protocols"][protocol] = out
        print(f"{protocol}: {rows} floor {floor:.1f} ceiling {ceiling:.1f}", flush=True)
        for name, (refit, cloud) in variants.items():
            job = Job(rule="random", knob=args.share, protocol=protocol, severity=args.severity, seed=args.seed)
            t0 = time.perf_counter()
            res = run_job(
                job,
                work=args.out / "work" / name,
                edge_dir=edge_dirs[refit],
                teacher=(models.teacher.name, models.teacher.checkpoint),
                stream=stream,
                cloud=cloud,
                diagnose=args.diagnose,
            )
            res["refit"] = refit
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["gap_closed"] = gap_closed(res["accuracy"], floor=floor, ceiling=ceiling)
            out["runs"][name] = res
            (args.out / "head_refit.json").write_text(json.dumps(doc, indent=2))
            print(
                f"  {name:14s} acc {res['accuracy']:.1f} share {res['share']:.1f} gap {res['gap_closed']:.3f} "
                f"rollbacks {res['rollbacks']} ({res['seconds']} s)",
                flush=True,
            )
    (args.out / "head_refit.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
