"""Memory of a long edge run: RSS of the edge loop over a synthetic paced source, sampled as it serves.

Issue 19 (finding 6): ``edge run`` kept five per-frame arrays for the life of the process (~1.5 GB a day on a 30
fps camera). Now predictions are streamed to the ``--predictions`` file as they are served and the loop keeps
counters only (``cema_deploy.runtime.stream``). This script runs that loop in-process, as ``edge run`` does
(``EdgeRuntime`` + ``serve_stream`` + ``PredictionWriter`` to a ``.csv``), on ``--frames`` synthetic frames paced
at ``--fps`` (a stand-in for a camera: a generator yielding batches of random uint8 frames, never stored), and
samples the process's RSS every ``--sample-every`` frames. The target: RSS flat within 5 % after the warm-up
(``--warmup`` frames), i.e. ``max(rss after warm-up) / rss at the end of warm-up <= 1.05``.

It exports a tiny timm model first (``test_resnet``, random weights, ``--img-size`` px, no download) in a
subprocess, so torch never enters the measured process. No cloud: the uplink keeps its own bounded queue and is
measured by the fleet benchmarks; this one measures what the loop keeps per frame. For comparison, the same run
is made a second time keeping the five per-frame arrays the old loop kept (``keep`` mode: int64 class and version,
float32 entropy, two bools, 22 bytes a frame plus five array objects a batch), each mode in its own process.

    python benchmarks/edge_rss.py --frames 100000 --fps 2000 --json benchmarks/results/2026-12-03-edge-rss/edge_rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def paced_frames(n: int, batch: int, size: int, fps: float, seed: int = 0) -> Iterator[np.ndarray]:
    """``n`` random uint8 frames ``[size, size, 3]`` in batches, at most ``fps`` frames a second (a camera)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (8, batch, size, size, 3), dtype=np.uint8)  # reused: the source holds nothing
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        k = min(batch, n - i)
        due = t0 + (i + k) / fps
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield pool[(i // batch) % len(pool), :k].copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--fps", type=float, default=2000.0, help="pace of the synthetic source (frames/s)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10_000, help="frames before the reference RSS is taken")
    ap.add_argument("--sample-every", type=int, default=2_000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--modes", default="stream,keep", help="stream (edge run now), keep (the old loop's arrays)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run(args, args.child)))
        return
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
        results[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = results[mode]
        print(f"{mode}: {r['frames']} frames at {r['served_fps']:.0f} frames/s: RSS {r['rss_mb_at_warmup']:.1f} MiB "
              f"after {args.warmup} frames, max {r['rss_mb_max_after_warmup']:.1f} MiB after (ratio "
              f"{r['rss_ratio_max_over_warmup']:.3f}), end {r['rss_mb_end']:.1f} MiB")  # fmt: skip
    out = {
        "modes": results,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
    }
    if "stream" in results and "keep" in results:
        grow = {m: results[m]["rss_mb_end"] - results[m]["rss_mb_at_warmup"] for m in ("stream", "keep")}
        out["growth_mb_after_warmup"] = grow
        print(f"growth after warm-up: stream {grow['stream']:+.2f} MiB, keep {grow['keep']:+.2f} MiB")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def run(args: argparse.Namespace, mode: str) -> dict[str, object]:
    """One mode, in this process: the edge loop over the paced source, RSS sampled."""

    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.predictions import PredictionWriter
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
    from cema_deploy.runtime.stream import serve_stream

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        subprocess.run([sys.executable, "-m", "cema_deploy", "export", "test_resnet", "--out", str(out),
                        "--num-classes", "10", "--img-size", str(args.img_size)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        samples: list[tuple[int, float]] = []
        be = get_backend("ort-cpu", out, intra_op_threads=1)
        cfg = SelectionConfig.preset("random", be.manifest.num_classes, share=0.1)
        t0 = time.perf_counter()
        with EdgeRuntime(be, SampleSelector(cfg)) as rt, PredictionWriter(Path(tmp) / "p.csv") as writer:
            kept: list[list[np.ndarray]] = [[], [], [], [], []]

            def on_batch(step: Any, t: object) -> None:
                if mode == "keep":  # what cli/edge.py kept before issue 19
                    n = len(step.predictions)
                    for lst, a in zip(kept, (step.predictions, step.selection.entropy, step.selection.mask,
                                             np.zeros(n, bool), np.full(n, step.version)), strict=True):  # fmt: skip
                        lst.append(a)
                frames = rt.frames
                if frames % args.sample_every < args.batch:
                    samples.append((frames, rss_mb()))

            tally = serve_stream(rt, paced_frames(args.frames, args.batch, args.img_size, args.fps),
                                 writer=writer if mode == "stream" else None, on_batch=on_batch)  # fmt: skip
        wall = time.perf_counter() - t0
        be.close()
        with open(Path(tmp) / "p.csv") as f:
            rows = sum(1 for _ in f) - 1
    after = [r for f, r in samples if f >= args.warmup]
    ref = after[0]
    return {
        "mode": mode,
        "frames": tally.frames,
        "prediction_rows": rows,
        "fps_target": args.fps,
        "served_fps": tally.frames / wall,
        "batch": args.batch,
        "img_size": args.img_size,
        "warmup_frames": args.warmup,
        "rss_mb_at_warmup": ref,
        "rss_mb_max_after_warmup": max(after),
        "rss_mb_end": after[-1],
        "rss_ratio_max_over_warmup": max(after) / ref,
        "flat_within_5pct": max(after) / ref <= 1.05,
        "samples": [{"frames": f, "rss_mb": round(r, 2)} for f, r in samples],
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
