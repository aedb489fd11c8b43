"""Issue 21's targets for the edge alone: the statistics adapter vs no adaptation and PyTorch test-batch BN.

Tables (means and spreads over seeds, the demo's quick models and streams: 4 corruptions x 300 digits):
zero uplink (reset protocol, shuffled, severities 3 and 5, edge batch 64), batch 1 (same at edge batch 1), continual
(one pass over every corruption, batch 64), label-correlated (``--stream sorted``: frames grouped by class within
each corruption, severities 1, 3 and 5, batch 1 and 64). Each target prints PASS or MISS with its numbers.

The edge rows run the torch-free runtime in this process: an ONNX Runtime CPU backend (1 thread) and the
:class:`~cema_deploy.runtime.stats.adapter.StatsAdapter` with the settings of ``edge run --adapt-stats ema``'s
defaults, stepped as ``EdgeRuntime.step`` does (probe and refit before a batch is served, its predictions reported
after), which is what ``demo --methods edge_stats`` runs in an ``edge run`` process per corruption, minus process
start-up. ``no_adapt`` is the same backend with the adapter off; ``bn_adapt`` is the demo's PyTorch baseline.

Usage (one table at a time keeps each run short; then merge and check the targets):
  python benchmarks/edge_stats_targets.py --seeds 0 1 2 --tables zero_uplink batch_1 [--edge CKPT] [--out DIR]
  python benchmarks/edge_stats_targets.py --seeds 0 1 2 --summarize
  (--balance-measure runs: the guard's run measure; --prior-mix moment --balance-after 0 --dense-frames 128: the
   first round's settings, benchmarks/results/2026-12-03-edge-stats-targets/; --baselines-from DIR reuses
   no_adapt/bn_adapt rows;
   --out DIR to keep its rows apart)
  (needs the demo extra; the edge checkpoint defaults to the quick demo's cached one.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.demo.baselines import run_baseline
from cema_deploy.demo.edge_only import EDGE_STATS_SETTINGS, ordered
from cema_deploy.demo.models import EDGE_DEFAULT, load_model, train_model
from cema_deploy.demo.stream import Stream, corrupted_stream, digits_splits
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.frames.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.stats.adapter import (
    BALANCE_MEASURES,
    DEFAULT_EVERY,
    PRIOR_MIXES,
    StatsConfig,
    stats_adapter_from_dir,
)

QUICK_CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur"]
PER_CORRUPTION = 300
#: ``edge run --adapt-stats ema`` with every other option at its default (cli/edge.py).
EDGE_STATS = StatsConfig(mode="ema", every=DEFAULT_EVERY, dense_frames=EDGE_STATS_SETTINGS["dense_frames"])
OFF = StatsConfig(mode="off")


def edge_accuracy(
    edge_dir: Path, segments: list[Any], cfg: StatsConfig, batch: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-frame correctness of one edge process over ``segments`` (one process = fresh statistics)."""
    be = get_backend("ort-cpu", edge_dir, intra_op_threads=1)
    adapter, _ = stats_adapter_from_dir(be, edge_dir, cfg)
    pre, correct = be.manifest.preprocess, []
    images = np.concatenate([np.asarray(s.images) for s in segments])  # one stream: batches straddle corruptions
    labels = np.concatenate([s.labels for s in segments])
    for i in range(0, len(images), batch):
        at_size = images_at_model_size(images[i : i + batch], pre)
        x = normalize(at_size, pre)
        if adapter is not None:
            adapter.observe(x, at_size)
        pred = be.infer(x).argmax(axis=1)
        if adapter is not None:
            adapter.served(pred)
        correct.append(pred == labels[i : i + batch])
    return np.concatenate(correct), (adapter.metrics() if adapter is not None else {})


def edge_run(edge_dir: Path, stream: Stream, cfg: StatsConfig, batch: int, protocol: str) -> dict[str, Any]:
    if protocol == "reset":
        parts = [edge_accuracy(edge_dir, [s], cfg, batch) for s in stream.segments]
    else:
        parts = [edge_accuracy(edge_dir, list(stream.segments), cfg, batch)]
    correct = np.concatenate([p[0] for p in parts])
    return {
        "accuracy": 100 * float(correct.mean()),
        "per_corruption": {
            s.name: 100 * float(correct[stream.segment_of == i].mean()) for i, s in enumerate(stream.segments)
        },
        "probes": int(sum(p[1].get("probes", 0) for p in parts)),
        "resets": int(sum(p[1].get("resets", 0) for p in parts)),
    }


