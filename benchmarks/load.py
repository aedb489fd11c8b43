"""Fleet load on one cloud: N deployments x M simulated edges against a real ``cema-deploy cloud serve --config``.

For each N (``--deployments``) the script exports N tiny timm edge models (one fingerprint each; no download),
writes a ``cloud.toml``, starts the service on 127.0.0.1 (``--engine``), registers one token per edge, and first
measures the **sustainable rate** of each deployment: edges upload back to back for ``--probe-seconds``, honouring
429 + Retry-After, and the service's cloud steps/s x B is what training absorbs. Then, for each M (``--edges``,
edges *per deployment*), M edges per deployment run for ``--seconds`` as the edge does: uploads of ``--samples``
PNG samples with an ``Idempotency-Key`` (a 429 waits Retry-After and retries the same key), one batch report per
upload, and a long poll (``wait=--poll-wait``) for blobs on a second connection. The deployment's upload rate is
``--rate`` x its sustainable rate (default 0.5: below it), spread over its edges; ``--saturate`` uploads at 1.5x,
``--overload`` at 2x (then RSS after 20 s and at the end are reported, for the bounded-memory target).

Reported per (N, M): errors (5xx, timeouts, failed connections; 429s apart as rejected_429), poll_p99_ms (a long
poll's delivery delay: from the blob's creation on the cloud, or from the poll's start if later, to its arrival;
for a 204 the time past ``wait``), upload_to_blob_p99_ms (from an upload's 202 to the edge holding a blob whose
version is >= the ack's target_version), steps_per_s (cloud steps of all deployments), the cloud's rss_mb and CPU,
and the service's own upload-to-blob quantiles from /metrics.

    python benchmarks/load.py --deployments 1,4 --edges 32,128 --engine local --seconds 20 --json out/load.json
    python benchmarks/load.py --deployments 4 --edges 32 --saturate --json out/load-saturated.json
    python benchmarks/load.py --deployments 1 --edges 32 --overload --seconds 120 --json out/load-overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import struct
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare(work: Path, n: int, seed: int) -> tuple[list[Path], Path]:
    """N tiny edge exports (different weights: N fingerprints) and one teacher checkpoint (random init: speed,
    not accuracy, is measured)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cema_deploy.export import export_timm

    exports = []
    for i in range(n):
        torch.manual_seed(seed + i)
        edge = timm.create_model("test_resnet", num_classes=10).eval()
        out = work / f"edge-{i}"
        export_timm("test_resnet", out, model=edge, img_size=64)
        exports.append(out)
    teacher = timm.create_model("test_resnet", num_classes=10)
    teacher_path = work / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_path))
    return exports, teacher_path


def _config(work: Path, exports: list[Path], teacher: Path, args: argparse.Namespace) -> Path:
    lines = []
    for i, edge in enumerate(exports):
        lines += [
            f"[deployments.d{i}]",
            f'edge = "{edge}"',
            'teacher = "test_resnet"',
            f'teacher_weights = "{teacher}"',
            f"pending_cap = {args.pending_cap}",
            f"[deployments.d{i}.method]",
            f"batch_size = {args.cloud_batch}",
            "",
        ]
    path = work / "cloud.toml"
    path.write_text("\n".join(lines))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cema_deploy", *args]


