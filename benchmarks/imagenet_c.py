"""The demo's protocol on ImageNet-C: timm resnet50 at the edge, resnet101 as the teacher (paper Sec. 4).

For users who have the data and weights (nothing is downloaded; not run in CI). Reads the standard layout
``ROOT/<corruption>/<severity>/<wnid>/*.JPEG`` (class index = sorted wnid order, i.e. ImageNet's), streams the
corruptions in sequence, and runs the same methods as ``cema-deploy demo``: no adaptation, BN statistics
adaptation, Tent, and the cloud-backed EATA-style selection and CEMA (a real ``cloud serve`` process and a separate
torch-free ``edge run`` process). Writes results.json/results.md and plots like the demo.

    python benchmarks/imagenet_c.py --root /data/ImageNet-C --edge-weights r50.safetensors \\
        --teacher-weights r101.safetensors --severity 5 --limit 5000 --out out/imagenet-c

With ``--limit`` each corruption is subsampled (seeded) to keep a CPU run short; the paper uses all 50,000.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="ImageNet-C root folder")
    ap.add_argument("--edge", default="resnet50")
    ap.add_argument("--edge-weights", type=Path, required=True, help="state dict of the edge model")
    ap.add_argument("--teacher", default="resnet101")
    ap.add_argument("--teacher-weights", type=Path, required=True, help="state dict of the teacher")
    ap.add_argument("--severity", default="5", help="comma-separated severities")
    ap.add_argument("--limit", type=int, default=None, help="images per corruption (default: all)")
    ap.add_argument("--methods", default="no_adapt,bn_adapt,tent,eata_style,cema")
    ap.add_argument("--out", type=Path, default=Path("out/imagenet-c"))
    args = ap.parse_args()

    from rich.console import Console

    from cema_deploy.demo import baselines
    from cema_deploy.demo.models import TrainedModel, load_model
    from cema_deploy.demo.report import MethodRun, print_table, summarize, write_outputs
    from cema_deploy.demo.run import DemoConfig, run_cloud_method
    from cema_deploy.demo.stream import imagenet_c_stream
    from cema_deploy.export import export_timm

    console = Console()
    cfg = DemoConfig(warmup=1000, d_margin="auto", replay_size=10_000)  # ImageNet-C: the paper's defaults
    edge = load_model(args.edge, args.edge_weights, num_classes=1000)
    teacher = TrainedModel(args.teacher, args.teacher_weights, float("nan"), 0.0)
    edge_dir = args.out / "edge-model"
    console.print(f"exporting {args.edge} ...")
    export_timm(args.edge, edge_dir, model=edge, img_size=224)
    methods = [m.strip() for m in args.methods.split(",")]
    results: dict = {"config": {**vars(args), "root": str(args.root), "out": str(args.out)}, "severities": {}}
    runs: dict[int, dict[str, MethodRun]] = {}
    for sev in (int(s) for s in args.severity.split(",")):
        console.print(f"severity {sev}: reading ImageNet-C ...")
        stream = imagenet_c_stream(args.root, severity=sev, size=224, limit=args.limit)
        none = np.zeros(len(stream.labels), bool)
        runs[sev] = {}
        for method in methods:
            t0 = time.perf_counter()
            console.print(f"severity {sev}: {method} ...")
            if method in ("no_adapt", "bn_adapt", "tent"):
                res = baselines.run_baseline(method, edge, stream, batch=cfg.edge_batch)
                runs[sev][method] = MethodRun(res.correct, none, {})
            else:
                runs[sev][method] = run_cloud_method(
                    method, stream, edge_dir, teacher, args.out / f"s{sev}-{method}", cfg
                )
            runs[sev][method].extra["seconds"] = round(time.perf_counter() - t0, 1)
        results["severities"][str(sev)] = {
            "methods": summarize(runs[sev], stream.segment_of, [s.name for s in stream.segments])
        }
    for p in write_outputs(results, runs, args.out):
        console.print(f"wrote {p}")
    print_table(results, console)


if __name__ == "__main__":
    main()
