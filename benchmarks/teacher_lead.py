"""How much of the teacher's lead one frontier run carries to the edge (issue 22), with and without the two
delivery levers, on ONE seed and a small stream: a first look, not the issue's target protocol (>= 3 + 3 seeds, whole
streams, severities 3 and 5).

Per protocol: the edge's ``no_adapt`` and ``bn_adapt`` (the floor), the teacher's rows (``teacher_adapted`` is the
ceiling), then the default rule (random, share 0.1) in the frontier's in-process runner (real EdgeRuntime on ORT,
real local deployment, ``--sync``) with ``diagnose=True`` for each lever setting: the paper's (``{}``),
``replay_scope="episode"``, ``replay_moves_stats=False``, both, and (``--levers``) the effort levers and the
cloud-side gate of :data:`LEVERS`. Prints a table and writes JSON (gap closed per run, the diagnosis per corruption,
the rollback audit, every gate decision, the cloud's seconds per uploaded sample). The teacher rows are cached per
stream under ``OUT/work``; ``--no-teacher-rows`` skips them (no gap closed). ``--pace FPS``: the edge does not wait
for the cloud (issue 22's honest timing: frames fed at FPS, the cloud working concurrently, blobs applied when they
land; no diagnosis, whose per-corruption probe waits for the cloud); the default is ``--sync``.

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/teacher_lead.py --out benchmarks/results/2026-12-03-teacher-lead
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cema_deploy.cloud.config import CEMA_PRESETS, parse_method_settings

#: Lever settings (CemaConfig fields) of one run each. ``paper`` is the ``cema`` preset (the paper's values of every
#: lever, whatever the defaults); the others are the paper's with the named levers changed; ``default`` is
#: CemaConfig's defaults. Issue 22 item 6 (delivery): replay
#: from the current episode, replay-only steps that leave the statistics; item 2 (distillation effort per upload):
#: student steps per cloud batch, replay starting within a corruption, the affine lr, the temperature; item 6 (the
#: cloud-side gate before publishing).
_PAPER: dict[str, Any] = dict(CEMA_PRESETS["cema"])
#: issue 22 item 2: the distillation effort per upload (4 steps, lr x4, replay within the corruption's episode)
_EFFORT: dict[str, Any] = {"student_steps": 4, "student_lr": 1e-2, "replay_min": 32, "replay_scope": "episode"}
LEVERS: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    "default": {},  # CemaConfig's defaults: what `cloud serve` runs unless told otherwise
    "episode": _PAPER | {"replay_scope": "episode"},
    "no_replay_stats": _PAPER | {"replay_moves_stats": False},
    "both": _PAPER | {"replay_scope": "episode", "replay_moves_stats": False},
    "steps4": _PAPER | {"student_steps": 4},
    "replay_min32": _PAPER | {"replay_min": 32},
    "lr_x4": _PAPER | {"student_lr": 1e-2},
    "t2": _PAPER | {"temperature": 2.0},
    "gate": _PAPER | {"gate": True},
    "gate_m2": _PAPER | {"gate": True, "gate_margin": 2.0},
    "effort": _PAPER | _EFFORT,
    # issue 22, delivery (beyond the paper): the calibration batch also distils, and 8 student steps per cloud batch
    "carry": _PAPER | _EFFORT | {"student_steps": 8, "calibration_distils": True},
    "effort_gate": _PAPER | _EFFORT | {"gate": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-corruption", type=int, default=300, help="0: the whole test split (899)")
    ap.add_argument("--protocols", default="continual,reset")
    ap.add_argument("--levers", default="paper,episode,no_replay_stats,both", help=f"of {','.join(LEVERS)}")
    ap.add_argument(
        "--no-teacher-rows", action="store_true", help="skip the teacher's rows (no gap closed): saves ~75 s"
    )
    ap.add_argument("--cloud-set", action="append", default=[], help="KEY=VALUE: a CemaConfig field for every run")
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--cloud-batch", type=int, default=32, help="samples per cloud step (the paper's 32)")
    ap.add_argument(
        "--rules",
        default="random",
        help="frontier rules, e.g. random,random+stats (a RULE+stats rule adds the edge_stats row to the floor); "
        "runs are keyed LEVERS, or RULE:LEVERS past the first rule",
    )
    ap.add_argument("--quick-models", action="store_true", help="the demo --quick models (edge 4, teacher 8 epochs)")
    ap.add_argument("--pace", type=float, default=None, help="FPS: edge not waiting (default: --sync)")
    ap.add_argument("--all-corruptions", action="store_true", help="the 13 corruptions (default: demo --quick's 4)")
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
    teacher_ref = (models.teacher.name, models.teacher.checkpoint)
    edge_dir = args.out / "work" / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    _, _, x, y = splits
    n = args.per_corruption or len(y)
    corruptions = CORRUPTIONS if args.all_corruptions else QUICK_CORRUPTIONS
    stream = corrupted_stream(x[:n], y[:n], severity=args.severity, corruptions=corruptions, seed=args.seed).shuffled(
        args.seed
    )
    doc: dict[str, Any] = {
        "what": "one seed, a small stream: NOT the issue's target protocol",
        "severity": args.severity,
        "seed": args.seed,
        "corruptions": list(corruptions),
        "per_corruption": n,
        "share": args.share,
        "cloud_batch": args.cloud_batch,
        "pace": args.pace,  # None: --sync
        "models": {
            "edge": [models.edge.name, 100 * models.edge.clean_accuracy],
            "teacher": [models.teacher.name, 100 * models.teacher.clean_accuracy],
        },
        "protocols": {},
    }
    for protocol in args.protocols.split(","):
        cached = args.out / "work" / f"rows-{protocol}-{args.severity}-{args.seed}-{n}-{len(corruptions)}.json"
        if cached.exists():  # the rows do not depend on the levers: computed once per stream (~75 s)
            rows, extra = json.loads(cached.read_text())
        else:
            rows = {
                b: 100 * run_baseline(b, edge, stream, protocol=protocol).accuracy for b in ("no_adapt", "bn_adapt")
            }
            extra = None
            if not args.no_teacher_rows:
                t = teacher_runs(teacher, stream, protocol=protocol)
                rows |= {k: 100 * float(r.correct.mean()) for k, r in t.items()}
                extra = t["teacher_adapted"].extra
                cached.write_text(json.dumps([rows, extra]))
        rules = args.rules.split(",")
        if any(r.endswith("+stats") for r in rules) and "edge_stats" not in rows:
            # issue 22's floor: the higher of bn_adapt and the edge's own statistics adapter (no cloud)
            alone = Job(rule="edge_stats", knob=0.0, protocol=protocol, severity=args.severity, seed=args.seed)
            rows["edge_stats"] = run_job(
                alone, work=args.out / "work", edge_dir=edge_dir, teacher=teacher_ref, stream=stream
            )["accuracy"]
            if extra is not None:
                cached.write_text(json.dumps([rows, extra]))
        floor, ceiling = floor_of(rows), rows.get("teacher_adapted", float("nan"))
        out: dict[str, Any] = {"rows": rows, "teacher_adapted": extra, "floor": floor}
        out["teacher_ceiling"], out["runs"] = ceiling, {}
        print(f"{protocol}: {rows} floor {floor:.1f} ceiling {ceiling:.1f}", flush=True)
        for rule, name in [(r, n) for r in rules for n in args.levers.split(",")]:
            key = name if rule == rules[0] else f"{rule}:{name}"
            job = Job(rule=rule, knob=args.share, protocol=protocol, severity=args.severity, seed=args.seed)
            t0 = time.perf_counter()
            res = run_job(
                job,
                work=args.out / "work",
                edge_dir=edge_dir,
                teacher=teacher_ref,
                stream=stream,
                cloud_batch=args.cloud_batch,
                diagnose=args.pace is None,
                pace=args.pace,
                cloud=LEVERS[name] | parse_method_settings(args.cloud_set),
            )
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["gap_closed"] = None if extra is None else gap_closed(res["accuracy"], floor=floor, ceiling=ceiling)
            res["rule"] = rule
            out["runs"][key] = res
            doc["protocols"][protocol] = out
            (args.out / "teacher_lead.json").write_text(json.dumps(doc, indent=2))
            a = res["diagnosis"]["audit"] if "diagnosis" in res else {}
            uploaded = res["share"] * res["frames"] / 100
            res["cloud_s_per_uploaded_sample"] = res["cloud_seconds"] / uploaded if uploaded else None
            refused = sum(not d["passed"] for d in res.get("gate", []))
            print(
                f"  {key:16s} acc {res['accuracy']:.1f} share {res['share']:.1f} gap {res['gap_closed']} "
                f"rollbacks {res['rollbacks']} precision {a.get('precision')} recall {a.get('recall')} "
                f"gate refused {refused}/{len(res.get('gate', []))} "
                f"cloud {1000 * (res['cloud_s_per_uploaded_sample'] or 0):.1f} ms/sample ({res['seconds']} s, "
                f"{res['fps']:.0f} frames/s)",
                flush=True,
            )
        doc["protocols"][protocol] = out
        (args.out / "teacher_lead.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