class _Resources(threading.Thread):
    """CPU and RSS of the cloud process and all its descendants every half second (psutil): with ``--engine ray``
    the deployments run in Ray's worker processes, children of the raylet the service started."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.cpu: list[float] = []
        self.rss: list[tuple[float, int]] = []
        self._stop_evt = threading.Event()
        self.t0 = time.monotonic()
        self._seen: dict[int, Any] = {}

    def run(self) -> None:
        while not self._stop_evt.wait(0.5):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except Exception:  # the process went away
                return
            cpu = rss = 0.0
            for p in procs:
                try:
                    if p.pid not in self._seen:  # the first reading of a process only sets its baseline
                        self._seen[p.pid] = p
                        p.cpu_percent(None)
                    cpu += self._seen[p.pid].cpu_percent(None)
                    rss += p.memory_info().rss
                except Exception:  # a worker that exited meanwhile
                    continue
            self.cpu.append(cpu)
            self.rss.append((time.monotonic() - self.t0, int(rss)))

    def stop(self) -> dict[str, float]:
        self._stop_evt.set()
        self.join()
        mb = [r / 2**20 for _, r in self.rss] or [0.0]
        at20 = next((r / 2**20 for t, r in self.rss if t >= 20), mb[-1])
        return {
            "cpu_percent_mean": round(float(np.mean(self.cpu)) if self.cpu else 0.0, 1),
            "rss_mb": round(max(mb), 1),
            "rss_mb_at_20s": round(at20, 1),
            "rss_mb_end": round(mb[-1], 1),
            "processes": len(self._seen),
        }


class _Http:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (httpx costs ~1 ms of Python per request; with
    hundreds of edges on 2 cores it would measure the load generator, not the cloud)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, dict[str, str], bytes]:
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._request(method, path, headers, body), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.close()
            if not reused:
                raise
        except BaseException:
            await self.close()  # a failed or cancelled exchange leaves the connection unusable
            raise
        # a kept-alive connection the server closed meanwhile: reconnect once, as httpx's pool does
        try:
            return await asyncio.wait_for(self._request(method, path, headers, body), timeout)
        except BaseException:
            await self.close()
            raise

    async def _request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("connection closed by the cloud")
        status = int(line.split()[1])
        resp: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            resp[k.strip().lower()] = v.strip()
        n = int(resp.get("content-length", "0"))
        return status, resp, (await self.reader.readexactly(n)) if n else b""

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
            with contextlib.suppress(Exception):  # already broken
                await writer.wait_closed()


def _created(blob: bytes) -> float:
    """The blob's ``created`` time from its safetensors header (no tensor is parsed)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return float(json.loads(blob[8 : 8 + n])["__metadata__"]["created"])


class _Stats:
    def __init__(self) -> None:
        self.uploads = self.samples = self.rejected_429 = self.blobs = self.reports = 0
        self.poll_ms: list[float] = []
        self.errors: Counter[str] = Counter()


