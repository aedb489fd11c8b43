"""The demo's edge-alone methods: the real ``edge run`` on ONNX Runtime with its statistics adapter, no cloud.

``edge_stats`` runs ``edge run``'s default mode when that is on, else ``ema``, at the default probe rate (see README,
"The edge's own statistics"); ``edge_stats_ema`` and ``edge_stats_alpha`` pin the mode and probe every batch (the
accuracy the adapter reaches when its cost does not matter). Nothing leaves the device: every row has
``uploaded`` 0. Under the reset protocol each corruption gets a fresh ``edge run`` process (fresh statistics), as the
cloud-backed methods get a reset deployment; under the continual protocol one process streams everything and the
adapter's shift detector decides when to start afresh.

``RULE+stats`` (``random+stats``, ``cema+stats``, ...): a cloud rule whose edge also runs its statistics adapter
with ``edge_stats``'s settings (:data:`EDGE_STATS_SETTINGS`): the edge owns the running statistics, the cloud
the affine parameters (:func:`split_stats`).

Also the stream orders of ``demo --stream``: ``shuffled`` (the paper's) and ``sorted`` (frames grouped by class within
each corruption, the label-correlated case of a camera watching one class for a while).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.demo.report import MethodRun
from cema_deploy.demo.stream import LazyImages, Segment, Stream
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.stats.adapter import DEFAULT_EVERY

#: The statistics adapter's settings of ``edge_stats`` and of every ``RULE+stats`` method (``StatsConfig`` fields;
#: the others keep ``edge run``'s defaults).
EDGE_STATS_SETTINGS: dict[str, Any] = {"mode": "ema", "every": DEFAULT_EVERY, "dense_frames": 128}
#: A cloud rule with the edge's statistics on: ``random+stats``.
STATS_SUFFIX = "+stats"


def stats_flags(settings: dict[str, Any] = EDGE_STATS_SETTINGS) -> list[str]:
    """``edge run`` options of the statistics adapter with ``settings``."""
    flags = ["--adapt-stats", str(settings["mode"]), "--stats-every", str(settings["every"])]
    return [*flags, "--stats-dense-frames", str(settings["dense_frames"])]


def split_stats(method: str) -> tuple[str, bool]:
    """``"random+stats"`` -> ``("random", True)``; ``"random"`` -> ``("random", False)``."""
    if method.endswith(STATS_SUFFIX):
        return method[: -len(STATS_SUFFIX)], True
    return method, False


#: ``edge run`` options of each edge-alone method.
EDGE_ONLY_METHODS: dict[str, list[str]] = {
    "edge_stats": stats_flags(),
    "edge_stats_ema": ["--adapt-stats", "ema", "--stats-every", "1"],
    "edge_stats_alpha": ["--adapt-stats", "alpha", "--stats-every", "1"],
}
STREAM_ORDERS = ("shuffled", "sorted")
#: PyTorch baselines that normalize with the statistics of each batch (meaningless below 2 frames a batch).
NEEDS_BATCH_STATISTICS = ("bn_adapt", "tent")


def ordered(stream: Stream, order: str, seed: int) -> Stream:
    """``stream`` shuffled within each corruption (``shuffled``), or grouped by class within each corruption in a
    seeded random class order, frames of a class shuffled (``sorted``)."""
    if order not in STREAM_ORDERS:
        raise CemaError(f"--stream must be one of {', '.join(STREAM_ORDERS)}, got {order!r}.")
    shuffled = stream.shuffled(seed)
    if order == "shuffled":
        return shuffled
    segments = []
    for i, s in enumerate(shuffled.segments):
        rng = np.random.default_rng([seed, i, 1])
        rank = rng.permutation(int(s.labels.max()) + 1 if len(s.labels) else 0)
        idx = np.argsort(rank[s.labels], kind="stable")  # stable: the shuffle stays within a class
        images = s.images.take(idx) if isinstance(s.images, LazyImages) else s.images[idx]
        segments.append(Segment(s.name, images, s.labels[idx]))
    return Stream(tuple(segments), stream.severity)


def _edge_alone(
    method: str, segments: list[Segment], edge_dir: Path, work: Path, batch: int, tag: str
) -> dict[str, Any]:
    images = np.concatenate([np.asarray(s.images) for s in segments])
    labels = np.concatenate([s.labels for s in segments])
    np.save(work / f"stream-{tag}.npy", images)
    np.save(work / f"labels-{tag}.npy", labels)
    cmd = [sys.executable, "-m", "cema_deploy", "edge", "run", str(edge_dir)]
    cmd += ["--source", str(work / f"stream-{tag}.npy"), "--labels", str(work / f"labels-{tag}.npy")]
    cmd += [*EDGE_ONLY_METHODS[method], "--batch", str(batch), "--threads", "1", "--quiet"]
    cmd += ["--predictions", str(work / f"pred-{tag}.npz"), "--json", str(work / f"metrics-{tag}.json")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CemaError(f"The demo's edge process ({method}, {tag}) failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with np.load(work / f"pred-{tag}.npz") as pred:
        predictions = np.asarray(pred["predictions"])
    return {"pred": predictions, "metrics": json.loads((work / f"metrics-{tag}.json").read_text())}


def run_edge_only(method: str, stream: Stream, edge_dir: Path, work: Path, *, batch: int, protocol: str) -> MethodRun:
    """One edge-alone method on one (already ordered) stream; ``uploaded`` is all False by construction, and the
    edge's own uplink counter is recorded beside it (``uploaded_frames``, 0 without a cloud)."""
    work.mkdir(parents=True, exist_ok=True)
    if protocol == "reset":
        parts = [_edge_alone(method, [s], edge_dir, work, batch, f"c{i:02d}") for i, s in enumerate(stream.segments)]
    else:
        parts = [_edge_alone(method, list(stream.segments), edge_dir, work, batch, "all")]
    predictions = np.concatenate([p["pred"] for p in parts])
    metrics = [p["metrics"] for p in parts]
    stats = [m.get("stats", {}) for m in metrics]
    return MethodRun(
        correct=predictions == stream.labels,
        uploaded=np.zeros(len(predictions), bool),
        extra={
            "edge_fps": float(np.mean([m["fps"] for m in metrics])),
            "uploaded_frames": int(sum(m.get("uplink", {}).get("uploaded", 0) for m in metrics)),
            "stats_mode": stats[0].get("mode", "off"),
            "stats_probes": int(sum(s.get("probes", 0) for s in stats)),
            "stats_resets": int(sum(s.get("resets", 0) for s in stats)),
            "stats_local_generation": int(sum(s.get("local_generation", 0) for s in stats)),
            "final_version": int(metrics[-1]["version"]),
        },
    )
