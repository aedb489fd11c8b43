"""The demo's protocols on ImageNet-C: timm resnet50 at the edge, resnet101 as the teacher (paper Sec. 4).

For users who have the data and weights (nothing is downloaded; not run in CI). Reads the standard layout
``ROOT/<corruption>/<severity>/<wnid>/*.JPEG`` (class index = sorted wnid order, i.e. ImageNet's), every one of
the 15 corruptions whose folder exists, each shuffled with a seeded generator (a class-sorted stream is not what
the paper runs) and read on demand, so memory stays bounded by a batch. Runs the same methods as ``cema-deploy
demo``, under the paper's reset protocol by default: no adaptation, BN statistics adaptation, Tent, and the
cloud-backed EATA-style selection, CEMA and random uploads (a real ``cloud serve`` process, reset by the operator
per corruption, and torch-free ``edge run`` processes). Writes results.json/results.md and plots like the demo.

    python benchmarks/imagenet_c.py --root /data/ImageNet-C --edge-weights r50.safetensors \\
        --teacher-weights r101.safetensors --severity 5 --limit 5000 --out out/imagenet-c

With ``--limit`` each corruption is a seeded random subset; the paper uses all 50,000. The paper's setting is
``--warmup 1000 --replay-size 10000 --d-margin auto`` (the defaults here).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="ImageNet-C root folder")
    ap.add_argument("--edge", default="resnet50")
    ap.add_argument("--edge-weights", type=Path, required=True, help="state dict of the edge model")
    ap.add_argument("--teacher", default="resnet101")
    ap.add_argument("--teacher-weights", type=Path, required=True, help="state dict of the teacher")
    ap.add_argument("--severity", default="5", help="comma-separated severities")
    ap.add_argument("--protocol", default="reset", choices=("reset", "continual"))
    ap.add_argument("--seeds", type=int, default=1, help="stream seeds (shuffle, selection and replay draws)")
    ap.add_argument("--limit", type=int, default=None, help="images per corruption (default: all)")
    ap.add_argument("--corruptions", default=None, help="comma-separated subset (default: every folder present)")
    ap.add_argument("--methods", default="no_adapt,bn_adapt,tent,eata_style,cema,random")
    ap.add_argument("--share", type=float, default=0.1, help="upload share of the random rule")
    ap.add_argument("--warmup", type=int, default=1000, help="W of CEMA's dynamic E_max (paper: 1000)")
    ap.add_argument("--replay-size", type=int, default=10_000, help="replay buffer (paper: 10,000)")
    ap.add_argument("--d-margin", default="auto", help="redundancy margin: auto (paper's 0.05 at 1,000 classes)")
    ap.add_argument("--out", type=Path, default=Path("out/imagenet-c"))
    args = ap.parse_args()

    from rich.console import Console

    from cema_deploy.demo.models import TrainedModel, load_model
    from cema_deploy.demo.report import aggregate, print_table, summarize, write_outputs
    from cema_deploy.demo.run import DemoConfig, run_stream
    from cema_deploy.demo.stream import imagenet_c_stream
    from cema_deploy.export import export_timm

    console = Console()
    cfg = DemoConfig(
        protocol=args.protocol,
        methods=tuple(m.strip() for m in args.methods.split(",")),
        seeds=args.seeds,
        warmup=args.warmup,
        d_margin=args.d_margin,
        replay_size=args.replay_size,
        share=args.share,
    )
    edge = load_model(args.edge, args.edge_weights, num_classes=1000)
    teacher = TrainedModel(args.teacher, args.teacher_weights, float("nan"), 0.0)
    edge_dir = args.out / "edge-model"
    console.print(f"exporting {args.edge} ...")
    export_timm(args.edge, edge_dir, model=edge, img_size=224)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    corruptions = None if args.corruptions is None else [c.strip() for c in args.corruptions.split(",")]
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "protocol": cfg.protocol,
        "seeds": seeds,
        "config": {**dataclasses.asdict(cfg), **{k: str(v) for k, v in vars(args).items()}},
        "severities": {},
    }
    first, boundaries = {}, {}
    for sev in (int(s) for s in args.severity.split(",")):
        per_seed = []
        for seed in seeds:
            stream = imagenet_c_stream(args.root, severity=sev, corruptions=corruptions, limit=args.limit, seed=seed)
            console.print(f"severity {sev}, seed {seed}: {len(stream)} images in {len(stream.segments)} corruptions")
            runs = run_stream(stream, edge, edge_dir, teacher, args.out, f"s{sev}-seed{seed}", cfg, seed, console.print)
            per_seed.append(summarize(runs, stream.segment_of, [s.name for s in stream.segments]))
            if seed == seeds[0]:
                first[sev], boundaries[sev] = runs, stream.boundaries
        results["severities"][str(sev)] = {"methods": aggregate(per_seed, seeds)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for p in write_outputs(results, first, args.out, boundaries):
        console.print(f"wrote {p}")
    print_table(results, console)


if __name__ == "__main__":
    main()