async def _edge(
    host: str,
    port: int,
    fp: str,
    token: str,
    body: bytes,
    n_samples: int,
    t_end: float,
    upload_every: float,
    poll_wait: float,
    stats: _Stats,
    rng: np.random.Generator,
) -> None:
    from cema_deploy.contract import protocol

    auth = {"Authorization": f"Bearer {token}", protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}
    samples_path = protocol.SAMPLES_PATH.format(fingerprint=fp)
    batches_path = protocol.BATCHES_PATH.format(fingerprint=fp)
    blob_path = protocol.BLOB_PATH.format(fingerprint=fp)
    report = json.dumps({"seen": 64, "selected": n_samples, "uploaded": n_samples, "generation": 0}).encode()
    holding = [0]

    async def uploader() -> None:
        http = _Http(host, port)
        next_at = time.perf_counter() + (rng.uniform(0, upload_every) if upload_every > 0 else 0)
        while (now := time.perf_counter()) < t_end:
            if now < next_at:
                await asyncio.sleep(min(next_at - now, t_end - now))
                continue
            next_at = max(next_at + upload_every, now) if upload_every > 0 else now
            key = str(uuid.uuid4())
            headers = {**auth, "Content-Type": protocol.SAMPLES_MEDIA_TYPE, protocol.IDEMPOTENCY_HEADER: key}
            while time.perf_counter() < t_end:
                try:
                    status, resp, _ = await http.request("POST", samples_path, headers, body, timeout=30)
                except Exception as exc:  # transport errors and timeouts are errors of the run
                    stats.errors[f"upload {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.5)
                    continue
                if status == 429:
                    stats.rejected_429 += 1
                    await asyncio.sleep(float(resp.get("retry-after", "1")) * rng.uniform(1.0, 1.2))
                    continue
                if status == 202:
                    stats.uploads += 1
                    stats.samples += n_samples
                    try:
                        status, _, _ = await http.request(
                            "POST",
                            batches_path,
                            {
                                **auth,
                                "Content-Type": "application/json",
                                protocol.IDEMPOTENCY_HEADER: str(uuid.uuid4()),
                            },
                            report,
                            timeout=30,
                        )
                        stats.reports += status == 202
                        if status != 202:
                            stats.errors[f"report {status}"] += 1
                    except Exception as exc:
                        stats.errors[f"report {type(exc).__name__}"] += 1
                else:
                    stats.errors[f"upload {status}"] += 1
                break
        await http.close()

    async def poller() -> None:
        http = _Http(host, port)
        await asyncio.sleep(rng.uniform(0, 0.2))
        while (now := time.perf_counter()) < t_end:
            wait = min(poll_wait, max(0.0, t_end - now))
            t_sent, wall_sent = time.perf_counter(), time.time()
            try:
                status, resp, data = await http.request(
                    "GET", f"{blob_path}?after={holding[0]}&wait={wait:.3f}", auth, timeout=wait + 30
                )
            except Exception as exc:
                stats.errors[f"poll {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)
                continue
            t_recv, wall_recv = time.perf_counter(), time.time()
            if status == 200:
                stats.blobs += 1
                stats.poll_ms.append(max(0.0, wall_recv - max(_created(data), wall_sent)) * 1e3)
                holding[0] = max(holding[0], int(resp["x-cema-version"]))
            elif status == 204:
                stats.poll_ms.append(max(0.0, (t_recv - t_sent) - wait) * 1e3)
            else:
                stats.errors[f"poll {status}"] += 1
                await asyncio.sleep(0.5)
        await http.close()

    await asyncio.gather(uploader(), poller())


def _metrics(base: str) -> dict[str, dict[str, float]]:
    """Per deployment, from /metrics: counters and gauges by name, histogram buckets as ``NAME_bucket:LE``."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = re.match(r'^(cema_[a-z0-9_]+)\{deployment="([^"]+)"[^}]*?(?:,le="([^"]+)")?\} (\S+)$', line)
        if m:
            name, dep, le, value = m.groups()
            out.setdefault(dep, {})[f"{name}:{le}" if le else name] = float(value)
    return out


def _hist_quantile(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], q: float) -> float:
    """The q-quantile (seconds) of the upload-to-blob histogram's counts added between two scrapes, all
    deployments together, interpolated within its bucket."""
    prefix = "cema_upload_to_blob_seconds_bucket:"
    counts: dict[float, float] = {}
    for dep, vals in after.items():
        for key, v in vals.items():
            if key.startswith(prefix):
                le = float(key[len(prefix) :].replace("+Inf", "inf"))
                counts[le] = counts.get(le, 0.0) + v - before.get(dep, {}).get(key, 0.0)
    bounds = sorted(counts)
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return 0.0
    rank, lo, prev = q * total, 0.0, 0.0
    for b in bounds:
        if counts[b] >= rank:
            hi = b if b != float("inf") else lo * 1.2
            return lo + (hi - lo) * (rank - prev) / max(counts[b] - prev, 1e-9)
        lo, prev = b, counts[b]
    return lo


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


async def _fleet(
    base: str,
    fps: list[str],
    tokens: dict[str, list[str]],
    body: bytes,
    args: argparse.Namespace,
    edges: int,
    seconds: float,
    per_dep_rate: float | None,
) -> _Stats:
    from urllib.parse import urlsplit

    url = urlsplit(base)
    stats = _Stats()
    t_end = time.perf_counter() + seconds
    tasks = []
    for d, fp in enumerate(fps):
        # per edge: one upload every edges * samples / rate seconds (0: back to back)
        every = 0.0 if per_dep_rate is None else edges * args.samples / per_dep_rate
        for e in range(edges):
            tasks.append(
                _edge(
                    url.hostname or "127.0.0.1",
                    url.port or 80,
                    fp,
                    tokens[fp][e],
                    body,
                    args.samples,
                    t_end,
                    every,
                    args.poll_wait,
                    stats,
                    np.random.default_rng([args.seed, d, e]),
                )
            )
    await asyncio.gather(*tasks)
    return stats


def _run_n(n: int, args: argparse.Namespace, work: Path, console: Any) -> list[dict[str, Any]]:
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    console.print(f"[bold]{n} deployment(s)[/]: exporting {n} tiny edge model(s) ...")
    exports, teacher = _prepare(work / f"n{n}", n, args.seed)
    manifests = [manifest_from_dir(e) for e in exports]
    fps = [m.fingerprint for m in manifests]
    h, w = manifests[0].preprocess.size
    rng = np.random.default_rng(args.seed)
    imgs = rng.integers(0, 256, (args.samples, h, w, 3), dtype=np.uint8)
    bodies = {
        m.fingerprint: samples_to_bytes(SampleBatch(images=imgs, fingerprint=m.fingerprint, edge_version=0))
        for m in manifests
    }
    state = work / f"n{n}" / "state"
    store = StateStore(state)
    max_m = max(args.edge_counts)
    tokens = {
        fp: [store.add_token(f"e{d}-{i}", deployments=[f"d{d}"]) for i in range(max_m)] for d, fp in enumerate(fps)
    }
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = _config(work / f"n{n}", exports, teacher, args)
    cmd = _cli("cloud", "serve", "--config", str(cfg), "--state", str(state), "--port", str(port),
               "--engine", args.engine, "--threads", "1", "--log-level", "warning")  # fmt: skip
    log = open(work / f"cloud-{n}.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    rows = []
    try:
        _wait_health(base, proc)

        async def fleet(edges: int, seconds: float, rate: float | None) -> _Stats:
            # one fingerprint's body per deployment: run each deployment's edges with its own body
            stats = _Stats()
            parts = [_fleet(base, [fp], tokens, bodies[fp], args, edges, seconds, rate) for fp in fps]
            for s in await asyncio.gather(*parts):
                for k in ("uploads", "samples", "rejected_429", "blobs", "reports"):
                    setattr(stats, k, getattr(stats, k) + getattr(s, k))
                stats.poll_ms += s.poll_ms
                stats.errors.update(s.errors)
            return stats

        console.print(f"  probing the sustainable rate for {args.probe_seconds:.0f} s ...")
        before = _metrics(base)
        t0 = time.monotonic()
        asyncio.run(fleet(min(4, max_m), args.probe_seconds, None))
        wall = time.monotonic() - t0
        after = _metrics(base)
        steps = {
            d: after[d]["cema_cloud_steps_total"] - before.get(d, {}).get("cema_cloud_steps_total", 0) for d in after
        }
        sustainable = float(np.mean([s / wall for s in steps.values()])) * args.cloud_batch
        deadline = time.monotonic() + 300  # the probe's backlog (all but a partial batch) drains before the rows
        while time.monotonic() < deadline and any(
            v.get("cema_pending_samples", 0) >= args.cloud_batch for v in _metrics(base).values()
        ):
            time.sleep(0.5)
        console.print(
            f"  sustainable: {sustainable:.0f} samples/s per deployment ({sustainable / args.cloud_batch:.2f} steps/s)"
        )
        for m in args.edge_counts:
            mode, factor = (
                ("overload", 2.0) if args.overload else ("saturate", 1.5) if args.saturate else ("below", args.rate)
            )
            rate = sustainable * factor
            console.print(
                f"  {m} edges per deployment, {mode} ({rate:.0f} samples/s per deployment), {args.seconds:.0f} s ..."
            )
            res = _Resources(proc.pid)
            res.start()
            before = _metrics(base)
            t0 = time.monotonic()
            stats = asyncio.run(fleet(m, args.seconds, rate))
            wall = time.monotonic() - t0
            after = _metrics(base)
            usage = res.stop()

            def delta(key: str, before: dict[str, dict[str, float]] = before, after: Any = after) -> float:
                return sum(after[d].get(key, 0) - before.get(d, {}).get(key, 0) for d in after)

            rows.append(
                {
                    "engine": args.engine,
                    "deployments": n,
                    "edges_per_deployment": m,
                    "edges": n * m,
                    "mode": mode,
                    "seconds": round(wall, 1),
                    "sustainable_samples_per_s": round(sustainable, 1),
                    "offered_samples_per_s": round(rate * n, 1),
                    "accepted_samples_per_s": round(stats.samples / wall, 1),
                    "errors": sum(stats.errors.values()),
                    "errors_by_kind": dict(stats.errors),
                    "rejected_429": stats.rejected_429,
                    "polls": len(stats.poll_ms),
                    "poll_p50_ms": _pct(stats.poll_ms, 50),
                    "poll_p99_ms": _pct(stats.poll_ms, 99),
                    "upload_to_blob_p50_ms": round(_hist_quantile(before, after, 0.5) * 1e3, 1),
                    "upload_to_blob_p99_ms": round(_hist_quantile(before, after, 0.99) * 1e3, 1),
                    "publish_delay_p99_ms": round(
                        max(after[d].get("cema_publish_delay_p99_seconds", 0) for d in after) * 1e3, 1
                    ),
                    "steps_per_s": round(delta("cema_cloud_steps_total") / wall, 2),
                    "replay_steps_per_s": round(delta("cema_replay_steps_total") / wall, 2),
                    "replay_window_min": min(after[d].get("cema_replay_samples", 0) for d in after),
                    "pending_max": max(after[d].get("cema_pending_samples", 0) for d in after),
                    "pending_cap": args.pending_cap,
                    "step_error_total": delta("cema_step_errors_total"),
                    **usage,
                }
            )
            shown = ("errors", "rejected_429", "poll_p99_ms", "upload_to_blob_p99_ms", "steps_per_s", "rss_mb")
            console.print(f"    {json.dumps({k: rows[-1][k] for k in shown})}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return rows


def _wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployments", default="1,4", help="comma-separated deployment counts N")
    ap.add_argument("--edges", default="32,128", help="comma-separated edges per deployment M")
    ap.add_argument(
        "--engine", default="local", choices=("local", "ray"), help="engine of cloud serve (ray: a local Ray cluster)"
    )
    ap.add_argument("--max-edges", type=int, default=1024, help="bound on N x M")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each (N, M) row")
    ap.add_argument("--probe-seconds", type=float, default=10.0, help="duration of the sustainable-rate probe")
    ap.add_argument("--rate", type=float, default=0.5, help="upload rate as a fraction of the sustainable rate")
    ap.add_argument("--saturate", action="store_true", help="upload at 1.5x the sustainable rate")
    ap.add_argument("--overload", action="store_true", help="upload at 2x the sustainable rate (RSS target)")
    ap.add_argument("--poll-wait", type=float, default=10.0, help="long-poll wait of every edge, seconds")
    ap.add_argument("--samples", type=int, default=8, help="samples per upload")
    ap.add_argument("--cloud-batch", type=int, default=32, help="B of every deployment")
    ap.add_argument("--pending-cap", type=int, default=1024, help="pending cap of every deployment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/load.json"))
    args = ap.parse_args()
    ns = [int(s) for s in args.deployments.split(",")]
    args.edge_counts = [int(s) for s in args.edges.split(",")]
    if max(ns) * max(args.edge_counts) > args.max_edges:
        raise SystemExit(f"{max(ns)} x {max(args.edge_counts)} edges exceed --max-edges {args.max_edges}")

    from rich.console import Console

    console = Console()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cema-load-") as tmp:
        for n in ns:
            rows += _run_n(n, args, Path(tmp), console)
    from rich.table import Table

    table = Table(title=f"cloud under fleet load ({args.engine} engine, 127.0.0.1)")
    cols = ("deployments", "edges_per_deployment", "mode", "errors", "rejected_429", "poll_p99_ms",
            "upload_to_blob_p99_ms", "steps_per_s", "rss_mb", "cpu_percent_mean")  # fmt: skip
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