def torch_run(model: Any, method: str, stream: Stream, batch: int, protocol: str) -> dict[str, Any]:
    res = run_baseline(method, model, stream, batch=batch, protocol=protocol)
    return {"accuracy": 100 * res.accuracy, "per_corruption": {k: 100 * v for k, v in res.per_segment.items()}}


#: (table, stream order, protocol, edge batch, severities)
CASES = [
    ("zero_uplink", "shuffled", "reset", 64, (3, 5)),
    ("batch_1", "shuffled", "reset", 1, (3, 5)),
    ("continual", "shuffled", "continual", 64, (3, 5)),
    ("sorted", "sorted", "reset", 1, (1, 3, 5)),
    ("sorted_b64", "sorted", "reset", 64, (1, 3, 5)),
]


def load_baselines(directory: Path | None) -> dict[tuple[str, int, int], dict[str, Any]]:
    """``no_adapt`` and ``bn_adapt`` rows by (table, severity, seed) from the rows-*.json in ``directory`` (the
    baselines do not depend on the adapter's settings: reusing them measures only the edge)."""
    if directory is None:
        return {}
    found: dict[tuple[str, int, int], dict[str, Any]] = {}
    for f in sorted(directory.glob("rows-*.json")):
        for r in json.loads(f.read_text())["rows"]:
            keep = {m: v for m, v in r["methods"].items() if m in ("no_adapt", "bn_adapt")}
            found[r["table"], r["severity"], r["seed"]] = keep
    return found


