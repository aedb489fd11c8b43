"""The cloud on top of the edge's own statistics (issue 21, item 3), a first look on ONE seed: the default rule
(random 10 %) in the frontier's in-process runner style (real EdgeRuntime on ONNX Runtime, real local deployment
joined by LocalLink, ``--sync``), with the edge's statistics adapter on (``ema`` at ``edge run``'s rate: dense for
128 frames, then one batch in 128; protocol 3: no calibration uploads, statistics reports, the replica normalising
the device's uploads with them) against the same rule with the adapter off (the frontier's own ``run_job``: the
paper's calibration uploads), plus the adapter alone (no cloud) and the PyTorch rows no_adapt / bn_adapt.

Not the issue's target protocol (3 + 3 seeds, default models, severities 3 and 5); the statsdemo work wires
``random+stats`` into the demo and the frontier for that.

Example:
    CEMA_DEPLOY_CACHE=/tmp/tl-cache python benchmarks/edge_stats_cloud.py --quick-models --all-corruptions \
        --per-corruption 0 --out benchmarks/results/2026-12-03-edge-stats-cloud
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def run_with_edge_stats(
    job: Any,
    *,
    work: Path,
    edge_dir: Path,
    teacher: tuple[str, Path],
    stream: Any,
    cloud: bool,
    edge_batch: int = 64,
    cloud_batch: int = 32,
    replay_size: int = 400,
) -> dict[str, Any]:
    """``demo.frontier.run_job`` with the edge's statistics adapter on (``cloud=False``: the adapter alone)."""
    from cema_deploy.cloud.config import CemaConfig, DeploymentSpec
    from cema_deploy.cloud.deployment import Deployment
    from cema_deploy.cloud.engines.local import LocalEngine
    from cema_deploy.cloud.local_link import LocalLink
    from cema_deploy.demo.frontier import _selector_config
    from cema_deploy.demo.run import WARMUP
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.selection.rules import SampleSelector
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir

    state = work / ("stats-" + job.key.replace("/", "_"))
    shutil.rmtree(state, ignore_errors=True)
    engine = None
    if cloud:
        spec = DeploymentSpec(
            name="frontier",
            edge=edge_dir,
            teacher=teacher[0],
            teacher_weights=teacher[1],
            method=CemaConfig(batch_size=cloud_batch, replay_size=replay_size, seed=job.seed),
        )
        dep = Deployment.from_spec(spec, state)
        engine = LocalEngine([dep])
        engine.start()
    backend = get_backend("ort-cpu", edge_dir, intra_op_threads=1)
    cfg = _selector_config(job, WARMUP[job.protocol], None)
    stats_cfg = StatsConfig(mode="ema", dense_frames=128)
    correct = seen = uploaded = rollbacks = reports = 0
    fp = backend.manifest.fingerprint
    try:
        parts = [[s] for s in stream.segments] if job.protocol == "reset" else [list(stream.segments)]
        for i, segments in enumerate(parts):
            if engine is not None and job.protocol == "reset" and i > 0:
                engine.admin("frontier", "reset")
            adapter, why = stats_adapter_from_dir(backend, edge_dir, stats_cfg)  # fresh statistics per run
            assert adapter is not None, why
            link = LocalLink(engine, fp, f"frontier-{job.seed}") if engine is not None else None
            rt = EdgeRuntime(
                backend,
                SampleSelector(cfg),
                client=link,
                poll_wait_s=1.0,
                sync=True,
                upload_batch=cloud_batch,
                selector_factory=lambda: SampleSelector(cfg),
                stats=adapter,
            )
            try:
                for seg in segments:
                    for a in range(0, len(seg.labels), edge_batch):
                        step = rt.process(np.asarray(seg.images[a : a + edge_batch]))
                        if link is not None and not rt.sync(timeout=300):
                            raise RuntimeError(f"{job.key}: sync timed out")
                        correct += int((step.predictions == seg.labels[a : a + edge_batch]).sum())
                m = rt.metrics()
                seen += m["frames"]
                uploaded += sum(m["uploaded"].values())
                rollbacks += int(m["rollbacks"])
            finally:
                rt.close()
        if engine is not None:
            reports = int(dep.counters["edge_stats_reports"])
            used = int(sum(dep.edge_stats_used.values()))
    finally:
        backend.close()
        if engine is not None:
            engine.stop()
        shutil.rmtree(state, ignore_errors=True)
    out = {"accuracy": 100 * correct / seen, "share": 100 * uploaded / seen, "rollbacks": rollbacks, "frames": seen}
    if engine is not None:
        out |= {"statistics_reports": reports, "samples_normalised_with_edge_statistics": used}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-corruption", type=int, default=300, help="0: the whole test split (899)")
    ap.add_argument("--protocol", default="reset")
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--quick-models", action="store_true", help="the demo --quick models (edge 4, teacher 8 epochs)")
    ap.add_argument("--all-corruptions", action="store_true", help="the 13 corruptions (default: demo --quick's 4)")
    args = ap.parse_args()

    import logging

    import torch

    from cema_deploy.demo.baselines import run_baseline
    from cema_deploy.demo.frontier import Job, run_job
    from cema_deploy.demo.models import EDGE_DEFAULT, TEACHER_DEFAULT, load_model, resolve_models
    from cema_deploy.demo.stream import CORRUPTIONS, QUICK_CORRUPTIONS, corrupted_stream, digits_splits
    from cema_deploy.export.to_onnx import export_timm

    torch.set_num_threads(1)
    logging.getLogger("cema_deploy").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = digits_splits(0)
    edge_spec, teacher_spec = EDGE_DEFAULT, TEACHER_DEFAULT
    if args.quick_models:
        edge_spec, teacher_spec = replace(EDGE_DEFAULT, epochs=4), replace(TEACHER_DEFAULT, epochs=8)
    models = resolve_models(None, None, splits, seed=0, edge_spec=edge_spec, teacher_spec=teacher_spec)
    edge = load_model(models.edge.name, models.edge.checkpoint)
    edge_dir = args.out / "work" / "edge-model"
    if not (edge_dir / "manifest.json").exists():
        export_timm(models.edge.name, edge_dir, model=edge, img_size=splits[0].shape[1])
    _, _, x, y = splits
    n = args.per_corruption or len(y)
    corruptions = CORRUPTIONS if args.all_corruptions else QUICK_CORRUPTIONS
    stream = corrupted_stream(x[:n], y[:n], severity=args.severity, corruptions=corruptions, seed=args.seed)
    stream = stream.shuffled(args.seed)
    teacher = (models.teacher.name, models.teacher.checkpoint)
    job = Job(rule="random", knob=args.share, protocol=args.protocol, severity=args.severity, seed=args.seed)
    rows: dict[str, Any] = {}
    print(f"stream ready: {len(stream.segments)} corruptions x {n} frames", flush=True)
    for b in ("no_adapt", "bn_adapt"):
        rows[b] = {"accuracy": 100 * run_baseline(b, edge, stream, protocol=args.protocol).accuracy, "share": 0.0}
        print(f"{b:14s} accuracy {rows[b]['accuracy']:.1f} %", flush=True)
    runs = {
        "edge_stats": lambda: run_with_edge_stats(
            job, work=args.out / "work", edge_dir=edge_dir, teacher=teacher, stream=stream, cloud=False
        ),
        "random": lambda: run_job(job, work=args.out / "work", edge_dir=edge_dir, teacher=teacher, stream=stream),
        "random+stats": lambda: run_with_edge_stats(
            job, work=args.out / "work", edge_dir=edge_dir, teacher=teacher, stream=stream, cloud=True
        ),
    }
    doc: dict[str, Any] = {
        "what": "ONE seed, quick models: a first look, NOT the issue's target protocol",
        "severity": args.severity,
        "seed": args.seed,
        "protocol": args.protocol,
        "corruptions": list(corruptions),
        "per_corruption": n,
        "share": args.share,
        "models": {
            "edge": [models.edge.name, 100 * models.edge.clean_accuracy],
            "teacher": [models.teacher.name, 100 * models.teacher.clean_accuracy],
        },
        "rows": rows,
    }
    for name, fn in runs.items():
        t0 = time.perf_counter()
        res = fn()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = {k: res[k] for k in res if k not in ("diagnosis",)}
        print(
            f"{name:14s} accuracy {res['accuracy']:.1f} %  uploaded {res['share']:.1f} %  ({res['seconds']} s)",
            flush=True,
        )
        (args.out / "edge_stats_cloud.json").write_text(json.dumps(doc, indent=2, default=str))
    (args.out / "edge_stats_cloud.json").write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
