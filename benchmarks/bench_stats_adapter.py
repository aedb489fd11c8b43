"""The statistics adapter's cost: edge throughput with ``--adapt-stats`` at a probe rate vs the adapter off.

Exports MODEL (random init: weights do not change speed) with its statistics probe, then runs ``EdgeRuntime.process``
(no cloud: preprocessing at model size, inference, selection; plus the adapter's probe and refit on probed
batches) interleaved in one process: each configuration takes a turn of ``--seconds``, ``--rounds`` times, so they
share the machine's noise; the ratio to ``off`` is the figure. Because a probe comes once every ``every`` batches,
short turns hold few probes on a slow machine, so the script also derives the ratio from per-batch latencies:
``overhead`` = median latency with every batch probed (``every`` 1) - median latency with the adapter off, and
``derived_vs_off[k]`` = off / (off + overhead / k), the throughput ratio at one probe in k batches. What the adapter
does on *every* batch (the shift detector; the label-concentration guard's record of the served labels) is not a
probe's: ``per_batch_overhead_s`` = median latency at the largest ``every`` given (its batches are nearly all
unprobed) - off, and ``derived_with_per_batch_vs_off[k]`` = off / (on_k + (probed - on_k) / k) with ``on_k`` that
median and ``probed`` the median with every batch probed. The load average (``os.getloadavg``) before and after is
in the JSON. Writes JSON.

    python benchmarks/bench_stats_adapter.py --model resnet50 --batch 1,16 --every 1,8,32 \\
        --out benchmarks/results/2026-12-03-edge-stats/cost-resnet50.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--every", default="1,8,32", help="probe rates to compare with off")
    ap.add_argument("--mode", default="ema")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--export-dir", type=Path, default=None, help="reuse an export (else a temporary one)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.export_dir or Path(tmp.name) / args.model
    if not (model_dir / "manifest.json").exists():
        from cema_deploy.export.to_onnx import export_timm

        export_timm(args.model, model_dir, img_size=args.img_size)
    results: dict[str, object] = {
        "model": args.model,
        "mode": args.mode,
        "threads": args.threads,
        "seconds_per_turn": args.seconds,
        "rounds": args.rounds,
        "machine": platform.platform(),
        "loadavg_before": list(os.getloadavg()),
        "batches": {},
    }
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batch.split(",")]:
        images = rng.integers(0, 256, (batch, args.img_size, args.img_size, 3), dtype=np.uint8)
        configs: dict[str, EdgeRuntime] = {}
        for every in ["off", *args.every.split(",")]:
            be = get_backend("ort-cpu", model_dir, intra_op_threads=args.threads)
            cfg = StatsConfig(mode="off") if every == "off" else StatsConfig(mode=args.mode, every=int(every))
            adapter, _ = stats_adapter_from_dir(be, model_dir, cfg)
            sel = SampleSelector(SelectionConfig.for_classes(be.manifest.num_classes))
            configs[every] = EdgeRuntime(be, sel, stats=adapter)
        frames = dict.fromkeys(configs, 0)
        busy = dict.fromkeys(configs, 0.0)
        lat: dict[str, list[float]] = {k: [] for k in configs}
        for rt in configs.values():  # warm-up, untimed
            rt.process(images)
        for _ in range(args.rounds):
            for name, rt in configs.items():
                time.sleep(0.05)
                t_end = time.perf_counter() + args.seconds
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    rt.process(images)
                    dt = time.perf_counter() - t0
                    busy[name] += dt
                    lat[name].append(dt)
                    frames[name] += batch
        row = {}
        for name, rt in configs.items():
            m = rt.metrics()
            row[name] = {"images_per_s": frames[name] / busy[name], "frames": frames[name], "stats": m["stats"],
                         "median_latency_s": float(np.median(lat[name]))}  # fmt: skip
            rt.close()
            rt.backend.close()
        base = row["off"]["images_per_s"]
        for name in row:
            row[name]["vs_off"] = row[name]["images_per_s"] / base
        derived = {}
        if "1" in row:
            off, on = row["off"]["median_latency_s"], row["1"]["median_latency_s"]
            derived = {str(k): off / (off + (on - off) / k) for k in (1, 4, 8, 16, 32, 64, 128)}
            row["overhead_per_probe_s"] = on - off  # type: ignore[assignment]
            sparse = max(configs, key=lambda k: 0 if k == "off" else int(k))
            if sparse not in ("off", "1"):  # the per-batch work, then the probe's on top of it
                on_k = row[sparse]["median_latency_s"]
                row["per_batch_overhead_s"] = on_k - off  # type: ignore[assignment]
                row["derived_with_per_batch_vs_off"] = {  # type: ignore[assignment]
                    str(k): off / (on_k + (on - on_k) / k) for k in (16, 32, 64, 128)
                }
        row["derived_vs_off"] = derived  # type: ignore[assignment]
        results["batches"][str(batch)] = row  # type: ignore[index]
        print(batch, {k: round(v["vs_off"], 3) for k, v in row.items() if isinstance(v, dict) and "vs_off" in v},
              {k: round(v, 3) for k, v in derived.items()}, flush=True)  # fmt: skip
    results["loadavg_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
