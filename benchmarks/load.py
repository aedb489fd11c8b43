"""Fleet load on one cloud: N simulated edges upload samples and poll for blobs against a real service.

Starts ``cema-deploy cloud serve`` on 127.0.0.1 (a tiny timm edge model and teacher exported/saved here, no
download), registers one bearer token per simulated edge, then for each N runs N asyncio clients for a fixed time.
Each client uploads a PNG-encoded batch every ``--upload-every`` seconds and polls for a newer blob every
``--poll-every`` seconds (a conditional GET, ``wait=0``), applying nothing: this measures the cloud. Reported per N:
uploads/s accepted, samples/s, blob-poll latency p50/p99, errors by kind, and the cloud process's CPU and RSS
(psutil). Bounded in count (``--max-edges``) and time (``--seconds`` per N).

    python benchmarks/load.py --edges 1,8,32,128 --seconds 15 --json benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare(work: Path, seed: int) -> tuple[Path, Path]:
    """A tiny edge export and a teacher checkpoint (random init: speed, not accuracy, is measured)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cema_deploy.export import export_timm

    torch.manual_seed(seed)
    edge = timm.create_model("test_resnet", num_classes=10).eval()
    export_dir = work / "edge"
    export_timm("test_resnet", export_dir, model=edge, img_size=64)
    teacher = timm.create_model("test_resnet", num_classes=10)
    teacher_path = work / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_path))
    return export_dir, teacher_path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cema_deploy", *args]


