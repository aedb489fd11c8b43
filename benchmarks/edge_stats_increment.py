"""The cloud on top of the edge's own statistics (issue 21, "the cloud on top"): at about 10 % and 25 % of frames
uploaded, ``random+stats`` and the paper's rule with the edge's statistics (``cema+stats``, no budget: its share as
it comes) against ``edge_stats`` alone (nothing uploaded), reset protocol, severities 3 and 5, several seeds.

The headline is the *increment*: a rule's accuracy minus ``edge_stats``'s on the same stream (same severity and seed),
then mean and spread (sample standard deviation) over seeds. Context rows: ``no_adapt`` and ``bn_adapt`` (PyTorch
test-batch BN) on the same streams, and with ``--plain`` the rule without the edge's statistics (``random``) at the
same knobs.

Every run is the frontier's in-process runner (:func:`cema_deploy.demo.frontier.run_job`: the real EdgeRuntime on
ORT with its StatsAdapter at ``edge_stats``'s settings, the real local deployment, ``--sync``). What the cloud does
with the edge's statistics is what this checkout has: protocol 3 (the edge owns its statistics, sends no calibration
batch and reports its statistics, and the cloud's replica normalises this device's uploads with them). The random
rule's knob is set so that the *measured* share lands near each target: with the edge's statistics on, the knob is
the target (nothing else goes up); without them (``--plain``) a calibration batch goes up whole at the start of each
corruption, so ``knob = (target - c) / (1 - c)`` with ``c`` = edge batch / frames per corruption. The table shows the
measured share.

Runs are appended to ``runs.jsonl`` in ``--out`` and not repeated (run seeds one at a time); the table and
``edge_stats_increment.json`` always cover every run there.

Example:
    python benchmarks/edge_stats_increment.py --out benchmarks/results/2026-12-03-edge-stats-increment --seeds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.cloud.config import CEMA_PRESETS

EDGE_BATCH = 64


def _models(quick: bool) -> Any:
    from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, resolve_models
    from cema_deploy.demo.stream import digits_splits

    edge_spec, teacher_spec = EDGE_DEFAULT, TEACHER_DEFAULT
    if quick:
        edge_spec, teacher_spec = replace(EDGE_DEFAULT, epochs=4), replace(TEACHER_DEFAULT, epochs=8)
    splits = digits_splits(0)
    return splits, resolve_models(None, None, splits, seed=0, edge_spec=edge_spec, teacher_spec=teacher_spec)


def _stream(splits: Any, severity: int, seed: int, per_corruption: int | None) -> Any:
    from cema_deploy.demo.stream import corrupted_stream

    _, _, x, y = splits
    n = per_corruption or len(y)
    stream = corrupted_stream(x[:n], y[:n], severity=severity, corruptions=_corruptions(), seed=seed)
    return stream.shuffled(seed)


def _corruptions() -> tuple[str, ...]:
    from cema_deploy.demo.stream import CORRUPTIONS

    return CORRUPTIONS


def _one(task: dict[str, Any]) -> dict[str, Any]:
    """One run in a worker process: a frontier job, or the PyTorch baselines of one stream."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("cema_deploy").setLevel(logging.ERROR)
    splits, models = _models(task["quick"])
    stream = _stream(splits, task["severity"], task["seed"], task["per_corruption"])
    t0 = time.perf_counter()
    if task["rule"] == "baselines":
        from cema_deploy.demo.baselines import run_baseline
        from cema_deploy.demo.models import load_model

        edge = load_model(models.edge.name, models.edge.checkpoint)
        res: dict[str, Any] = {
            b: 100 * run_baseline(b, edge, stream, protocol="reset").accuracy for b in ("no_adapt", "bn_adapt")
        }
    else:
        from cema_deploy.demo.frontier import Job, run_job

        job = Job(rule=task["rule"], knob=task["knob"], protocol="reset", severity=task["severity"], seed=task["seed"])
        res = run_job(
            job,
            work=Path(task["work"]),
            edge_dir=Path(task["edge_dir"]),
            teacher=(models.teacher.name, models.teacher.checkpoint),
            stream=stream,
            cloud=CEMA_PRESETS[task["cloud_preset"]],
        )
    return {**task, "result": res, "seconds": round(time.perf_counter() - t0, 1)}