def measure(
    edge_ckpt: Path,
    seeds: list[int],
    tables: list[str],
    work: Path,
    stats: StatsConfig = EDGE_STATS,
    baselines: dict[tuple[str, int, int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    from cema_deploy.export.to_onnx import export_timm

    splits = digits_splits(0)
    model = load_model("resnet10t", edge_ckpt)
    edge_dir = work / "edge-model"
    export_timm("resnet10t", edge_dir, model=model, img_size=splits[0].shape[1], force=True)
    x_te, y_te = splits[2][:PER_CORRUPTION], splits[3][:PER_CORRUPTION]
    rows, plain = [], {}
    for table, order, protocol, batch, severities in [c for c in CASES if c[0] in tables]:
        for sev in severities:
            for seed in seeds:
                t0 = time.perf_counter()
                stream = ordered(
                    corrupted_stream(x_te, y_te, severity=sev, corruptions=QUICK_CORRUPTIONS, seed=seed), order, seed
                )
                known = (baselines or {}).get((table, sev, seed), {})
                if "no_adapt" in known:
                    plain[seed, sev] = known["no_adapt"]
                if (seed, sev) not in plain:  # per frame and batch-independent: the stream order changes nothing
                    plain[seed, sev] = edge_run(edge_dir, stream, OFF, 64, "reset")
                methods = {
                    "no_adapt": plain[seed, sev],
                    "edge_stats": edge_run(edge_dir, stream, stats, batch, protocol),
                }
                if batch >= 2 and table in ("zero_uplink", "continual"):
                    methods["bn_adapt"] = known.get("bn_adapt") or torch_run(model, "bn_adapt", stream, batch, protocol)
                row = {"table": table, "stream": order, "protocol": protocol, "edge_batch": batch, "severity": sev,
                       "seed": seed, "methods": methods, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                print(json.dumps({k: v for k, v in row.items() if k != "methods"}
                                 | {m: round(r["accuracy"], 2) for m, r in methods.items()}), flush=True)  # fmt: skip
                rows.append(row)
    return rows


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "spread": float(np.std(values)), "min": float(np.min(values))}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means/spreads per (table, severity, method) and every target's PASS/MISS."""
    tables: dict[str, Any] = {}
    for r in rows:
        key = f"{r['table']}/s{r['severity']}"
        for m, res in r["methods"].items():
            tables.setdefault(key, {}).setdefault(m, []).append(res["accuracy"])
    means = {k: {m: _stat(v) for m, v in ms.items()} for k, ms in tables.items()}
    checks = []

    def check(name: str, value: float, bound: float) -> None:
        checks.append({"target": name, "value": round(value, 2), "bound": round(bound, 2), "pass": value >= bound})

    for sev in (3, 5):
        if not all(f"{t}/s{sev}" in means for t in ("zero_uplink", "batch_1", "continual")):
            continue
        z = means[f"zero_uplink/s{sev}"]
        check(
            f"zero uplink s{sev} b64: edge_stats >= bn_adapt - 0.5",
            z["edge_stats"]["mean"],
            z["bn_adapt"]["mean"] - 0.5,
        )
        b = means[f"batch_1/s{sev}"]
        if sev == 5:
            check("batch 1 s5: edge_stats >= no_adapt + 20", b["edge_stats"]["mean"], b["no_adapt"]["mean"] + 20)
        check(
            f"batch 1 s{sev}: edge_stats >= its batch-64 accuracy - 2",
            b["edge_stats"]["mean"],
            z["edge_stats"]["mean"] - 2,
        )
        c = means[f"continual/s{sev}"]
        check(f"continual s{sev}: edge_stats >= bn_adapt", c["edge_stats"]["mean"], c["bn_adapt"]["mean"])
        worst = min(
            r["methods"]["edge_stats"]["per_corruption"][k] - r["methods"]["no_adapt"]["per_corruption"][k]
            for r in rows
            if r["table"] == "continual" and r["severity"] == sev
            for k in r["methods"]["no_adapt"]["per_corruption"]
        )
        check(f"continual s{sev}: edge_stats - no_adapt on the worst corruption and seed >= 0", worst, 0.0)
    for table in ("sorted", "sorted_b64"):
        for sev in (1, 3, 5):
            if f"{table}/s{sev}" not in means:
                continue
            s = means[f"{table}/s{sev}"]
            check(f"{table} s{sev}: edge_stats >= no_adapt - 1", s["edge_stats"]["mean"], s["no_adapt"]["mean"] - 1)
    return {"tables": means, "targets": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--edge", type=Path, default=None, help="edge resnet10t checkpoint (default: the quick demo's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/2026-12-03-edge-stats-targets"))
    ap.add_argument("--tables", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    ap.add_argument("--summarize", action="store_true", help="only merge the rows-*.json in --out for --seeds")
    ap.add_argument("--tag", default=None, help="file name stem (default: seeds-<seeds>)")
    ap.add_argument("--balance-measure", default=EDGE_STATS.balance_measure, choices=BALANCE_MEASURES,
                    help="the label-concentration guard's measure (StatsConfig.balance_measure)")  # fmt: skip
    ap.add_argument("--prior-mix", default=EDGE_STATS.prior_mix, choices=PRIOR_MIXES,
                    help="how ema combines the source prior with the frames (StatsConfig.prior_mix)")  # fmt: skip
    ap.add_argument("--balance-after", type=int, default=EDGE_STATS.balance_after,
                    help="frames since a reset before the guard reads labels (StatsConfig.balance_after)")  # fmt: skip
    ap.add_argument("--dense-frames", type=int, default=EDGE_STATS.dense_frames,
                    help="frames probed densely after a reset (StatsConfig.dense_frames)")  # fmt: skip
    ap.add_argument("--baselines-from", type=Path, default=None,
                    help="reuse no_adapt/bn_adapt from the rows-*.json in DIR (same seeds and streams)")  # fmt: skip
    args = ap.parse_args()
    tag = args.tag or "seeds-" + "-".join(map(str, args.seeds))
    if args.summarize:
        rows = [r for f in sorted(args.out.glob("rows-*.json")) for r in json.loads(f.read_text())["rows"]]
        rows = [r for r in rows if r["seed"] in args.seeds]
        summary = summarize(rows)
        for c in summary["targets"]:
            print(f"{'PASS' if c['pass'] else 'MISS'}  {c['target']}: {c['value']:.2f} vs {c['bound']:.2f}")
        for key, ms in sorted(summary["tables"].items()):
            print(key, "  ".join(f"{m} {v['mean']:.2f} +- {v['spread']:.2f}" for m, v in sorted(ms.items())))
        (args.out / f"summary-{tag}.json").write_text(json.dumps({"seeds": args.seeds, **summary}, indent=1))
        print(f"wrote {args.out / f'summary-{tag}.json'}")
        return
    ckpt = args.edge
    if ckpt is None:  # the quick demo's edge model (demo --quick: 4 epochs), trained here on an empty cache
        ckpt = train_model(replace(EDGE_DEFAULT, epochs=4), digits_splits(0), seed=0, role="edge").checkpoint
    stats = replace(
        EDGE_STATS,
        balance_measure=args.balance_measure,
        prior_mix=args.prior_mix,
        balance_after=args.balance_after,
        dense_frames=args.dense_frames,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(ckpt, args.seeds, args.tables, Path(tmp), stats, load_baselines(args.baselines_from))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"edge_checkpoint": str(ckpt), "seeds": args.seeds, "tables": args.tables,
              "settings": {k: v for k, v in stats.__dict__.items() if k != "shift"},
              "per_corruption": PER_CORRUPTION, "corruptions": QUICK_CORRUPTIONS, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    path = args.out / f"rows-{tag}-{'-'.join(args.tables)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}; merge with --summarize")


if __name__ == "__main__":
    main()
