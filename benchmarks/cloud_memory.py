"""Cloud memory under a flood of maximum-size uploads: does a real ``cema-deploy cloud serve`` stay within its stated
RAM budget?

One deployment of a tiny timm model exported at 224x224 (the frame size that makes memory matter: 150,528 bytes per
frame; no download) is served on 127.0.0.1 with a large pending cap, so accepted frames pile up. After a warm-up
(uploads that run real steps at 224 px), ``--clients`` threads send, for ``--seconds``, back to back:

* *full* uploads: PNG bodies just under ``max_upload_bytes`` (16 MiB) of low-entropy frames, which decode to about
  ten times their size (each with a new Idempotency-Key, so each is stored);
* every fourth, a *bomb*: 4,096 flat frames in a few MB of PNG that would decode to 617 MB.

The cloud's RSS is sampled every 0.2 s from /proc. The stated budget (README, "Memory"):

    baseline (models, one step's tensors, after the warm-up)
    + decode_budget_mb (the frames of uploads being decoded and stored, per deployment)
    + 3 x max_upload_bytes per request in flight (the body as read, its copy, the encoded tensor while decoding)

Frames live on disk once acknowledged, so the accepted frames (reported as ``accepted_frame_mb``) are not in it.
Writes JSON (``--json``) with the figures and ``peak_over_budget`` (target <= 1).

    python benchmarks/cloud_memory.py --seconds 60 --clients 4 \
        --json benchmarks/results/2026-12-03-cloud-memory/cloud-memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _prepare(work: Path, size: int) -> tuple[Path, Path]:
    import timm
    import torch
    from safetensors.torch import save_file

    from cema_deploy.export import export_timm

    torch.manual_seed(0)
    edge = timm.create_model("test_resnet", num_classes=10).eval()
    export_timm("test_resnet", work / "edge", model=edge, img_size=size)
    teacher = timm.create_model("test_resnet", num_classes=10)
    path = work / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return work / "edge", path


def _bodies(fingerprint: str, size: int, limit: int) -> tuple[bytes, int, bytes, int]:
    """(full body, its frames, bomb body, its frames)."""
    from cema_deploy.contract.samples import MAX_SAMPLES, SampleBatch, samples_to_bytes

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[:, None, None] * 0.5) % 256  # smooth: PNG compresses it well

    def frames(n: int) -> np.ndarray:
        noise = rng.integers(0, 4, (n, size, size, 3))
        return ((base[None] + noise) % 256).astype(np.uint8)

    def body(imgs: np.ndarray) -> bytes:
        return samples_to_bytes(SampleBatch(images=imgs, fingerprint=fingerprint, edge_version=0), encoding="png")

    probe = body(frames(16))
    n = min(MAX_SAMPLES, int(limit * 0.9 / (len(probe) / 16)))
    full = body(frames(n))
    while len(full) > limit:  # the estimate was high: trim
        n = int(n * 0.9)
        full = body(frames(n))
    bomb = body(np.zeros((MAX_SAMPLES, size, size, 3), np.uint8))
    return full, n, bomb, MAX_SAMPLES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="flood duration")
    ap.add_argument("--clients", type=int, default=4, help="concurrent uploading connections")
    ap.add_argument("--size", type=int, default=224, help="frame side (the export's input size)")
    ap.add_argument("--decode-budget-mb", type=int, default=256)
    ap.add_argument("--pending-cap", type=int, default=40_000, help="high: accepted frames pile up (on disk)")
    ap.add_argument("--max-uploads", type=int, default=24, help="stop the flood after this many accepted uploads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import httpx

    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.protocol import (
        IDEMPOTENCY_HEADER,
        MAX_UPLOAD_BYTES,
        PROTOCOL_HEADER,
        PROTOCOL_VERSION,
        samples_url,
    )

    work = Path(tempfile.mkdtemp(prefix="cema-memory-"))
    print(f"work dir {work}; exporting test_resnet at {args.size} px ...", flush=True)
    edge, teacher = _prepare(work, args.size)
    fp = manifest_from_dir(edge).fingerprint
    cfg = work / "cloud.toml"
    cfg.write_text(
        f'[service]\nstate = "state"\n\n[deployments.flood]\nedge = "{edge}"\nteacher = "test_resnet"\n'
        f'teacher_weights = "{teacher}"\npending_cap = {args.pending_cap}\n'
        f"decode_budget_mb = {args.decode_budget_mb}\n[deployments.flood.method]\nbatch_size = 32\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    token = subprocess.run(
        [
            sys.executable,
            "-m",
            "cema_deploy",
            "cloud",
            "token",
            "add",
            "flood",
            "--all",
            "--state",
            str(work / "state"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    port = _free_port()
    log = open(work / "cloud.log", "wb")  # noqa: SIM115 (closed at the end)
    serve = ["cloud", "serve", "--config", str(cfg), "--port", str(port), "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cema_deploy", *serve],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    result: dict[str, Any] = {}
    try:
        deadline = time.time() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/v1/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"cloud did not start: {(work / 'cloud.log').read_text()[-2000:]}")
            time.sleep(0.5)
        full, n_full, bomb, n_bomb = _bodies(fp, args.size, MAX_UPLOAD_BYTES)
        frame = args.size * args.size * 3
        print(
            f"full upload: {len(full) / MIB:.1f} MiB PNG -> {n_full} frames ({n_full * frame / MIB:.0f} MiB); "
            f"bomb: {len(bomb) / MIB:.1f} MiB -> {n_bomb} frames ({n_bomb * frame / MIB:.0f} MiB)",
            flush=True,
        )
        url = samples_url(base, fp)
        with httpx.Client(timeout=120) as http:  # warm-up: real steps at this size, then the baseline
            r = http.post(url, content=full, headers={**headers, IDEMPOTENCY_HEADER: "warm"})
            assert r.status_code == 202, r.text
            time.sleep(20)
        baseline = _rss_mb(proc.pid)
        print(f"baseline RSS after the warm-up: {baseline:.0f} MiB", flush=True)

        samples: list[float] = []
        statuses: Counter[str] = Counter()
        accepted = [1]  # the warm-up upload
        stop = threading.Event()
        lock = threading.Lock()

        def sampler() -> None:
            while not stop.is_set():
                samples.append(_rss_mb(proc.pid))
                stop.wait(0.2)

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as http:
                k = 0
                while not stop.is_set():
                    is_bomb = k % 4 == 3
                    k += 1
                    key = {IDEMPOTENCY_HEADER: f"c{i}-{uuid.uuid4()}"}
                    try:
                        r = http.post(url, content=bomb if is_bomb else full, headers={**headers, **key})
                    except httpx.HTTPError as exc:
                        with lock:
                            statuses[type(exc).__name__] += 1
                        continue
                    with lock:
                        statuses[f"{'bomb' if is_bomb else 'full'} {r.status_code}"] += 1
                        if r.status_code == 202:
                            accepted[0] += 1
                            if accepted[0] >= args.max_uploads:
                                stop.set()
                    if r.status_code == 429:
                        stop.wait(float(r.headers.get("retry-after", "1")))

        threads = [threading.Thread(target=sampler)] + [
            threading.Thread(target=client, args=(i,)) for i in range(args.clients)
        ]
        t0 = time.time()
        for t in threads:
            t.start()
        stop.wait(args.seconds)
        stop.set()
        for t in threads:
            t.join(180)
        flood_s = time.time() - t0
        metrics = httpx.get(base + "/metrics", timeout=30).text
        pending = next(
            (float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines() if x.startswith("cema_pending_samples{")), 0.0
        )
        peak, hwm = max(samples), _rss_mb(proc.pid, "VmHWM")
        budget = baseline + args.decode_budget_mb + args.clients * 3 * MAX_UPLOAD_BYTES / MIB
        on_disk = sum(f.stat().st_size for f in (work / "state").rglob("uploads/*.safetensors"))
        result = {
            "script": "benchmarks/cloud_memory.py",
            "argv": sys.argv[1:],
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "frame_side": args.size,
            "clients": args.clients,
            "flood_seconds": round(flood_s, 1),
            "full_upload": {"body_mib": round(len(full) / MIB, 2), "frames": n_full},
            "bomb_upload": {"body_mib": round(len(bomb) / MIB, 2), "frames": n_bomb},
            "statuses": dict(statuses),
            "accepted_uploads": accepted[0],
            "accepted_frame_mb": round(accepted[0] * n_full * frame / MIB, 1),
            "uploads_on_disk_mb": round(on_disk / MIB, 1),
            "pending_samples_at_end": pending,
            "decode_budget_mb": args.decode_budget_mb,
            "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1),
            "hwm_rss_mb": round(hwm, 1),
            "budget_mb": round(budget, 1),
            "peak_over_budget": round(max(peak, hwm) / budget, 3),
            "rss_growth_mb": round(max(peak, hwm) - baseline, 1),
            "rss_mb_every_2s": [round(x) for x in samples[::10]],
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "rss_growth_over_accepted_frames": round(
                (max(peak, hwm) - baseline) / (accepted[0] * n_full * frame / MIB), 3
            ),
        }
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        if proc.poll() is None:
            proc.kill()
        log.close()
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
