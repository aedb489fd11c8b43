"""Which frames carry the teacher's lead (issue 22 item 4): the ``lead`` upload rule against ``random`` and
``entropy_top`` at equal shares, in the frontier's in-process runner (real EdgeRuntime on ORT, real local deployment,
``--sync``), per protocol and seed, with the gap closed against the same stream's floor and teacher ceiling.

``lead``'s cloud sends per-class lead weights with each blob (``CemaConfig.lead_frames`` = ``demo.run.LEAD_FRAMES``;
``cloud/deployment/lead.py``); the other rules run the same cloud without them. Every run appends one line to
``OUT/runs.jsonl`` (a rerun skips the keys already there); ``OUT/lead_rules.json`` holds the rows, floor and ceiling
per stream and the mean and spread over seeds of accuracy, uploaded share and gap closed per protocol, rule and share.
The floor and teacher rows are cached per stream under ``OUT/work`` (``--no-teacher-rows``: skip them, no gap).

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/lead_rules.py --out benchmarks/results/2026-12-03-lead \\
        --quick-models --per-corruption 0 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cema_deploy.cloud.config import parse_method_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="stream and run seeds (tuning: 0-2; held out: 3-5)")
    ap.add_argument("--per-corruption", type=int, default=0, help="0: the whole test split (899)")
    ap.add_argument("--protocols", default="reset,continual")
    ap.add_argument("--rules", default="random,entropy_top,lead")
    ap.add_argument("--shares", default="0.1,0.25")
    ap.add_argument("--no-teacher-rows", action="store_true", help="skip the floor/teacher rows (no gap closed)")
    ap.add_argument("--cloud-set", action="append", default=[], help="KEY=VALUE: a CemaConfig field for every run")
    ap.add_argument("--quick-models", action="store_true", help="the demo --quick models (edge 4, teacher 8 epochs)")
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
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    splits = digits_splits(0)
    edge_spec, teacher_spec = EDGE_DEFAULT, TEACHER_DEFAULT
    if args.quick_models:
        edge_spec, teacher_spec = replace(EDGE_DEFAULT, epochs=4), replace(TEACHER_DEFAULT, epochs=8)
    models = resolve_models(None, None, splits, seed=0, edge_spec=edge_spec, teacher_spec=teacher_spec)
    edge = load_model(models.edge.name, models.edge.checkpoint)
    teacher = load_model(models.teacher.name, models.teacher.checkpoint)
    edge_dir = work / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    _, _, x, y = splits
    n = args.per_corruption or len(y)
    corruptions = CORRUPTIONS if args.all_corruptions else QUICK_CORRUPTIONS
    cloud = parse_method_settings(args.cloud_set)
    runs_path = args.out / "runs.jsonl"
    done = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    seeds = [int(s) for s in args.seeds.split(",")]
    shares = [float(s) for s in args.shares.split(",")]
    streams: dict[str, Any] = {}
    for seed in seeds:
        stream = corrupted_stream(x[:n], y[:n], severity=args.severity, corruptions=corruptions, seed=seed).shuffled(
            seed
        )
        for protocol in args.protocols.split(","):
            tag = f"{protocol}-{args.severity}-{seed}-{n}-{len(corruptions)}"
            cached, edge_rows = work / f"rows-{tag}.json", work / f"rows-{tag}-edge.json"  # with / without teacher
            if cached.exists():
                rows = json.loads(cached.read_text())
            else:
                if edge_rows.exists():
                    rows = json.loads(edge_rows.read_text())
                else:
                    rows = {
                        b: 100 * run_baseline(b, edge, stream, protocol=protocol).accuracy
                        for b in ("no_adapt", "bn_adapt")
                    }
                    edge_rows.write_text(json.dumps(rows))
                if not args.no_teacher_rows:
                    t = teacher_runs(teacher, stream, protocol=protocol)
                    rows |= {k: 100 * float(r.correct.mean()) for k, r in t.items()}
                    cached.write_text(json.dumps(rows))
            floor, ceiling = floor_of(rows), rows.get("teacher_adapted", float("nan"))
            streams[tag] = {"rows": rows, "floor": floor, "teacher_ceiling": ceiling}
            print(f"{tag}: {rows} floor {floor:.1f} ceiling {ceiling:.1f}", flush=True)
            for share in shares:
                for rule in args.rules.split(","):
                    job = Job(rule=rule, knob=share, protocol=protocol, severity=args.severity, seed=seed)
                    key = f"{job.key}/{n}x{len(corruptions)}"
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    res = run_job(
                        job,
                        work=work,
                        edge_dir=edge_dir,
                        teacher=(models.teacher.name, models.teacher.checkpoint),
                        stream=stream,
                        cloud=cloud,
                    )
                    res["key"], res["stream"] = key, tag
                    res["seconds"] = round(time.perf_counter() - t0, 1)
                    res["gap_closed"] = gap_closed(res["accuracy"], floor=floor, ceiling=ceiling)
                    done[key] = res
                    with runs_path.open("a") as f:
                        f.write(json.dumps(res) + "\n")
                    print(
                        f"  {rule:12s} share {share:g}: acc {res['accuracy']:.2f} uploaded {res['share']:.1f} % "
                        f"gap {_fmt(res['gap_closed'])} rollbacks {res['rollbacks']} ({res['seconds']} s)",
                        flush=True,
                    )
    summary: dict[str, Any] = {}
    for r in done.values():
        if r["stream"] not in streams:
            continue
        st = streams[r["stream"]]  # teacher rows measured after the run (a later invocation): its gap closed now
        r["gap_closed"] = gap_closed(r["accuracy"], floor=st["floor"], ceiling=st["teacher_ceiling"])
        cell = summary.setdefault(f"{r['protocol']}/{r['severity']}", {}).setdefault(r["rule"], {})
        cell.setdefault(f"{r['knob']:g}", []).append(r)
    table: dict[str, Any] = {}
    for panel, rules in summary.items():
        for rule, by_share in rules.items():
            for share, rs in by_share.items():
                rs.sort(key=lambda r: r["seed"])
                table.setdefault(panel, {}).setdefault(rule, {})[share] = {
                    "seeds": [r["seed"] for r in rs],
                    **{k: _mean(r[k] for r in rs) for k in ("accuracy", "share", "gap_closed")},
                    **{f"{k}_spread": _spread(r[k] for r in rs) for k in ("accuracy", "gap_closed")},
                    "gap_seeds": [r["seed"] for r in rs if r["gap_closed"] is not None],
                    "accuracy_by_seed": [round(r["accuracy"], 2) for r in rs],
                }
    doc = {
        "what": "lead vs random vs entropy_top at equal shares (issue 22 item 4), frontier in-process runner, --sync",
        "severity": args.severity,
        "seeds": seeds,
        "corruptions": list(corruptions),
        "per_corruption": n,
        "cloud": cloud,
        "models": {
            "edge": [models.edge.name, 100 * models.edge.clean_accuracy],
            "teacher": [models.teacher.name, 100 * models.teacher.clean_accuracy],
        },
        "streams": streams,
        "table": table,
    }
    (args.out / "lead_rules.json").write_text(json.dumps(doc, indent=2))
    for panel, rules in table.items():
        for rule, by_share in rules.items():
            for share, c in by_share.items():
                print(
                    f"{panel} {rule:12s} {share:>5s}: acc {c['accuracy']:.2f} ± {c['accuracy_spread']:.2f} "
                    f"uploaded {c['share']:.1f} % gap {_fmt(c['gap_closed'])} ± {_fmt(c['gap_closed_spread'])} "
                    f"(seeds {c['gap_seeds']}) seeds {c['seeds']}"
                )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _mean(values: Any) -> float | None:
    """Mean of the values that exist (a run without teacher rows has no gap closed); None when none does."""
    vs = [v for v in values if v is not None and v == v]
    return round(statistics.mean(vs), 4) if vs else None


def _spread(values: Any) -> float | None:
    """Sample standard deviation over seeds of the values that exist (0 for one, None for none)."""
    vs = [v for v in values if v is not None and v == v]
    return round(statistics.stdev(vs), 4) if len(vs) > 1 else (0.0 if vs else None)


if __name__ == "__main__":
    main()
