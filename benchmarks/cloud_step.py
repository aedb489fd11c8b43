"""Time the cloud's adaptation step on a device and say how many edges one device keeps up with.

    python benchmarks/cloud_step.py out/r50 --teacher resnet101 --device cuda --json cloud-step.json
    python benchmarks/cloud_step.py out/r50 --teacher resnet101 --device cuda --teacher-dtype bfloat16

One step is what the deployment runs per B uploaded samples (:meth:`cema_deploy.cloud.method.Cema.adapt`: the
teacher's weighted-entropy step on B, then the replica distilled on B + 3B replayed, Eqn. 6-7, the official
loop's mix; ``--cloud-set student_steps=4`` etc. sets the effort, ``--cloud-set gate=true`` adds the gate's
forwards), on random uint8 images of the export's input size, after ``--warmup`` untimed steps. Edges per
device = samples/s / ``--uploads-per-edge`` (an edge uploading 1 frame per second by default: 10 % of 10 FPS);
one replay-only step (4B, no teacher) per edge batch that completed no cloud step costs extra and is timed apart.
The teacher is random init unless ``--teacher-weights``: speed does not depend on the weights. Prints a table and
writes JSON. This is the "edges per GPU" figure of the fleet issue; ``gpu_check.sh`` runs it where CUDA is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def time_steps(model_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    from cema_deploy.cloud.config import CemaConfig, parse_method_settings
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export, resolve_device, teacher_from_name
    from cema_deploy.contract.manifest import manifest_from_dir

    manifest = manifest_from_dir(model_dir)
    config = CemaConfig(**{"batch_size": args.batch} | parse_method_settings(args.cloud_set))
    device = resolve_device(args.device)
    teacher = teacher_from_name(args.teacher, num_classes=manifest.num_classes, weights=args.teacher_weights)
    cema = Cema(
        teacher,
        replica_from_export(model_dir, manifest),
        manifest=manifest,
        config=config,
        device=device,
        teacher_dtype=args.teacher_dtype,
    )
    h, w = manifest.preprocess.size
    rng = np.random.default_rng(0)
    new = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
    n_rep = config.student_steps * config.replay_factor * args.batch  # what the deployment draws per cloud step
    replayed = rng.integers(0, 256, (n_rep, h, w, 3), dtype=np.uint8)
    judged = rng.integers(0, 256, (config.gate_frames, h, w, 3), dtype=np.uint8)
    replay_only = rng.integers(0, 256, (4 * args.batch, h, w, 3), dtype=np.uint8)

    def timed(fn, *a) -> float:  # type: ignore[no-untyped-def]
        for _ in range(args.warmup):
            fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / args.steps

    step_s = timed(cema.adapt, new, replayed)
    replay_s = timed(cema.replay_step, replay_only)

    def judge() -> None:  # what the gate adds to a step: the teacher and two replicas on gate_frames frames
        cema.predict(judged)
        cema.predict_replica(judged)

    gate_s = timed(judge) if config.gate else 0.0
    samples_per_s = args.batch / (step_s + gate_s)
    return {
        "model": manifest.model_name,
        "teacher": args.teacher,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher_dtype": args.teacher_dtype,
        "batch": args.batch,
        "image_hw": [h, w],
        "step_ms": 1000 * step_s,
        "replay_step_ms": 1000 * replay_s,
        "gate_ms": 1000 * gate_s,
        "cloud": dict(config.as_dict()),
        "cpu_s_per_sample": (step_s + gate_s) / args.batch,
        "steps_per_s": 1 / (step_s + gate_s),
        "samples_per_s": samples_per_s,
        "uploads_per_edge_per_s": args.uploads_per_edge,
        "edges_per_device": samples_per_s / args.uploads_per_edge,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="an export directory (cema-deploy export ...)")
    ap.add_argument("--teacher", default="resnet50", help="timm name of the teacher")
    ap.add_argument("--teacher-weights", type=Path, default=None)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batch", type=int, default=64, help="B, samples per cloud step (the paper's ImageNet B = 64)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--uploads-per-edge", type=float, default=1.0, help="samples/s one edge uploads")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cloud-set", action="append", default=[], help="KEY=VALUE: a CemaConfig field (the effort)")
    args = ap.parse_args()
    row = time_steps(args.export, args)
    print("| model | teacher | device | dtype | B | step ms | replay-only step ms | samples/s | edges/device |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| {row['model']} | {row['teacher']} | {row['device_name']} | {row['teacher_dtype']} | {row['batch']} | "
        f"{row['step_ms']:.1f} | {row['replay_step_ms']:.1f} | {row['samples_per_s']:.1f} | "
        f"{row['edges_per_device']:.0f} at {args.uploads_per_edge:g}/s |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
