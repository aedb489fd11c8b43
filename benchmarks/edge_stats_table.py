"""Markdown table of the edge-statistics demo runs (``benchmarks/edge_stats_demo.sh``): accuracy % per method, one
row per (edge batch, stream, severity); writes ``summary.json`` beside the inputs.

    python benchmarks/edge_stats_table.py benchmarks/results/2026-12-03-edge-stats
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("no_adapt", "bn_adapt", "edge_stats", "edge_stats_ema", "edge_stats_alpha")


def main() -> None:
    folder = Path(sys.argv[1])
    rows = []
    for path in sorted(folder.glob("demo-b*-*.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:  # a run still writing
            continue
        cfg = res["config"]
        for sev, r in res["severities"].items():
            acc = {m: r["methods"][m]["accuracy"] for m in METHODS if m in r["methods"]}
            up = {m: r["methods"][m]["uploaded"] for m in METHODS if m in r["methods"]}
            row = {"edge_batch": cfg["edge_batch"], "stream": cfg["stream_order"], "severity": int(sev)}
            rows.append({**row, "seeds": res["seeds"], "accuracy": acc, "uploaded": up, "skipped": res.get("skipped")})
    rows.sort(key=lambda r: (-r["edge_batch"], r["stream"], r["severity"]))
    (folder / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| edge batch | stream | severity | " + " | ".join(METHODS) + " |")
    print("|---:|---|---:|" + "---:|" * len(METHODS))
    for r in rows:
        skipped = r["skipped"] or {}
        cells = [
            f"{r['accuracy'][m]:.1f}" if m in r["accuracy"] else "skipped" if m in skipped else "-" for m in METHODS
        ]
        print(f"| {r['edge_batch']} | {r['stream']} | {r['severity']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