def _key(t: dict[str, Any]) -> str:
    return f"{t['severity']}/{t['seed']}/{t['rule']}/{t['knob']:g}"


def _sd(v: list[float]) -> float | None:
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per severity and row: accuracy and measured share (mean, spread over seeds) and the increment over
    ``edge_stats`` on the same seed (mean, spread, per seed)."""
    out: dict[str, Any] = {}
    for sev in sorted({r["severity"] for r in runs}):
        at = [r for r in runs if r["severity"] == sev]
        alone = {r["seed"]: r["result"]["accuracy"] for r in at if r["rule"] == "edge_stats"}
        rows: dict[str, Any] = {}
        base = [r for r in at if r["rule"] == "baselines"]
        for b in ("no_adapt", "bn_adapt"):
            accs = [r["result"][b] for r in base]
            if accs:
                rows[b] = {"accuracy": float(np.mean(accs)), "spread": _sd(accs), "share": 0.0, "seeds": len(accs)}
        for rule, knob in sorted({(r["rule"], r["knob"]) for r in at if r["rule"] != "baselines"}):
            got = sorted((r for r in at if (r["rule"], r["knob"]) == (rule, knob)), key=lambda r: r["seed"])
            accs = [r["result"]["accuracy"] for r in got]
            shares = [r["result"]["share"] for r in got]
            inc = {r["seed"]: r["result"]["accuracy"] - alone[r["seed"]] for r in got if r["seed"] in alone}
            name = rule if rule == "edge_stats" else f"{rule}@{knob:g}"
            rows[name] = {
                "rule": rule,
                "knob": knob,
                "accuracy": float(np.mean(accs)),
                "spread": _sd(accs),
                "share": float(np.mean(shares)),
                "share_spread": _sd(shares),
                "seeds": [r["seed"] for r in got],
                "edge_stats_on": bool(got[0]["result"].get("edge_stats", False)),
                "stats_local_generation": [r["result"].get("stats_local_generation", 0) for r in got],
                "increment": float(np.mean(list(inc.values()))) if inc and rule != "edge_stats" else None,
                "increment_spread": _sd(list(inc.values())) if rule != "edge_stats" else None,
                "increment_per_seed": inc if rule != "edge_stats" else {},
            }
        out[str(sev)] = rows
    return out


def _cell(v: float | None, sd: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    f = "+.1f" if sign else ".1f"
    return f"{v:{f}}" + ("" if sd is None else f" ± {sd:.1f}")


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| severity | row | uploaded % | accuracy % | increment over edge_stats (points) |",
        "|---|---|---|---|---|",
    ]
    for sev, rows in summary.items():
        for name, r in rows.items():
            inc = _cell(r.get("increment"), r.get("increment_spread"), sign=True) if "increment" in r else "-"
            share = _cell(r["share"], r.get("share_spread"))
            lines.append(f"| {sev} | {name} | {share} | {_cell(r['accuracy'], r['spread'])} | {inc} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="3", help="comma-separated stream seeds (the issue reports on 3,4,5)")
    ap.add_argument("--severities", default="3,5")
    ap.add_argument("--targets", default="10,25", help="uploaded shares (%%) the random rule's knob aims at")
    ap.add_argument("--per-corruption", type=int, default=0, help="0: the whole test split (899)")
    ap.add_argument("--plain", action="store_true", help="also the random rule without the edge's statistics")
    ap.add_argument("--quick-models", action="store_true", help="the demo --quick models (edge 4, teacher 8 epochs)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--cloud-preset",
        default="default",
        choices=sorted(CEMA_PRESETS),
        help="the cloud's settings (cema: the paper's)",
    )
    ap.add_argument(
        "--rules", default="", help="run only these rows (e.g. edge_stats,random+stats first, cema+stats after)"
    )
    args = ap.parse_args()

    from cema_deploy.demo.models import load_model
    from cema_deploy.export.to_onnx import export_timm

    args.out.mkdir(parents=True, exist_ok=True)
    splits, models = _models(args.quick_models)
    edge_dir = args.out / "work" / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        edge = load_model(models.edge.name, models.edge.checkpoint)
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    n = args.per_corruption or len(splits[3])
    cal = EDGE_BATCH / n  # the calibration batch at the start of each corruption goes up whole
    targets = [float(v) / 100 for v in args.targets.split(",")]
    knobs = [round(t, 3) for t in targets]  # protocol 3: with the edge's statistics no calibration batch goes up
    plain_knobs = [round(max(0.01, (t - cal) / (1 - cal)), 3) for t in targets]
    rules = [("edge_stats", 0.0), ("cema+stats", 1.0), *(("random+stats", k) for k in knobs)]
    if args.plain:
        rules += [("random", k) for k in plain_knobs]
    if args.rules:
        rules = [(r, k) for r, k in rules if r in args.rules.split(",")]
    common = {
        "cloud_preset": args.cloud_preset,
        "quick": args.quick_models,
        "per_corruption": args.per_corruption or None,
        "work": str(args.out / "work"),
    }
    tasks = [
        {**common, "severity": int(sev), "seed": int(seed), "rule": rule, "knob": knob, "edge_dir": str(edge_dir)}
        for seed in args.seeds.split(",")
        for sev in args.severities.split(",")
        for rule, knob in [*rules, ("baselines", 0.0)]  # the context rows last
    ]
    for seed in args.seeds.split(","):  # corrupt once here (cached on disk), not in every worker at once
        for sev in args.severities.split(","):
            _stream(splits, int(sev), int(seed), args.per_corruption or None)
    log = args.out / "runs.jsonl"
    done = {_key(r): r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    todo = [t for t in tasks if _key(t) not in done]
    print(
        f"{len(todo)} runs to go ({len(done)} done); random knobs {knobs} (+stats), {plain_knobs} (plain) "
        f"for targets {args.targets} %",
        flush=True,
    )
    # spawn: a forked worker of a process that imported torch can hang before its first task (seen here)
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool, open(log, "a") as f:
        for fut in as_completed([pool.submit(_one, t) for t in todo]):
            r = fut.result()
            done[_key(r)] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            acc = r["result"].get("accuracy", r["result"].get("bn_adapt"))
            print(f"  {_key(r)}: {acc:.1f} % at {r['result'].get('share', 0.0):.1f} % ({r['seconds']} s)", flush=True)
    summary = summarize(list(done.values()))
    doc = {
        "what": "the cloud on top of the edge's statistics; reset protocol; increments paired by seed",
        "measured_on": "protocol 3: the edge owns its statistics (no calibration batch with +stats, statistics "
        "reports), the cloud's replica normalises this device's uploads with them",
        "models": {
            "edge": [models.edge.name, 100 * models.edge.clean_accuracy],
            "teacher": [models.teacher.name, 100 * models.teacher.clean_accuracy],
            "quick": args.quick_models,
        },
        "per_corruption": n,
        "corruptions": len(_corruptions()),
        "random_knobs": dict(zip(args.targets.split(","), knobs, strict=True)),
        "random_knobs_plain": dict(zip(args.targets.split(","), plain_knobs, strict=True)) if args.plain else {},
        "summary": summary,
    }
    (args.out / "edge_stats_increment.json").write_text(json.dumps(doc, indent=2))
    print(table(summary))


if __name__ == "__main__":
    main()