def _add_tokens(state: Path, n: int) -> list[str]:
    tokens = []
    for i in range(n):
        out = subprocess.run(
            _cli("cloud", "token", "add", f"edge-{i:03d}", "--state", str(state)),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        tokens.append(out.strip().splitlines()[-1].split()[-1])
    return tokens


def _wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"cloud exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/v1/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("cloud did not become healthy in time")


class _ResourceSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self._stop_evt = threading.Event()
        self.proc.cpu_percent(None)

    def run(self) -> None:
        while not self._stop_evt.wait(self.every):
            try:
                self.cpu.append(self.proc.cpu_percent(None))
                self.rss.append(self.proc.memory_info().rss)
            except Exception:  # the process went away
                return

    def stop(self) -> dict[str, float]:
        self._stop_evt.set()
        self.join()
        return {
            "cpu_percent_mean": float(np.mean(self.cpu)) if self.cpu else 0.0,
            "cpu_percent_max": float(np.max(self.cpu)) if self.cpu else 0.0,
            "rss_mb_max": float(np.max(self.rss)) / 2**20 if self.rss else 0.0,
        }


class _Http:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per simulated edge.

    httpx costs about a millisecond of Python per request; 128 edges on 2 cores would then measure the load
    generator's own event loop rather than the cloud. This client does the least a device would."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        resp: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            resp[k.strip().lower()] = v.strip()
        n = int(resp.get("content-length", "0"))
        return status, resp, (await self.reader.readexactly(n)) if n else b""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _edge(
    base: str,
    fp: str,
    token: str,
    body: bytes,
    seconds: float,
    upload_every: float,
    poll_every: float,
    stats: dict[str, Any],
    rng: np.random.Generator,
) -> None:
    from urllib.parse import urlsplit

    from cema_deploy.contract import protocol
    from cema_deploy.contract.protocol import BLOB_PATH, SAMPLES_MEDIA_TYPE, SAMPLES_PATH

    url = urlsplit(base)
    http = _Http(url.hostname or "127.0.0.1", url.port or 80)
    auth = {"Authorization": f"Bearer {token}", protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}
    samples_path, blob_path = SAMPLES_PATH.format(fingerprint=fp), BLOB_PATH.format(fingerprint=fp)
    version = 0
    t_end = time.perf_counter() + seconds
    next_upload = time.perf_counter() + rng.uniform(0, upload_every)
    await asyncio.sleep(rng.uniform(0, poll_every))
    try:
        while (now := time.perf_counter()) < t_end:
            if now >= next_upload:
                next_upload += upload_every
                try:
                    status, _, _ = await http.request(
                        "POST", samples_path, {**auth, "Content-Type": SAMPLES_MEDIA_TYPE}, body
                    )
                    if status == 202:
                        stats["uploads"] += 1
                    else:
                        stats["errors"][f"upload {status}"] += 1
                except Exception as exc:  # a transport error is an error of the run, counted by kind
                    stats["errors"][f"upload {type(exc).__name__}"] += 1
                    http = _Http(http.host, http.port)
            t0 = time.perf_counter()
            try:
                status, headers, _ = await http.request("GET", f"{blob_path}?after={version}&wait=0", auth)
                stats["poll_ms"].append((time.perf_counter() - t0) * 1e3)
                if status == 200:
                    version = int(headers["x-cema-version"])
                    stats["blobs"] += 1
                elif status != 204:
                    stats["errors"][f"poll {status}"] += 1
            except Exception as exc:
                stats["errors"][f"poll {type(exc).__name__}"] += 1
                http = _Http(http.host, http.port)
            await asyncio.sleep(poll_every)
    finally:
        await http.close()


async def _run_fleet(
    base: str,
    fp: str,
    tokens: list[str],
    body: bytes,
    seconds: float,
    upload_every: float,
    poll_every: float,
    samples_per_upload: int,
) -> dict[str, Any]:
    stats: dict[str, Any] = {"uploads": 0, "blobs": 0, "poll_ms": [], "errors": Counter()}
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _edge(base, fp, tok, body, seconds, upload_every, poll_every, stats, np.random.default_rng(i))
            for i, tok in enumerate(tokens)
        )
    )
    wall = time.perf_counter() - t0
    polls = np.asarray(stats["poll_ms"]) if stats["poll_ms"] else np.zeros(1)
    return {
        "edges": len(tokens),
        "seconds": round(wall, 2),
        "uploads_per_s": round(stats["uploads"] / wall, 2),
        "samples_per_s": round(stats["uploads"] * samples_per_upload / wall, 1),
        "polls": len(stats["poll_ms"]),
        "poll_p50_ms": round(float(np.percentile(polls, 50)), 2),
        "poll_p99_ms": round(float(np.percentile(polls, 99)), 2),
        "blobs_fetched": stats["blobs"],
        "errors": sum(stats["errors"].values()),
        "errors_by_kind": dict(stats["errors"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", default="1,8,32,128", help="comma-separated fleet sizes")
    ap.add_argument("--max-edges", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=15.0, help="duration per fleet size")
    ap.add_argument("--upload-every", type=float, default=2.0, help="seconds between one edge's uploads")
    ap.add_argument("--poll-every", type=float, default=0.5, help="seconds between one edge's blob polls")
    ap.add_argument("--samples", type=int, default=8, help="samples per upload")
    ap.add_argument("--cloud-batch", type=int, default=32, help="B of the cloud (a huge B means no training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/load.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.edges.split(",")]
    if max(sizes) > args.max_edges:
        raise SystemExit(f"--edges asks for {max(sizes)} edges; the bound is --max-edges {args.max_edges}")

    from rich.console import Console
    from rich.table import Table

    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    console = Console()
    with tempfile.TemporaryDirectory(prefix="cema-load-") as tmp:
        work = Path(tmp)
        console.print("preparing a tiny edge export and teacher ...")
        export_dir, teacher = _prepare(work, args.seed)
        manifest = manifest_from_dir(export_dir)
        h, w = manifest.preprocess.size
        rng = np.random.default_rng(args.seed)
        batch = SampleBatch(
            images=rng.integers(0, 256, (args.samples, h, w, 3), dtype=np.uint8),
            fingerprint=manifest.fingerprint,
            edge_version=0,
        )
        body = samples_to_bytes(batch, encoding="png")
        state = work / "state"
        tokens = _add_tokens(state, max(sizes))
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            _cli(
                "cloud",
                "serve",
                "--edge",
                str(export_dir),
                "--teacher",
                "test_resnet",
                "--teacher-weights",
                str(teacher),
                "--state",
                str(state),
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--threads",
                "1",
                "--batch-size",
                str(args.cloud_batch),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        rows = []
        try:
            _wait_health(base, proc)
            for n in sizes:
                console.print(f"fleet of {n} edges for {args.seconds:.0f} s ...")
                sampler = _ResourceSampler(proc.pid)
                sampler.start()
                row = asyncio.run(
                    _run_fleet(
                        base,
                        manifest.fingerprint,
                        tokens[:n],
                        body,
                        args.seconds,
                        args.upload_every,
                        args.poll_every,
                        args.samples,
                    )
                )
                row.update(sampler.stop())
                rows.append(row)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    table = Table(title="cloud under a fleet of simulated edges (127.0.0.1)")
    for col in (
        "edges",
        "uploads/s",
        "samples/s",
        "poll p50 ms",
        "poll p99 ms",
        "errors",
        "cloud CPU % (mean)",
        "cloud RSS MB (max)",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["edges"]),
            f"{r['uploads_per_s']:.1f}",
            f"{r['samples_per_s']:.0f}",
            f"{r['poll_p50_ms']:.1f}",
            f"{r['poll_p99_ms']:.1f}",
            str(r["errors"]),
            f"{r['cpu_percent_mean']:.0f}",
            f"{r['rss_mb_max']:.0f}",
        )
    console.print(table)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": vars(args) | {"json": str(args.json)},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
