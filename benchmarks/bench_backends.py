"""Published edge numbers: refittable vs BN-folded engine, edge step vs bare inference, hot and sustained refits.

Exports resnet18 and resnet50 (random init; weights do not change speed) with a BN-folded reference, then runs
``cema-deploy bench``'s measurement (``cema_deploy.bench.run_bench``) on every backend available here and
writes one JSON file per model. Only the public API is used.

    python benchmarks/bench_backends.py --models resnet18,resnet50 --batch 1,16 --out benchmarks/results
    python benchmarks/bench_backends.py --models resnet50 --batch 1 --sustained-refit 60 --refit-every 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from cema_deploy.bench import available_backends, print_report, run_bench
from cema_deploy.export import export_timm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--backend", default=None, help="comma-separated; default: all available here")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--refit-repeats", type=int, default=3, help="hot refits timed under load (medians)")
    ap.add_argument("--sustained-refit", type=float, default=0.0, metavar="SECONDS", help="0 = off")
    ap.add_argument("--refit-every", type=float, default=1.0, metavar="S")
    ap.add_argument("--min-refit-interval", type=float, default=0.0, metavar="S")
    args = ap.parse_args()
    backends = args.backend.split(",") if args.backend else available_backends()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = Path(tmp) / name
            t0 = time.perf_counter()
            export_timm(name, model_dir, folded_reference=True)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
            report = run_bench(
                model_dir,
                backends=backends,
                batches=[int(b) for b in args.batch.split(",")],
                rounds=args.rounds,
                seconds_per_round=args.seconds,
                refit_repeats=args.refit_repeats,
                sustained_refit_s=args.sustained_refit,
                refit_every_s=args.refit_every,
                min_refit_interval_s=args.min_refit_interval,
            )
            report["command"] = shlex.join(["python", *sys.argv])
            print_report(report)
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
