"""Issue 22's gap-closed table and the guard's audit over seeds, from ``teacher_lead.py``'s JSON files (one file per
seed and setting: run the script once per seed, then point this at the files).

Groups every run by (timing, share knob, severity, protocol, levers) and gives per group: the seeds, accuracy and
gap closed as mean and sample standard deviation over seeds (:func:`cema_deploy.demo.gap.gap_over_seeds`: a seed
whose ceiling is not above its floor is left out), the mean uploaded share, floor and ceiling; and from the
label-aware audit (``diagnose``, ``--sync`` runs only): rollbacks per run and per corruption, the most in one
corruption, and the guard's precision (rolled-back blobs worse on their judged frames) and recall (blobs >= 5
points worse that were rolled back), per seed and pooled over the seeds' verdicts. Writes ``gap_closed.json`` and
prints the Markdown tables.

Example:
    python benchmarks/gap_closed_table.py benchmarks/results/2026-12-03-gap-closed/*.json \
        --out benchmarks/results/2026-12-03-gap-closed/gap_closed.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.demo.gap import gap_over_seeds


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.array(values, np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def _pooled(parts: list[tuple[float | None, int]]) -> float | None:
    """A ratio pooled over seeds from (ratio, denominator) pairs: sum(ratio * n) / sum(n); None when no n."""
    n = sum(d for r, d in parts if r is not None)
    if not n:
        return None
    return sum(r * d for r, d in parts if r is not None) / n


def summarize(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (timing, share, severity, protocol, levers) over the seeds found in ``docs`` (teacher_lead.json
    documents), sorted by those keys."""
    groups: dict[tuple[str, float, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        timing = "sync" if doc.get("pace") is None else f"paced {doc['pace']:g} fps"
        for protocol, out in doc["protocols"].items():
            for levers, run in out["runs"].items():
                key = (timing, float(doc["share"]), int(doc["severity"]), protocol, levers)
                groups[key].append(
                    {"seed": doc["seed"], "floor": out["floor"], "ceiling": out["teacher_ceiling"], "run": run}
                )
    rows = []
    for key in sorted(groups):
        seeds = sorted(groups[key], key=lambda s: s["seed"])
        acc = [s["run"]["accuracy"] for s in seeds]
        floors = [s["floor"] for s in seeds]
        ceilings = [s["ceiling"] for s in seeds]
        has_ceiling = all(c is not None and np.isfinite(c) for c in ceilings)
        gap, gap_sd = gap_over_seeds(acc, floors, ceilings) if has_ceiling else (None, None)
        audits = [s["run"].get("diagnosis", {}).get("audit") for s in seeds]
        per_corr = [[c["rollbacks"] for c in s["run"].get("diagnosis", {}).get("corruptions", [])] for s in seeds]
        row: dict[str, Any] = dict(zip(("timing", "share_knob", "severity", "protocol", "levers"), key, strict=True))
        row |= {
            "seeds": [s["seed"] for s in seeds],
            "accuracy": _mean_sd(acc),
            "accuracy_per_seed": acc,
            "uploaded": float(np.mean([s["run"]["share"] for s in seeds])),
            "floor": float(np.mean(floors)),
            "teacher_ceiling": float(np.mean(ceilings)) if has_ceiling else None,
            "gap_closed": (gap, gap_sd),
            "gap_closed_per_seed": [s["run"].get("gap_closed") for s in seeds],
            "rollbacks_per_seed": [s["run"]["rollbacks"] for s in seeds],
            "cloud_s_per_uploaded_sample": _mean_sd(
                [s["run"]["cloud_s_per_uploaded_sample"] for s in seeds if s["run"].get("cloud_s_per_uploaded_sample")]
            ),
            "edge_fps": _mean_sd([s["run"]["fps"] for s in seeds if s["run"].get("fps")])[0],
        }
        if all(audits):
            row["audit"] = {
                "rollbacks_per_corruption_per_seed": [
                    a["rollbacks"] / len(c) for a, c in zip(audits, per_corr, strict=True)
                ],
                "max_rollbacks_per_corruption_per_seed": [max(c) for c in per_corr],
                "precision_per_seed": [a["precision"] for a in audits],
                "recall_per_seed": [a["recall"] for a in audits],
                "losing_per_seed": [a["losing"] for a in audits],
                "precision_pooled": _pooled([(a["precision"], a["rollbacks"]) for a in audits]),
                "recall_pooled": _pooled([(a["recall"], a["losing"]) for a in audits]),
            }
        diag = [s["run"].get("diagnosis", {}).get("corruptions", []) for s in seeds]
        if all(diag) and all("teacher_accuracy" in c for d in diag for c in d):
            # mean over the seeds of the mean over corruptions: who is right on the frames the cloud learnt from
            row["on_uploads"] = {
                who: float(np.mean([np.mean([c[f"{who}_accuracy"] for c in d]) for d in diag]))
                for who in ("teacher", "replica", "edge")
            }
        rows.append(row)
    return rows


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pm(pair: tuple[float | None, float | None], fmt: str = ".1f") -> str:
    m, sd = pair
    return _f(m, fmt) if sd is None else f"{_f(m, fmt)} ± {_f(sd, fmt)}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| timing | share knob | severity | protocol | levers | seeds | uploaded % | floor % | ceiling % | accuracy % "
        "| gap closed | rollbacks per run | cloud ms per uploaded sample | teacher / replica / edge on uploads % |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["cloud_s_per_uploaded_sample"]
        lines.append(
            f"| {r['timing']} | {r['share_knob']:g} | {r['severity']} | {r['protocol']} | {r['levers']} | "
            f"{','.join(map(str, r['seeds']))} | {r['uploaded']:.1f} | {r['floor']:.1f} | {_f(r['teacher_ceiling'])} | "
            f"{_pm(r['accuracy'])} | {_pm(r['gap_closed'], '.2f')} | {', '.join(map(str, r['rollbacks_per_seed']))} | "
            f"{_pm((None if ms[0] is None else 1000 * ms[0], None if ms[1] is None else 1000 * ms[1]), '.0f')} | "
            + (" / ".join(f"{v:.1f}" for v in r["on_uploads"].values()) if "on_uploads" in r else "-")
            + " |"
        )
    lines += [
        "",
        "| timing | share knob | severity | protocol | levers | rollbacks per corruption (per seed) | most in one "
        "corruption | precision per seed (pooled) | recall per seed (pooled) | losing blobs per seed |",
        "|---|---:|---:|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r.get("audit")
        if a is None:
            continue
        lines.append(
            f"| {r['timing']} | {r['share_knob']:g} | {r['severity']} | {r['protocol']} | {r['levers']} | "
            f"{', '.join(_f(x, '.2f') for x in a['rollbacks_per_corruption_per_seed'])} | "
            f"{', '.join(map(str, a['max_rollbacks_per_corruption_per_seed']))} | "
            f"{', '.join(_f(x, '.2f') for x in a['precision_per_seed'])} ({_f(a['precision_pooled'], '.2f')}) | "
            f"{', '.join(_f(x, '.2f') for x in a['recall_per_seed'])} ({_f(a['recall_pooled'], '.2f')}) | "
            f"{', '.join(map(str, a['losing_per_seed']))} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="teacher_lead.py JSON files")
    ap.add_argument("--out", type=Path, default=None, help="where to write the summary JSON")
    args = ap.parse_args()
    docs = [json.loads(f.read_text()) for f in args.files if f.name != "gap_closed.json"]
    rows = summarize(docs)
    if args.out:
        args.out.write_text(json.dumps({"files": [f.name for f in args.files], "rows": rows}, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
