"""A small stdlib HTTP server that speaks the edge-cloud protocol (contract/protocol.py, protocol 2), as a fixture.

It is not the cloud service: it records what edges send (raw upload bodies, decoded batches, batch reports, edge
reports, idempotency keys) and serves blobs the test publishes, so the edge can be tested against real sockets
without fastapi or torch. Protocol 2 as an edge sees it: ``GET /v1/models/{fp}`` (status: generation, calibrated),
``POST .../batches`` (BatchAck), 409 with the status for uploads of an older generation (``reset()``), 429 with
``Retry-After`` (``upload_failures=[(429, {"Retry-After": "0.3"})]``), idempotency keys (a repeated key is answered
with the stored ack, ``duplicate=True``, and stored once), and TLS (``ssl_context``).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from cema_deploy.contract import protocol
from cema_deploy.contract.samples import KIND_CALIBRATION, SampleBatch, samples_from_bytes

#: An injected failure: a status code, or (status, extra response headers); "lost_ack" stores the upload and then
#: answers 503, as if the acknowledgement had been lost on the way back.
Failure = int | tuple[int, dict[str, str]] | str


@dataclass
class ProtocolState:
    """What the fixture server knows and records; tests mutate it directly (under ``lock``)."""

    token: str
    fingerprint: str
    uploads: list[bytes] = field(default_factory=list)
    batches: list[SampleBatch] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[int, bytes] = field(default_factory=dict)  # header version -> raw body
    blob_requests: list[int] = field(default_factory=list)  # the 'after' of every blob request
    blob_waits: list[float] = field(default_factory=list)  # the 'wait' of every blob request
    version: int = 0
    name: str = "cams"
    generation: int = 1
    calibrated: bool = True
    batch_reports: list[dict[str, Any]] = field(default_factory=list)  # accepted batch reports, in order
    #: (kind, idempotency key or None, time.monotonic()) of every POST, retries included, in arrival order
    posts: list[tuple[str, str | None, float]] = field(default_factory=list)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # idempotency key -> the answer stored
    duplicates: int = 0  # requests answered from ``acks`` (a retry of something already stored)
    status_requests: int = 0
    #: False: a calibration upload does not mark the deployment calibrated (a cloud that applies it later, after
    #: acknowledging it; its answers say "uncalibrated" meanwhile)
    calibrate_on_upload: bool = True
    #: status to answer the next N sample uploads with, e.g. [503, (429, {"Retry-After": "0.3"}), "lost_ack"]
    upload_failures: list[Failure] = field(default_factory=list)
    batch_failures: list[Failure] = field(default_factory=list)  # the same for batch reports
    status_failures: list[int] = field(default_factory=list)  # the same for status reads
    #: called with each new batch report (a dict) before it is acknowledged; returns the ack's target_version
    on_batch: Callable[[dict[str, Any]], int | None] | None = None
    #: called with the decoded batch after an accepted upload (e.g. to publish a blob); returns target_version
    on_upload: Callable[[SampleBatch], int | None] | None = None
    upload_delay_s: float = 0.0
    #: called with the request headers of every request (to record what edges send)
    on_request: Callable[[Any], None] | None = None
    #: the X-Cema-Protocol value every response carries (None: no header, as a protocol-1 cloud)
    protocol_header: str | None = str(protocol.PROTOCOL_VERSION)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, version: int, data: bytes) -> None:
        with self.lock:
            self.blobs[version] = data
            self.version = max(self.version, version)
            self.lock.notify_all()

    def reset(self) -> None:
        """The operator's reset: generation + 1, uncalibrated (uploads naming the old generation get 409)."""
        with self.lock:
            self.generation += 1
            self.calibrated = False

    def status_json(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "model": "test", "version": self.version,
                "generation": self.generation, "calibrated": self.calibrated, "frozen": False,
                "protocol": protocol.PROTOCOL_VERSION}  # fmt: skip

    def kinds(self) -> list[tuple[str, str, int]]:
        """(kind, calibration reason, samples) of every stored upload, in order."""
        with self.lock:
            return [(b.kind, b.calibration, len(b)) for b in self.batches]

    def uploaded_images(self) -> Any:
        import numpy as np

        with self.lock:
            return np.concatenate([b.images for b in self.batches]) if self.batches else np.zeros((0, 0, 0, 3))


def _handler(state: ProtocolState) -> type[BaseHTTPRequestHandler]:
    model = protocol.MODEL_PATH.format(fingerprint=state.fingerprint)
    samples = protocol.SAMPLES_PATH.format(fingerprint=state.fingerprint)
    batches = protocol.BATCHES_PATH.format(fingerprint=state.fingerprint)
    blob = protocol.BLOB_PATH.format(fingerprint=state.fingerprint)
    reports = protocol.REPORTS_PATH.format(fingerprint=state.fingerprint)

    class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one connection per request, so stop() is a real outage
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            if state.protocol_header is not None:
                self.send_header(protocol.PROTOCOL_HEADER, state.protocol_header)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _authorized(self, path: str) -> bool:
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._json(401, {"detail": "Unknown device token; ask the operator for one."})
                return False
            if path not in (model, samples, batches, blob, reports):
                self._json(404, {"detail": f"No model with that fingerprint here ({path})."})
                return False
            return True

        def _fail(self, failures: list[Failure]) -> Failure | None:
            """Answer an injected failure (popped) and return it; None when there is none."""
            with state.lock:
                failure = failures.pop(0) if failures else None
            if failure is None or failure == "lost_ack":
                return failure
            status, headers = failure if isinstance(failure, tuple) else (failure, {})
            self._json(int(status), {"detail": f"injected failure {status}"}, headers)
            return failure

        def do_POST(self) -> None:
            if state.on_request is not None:
                state.on_request(self.headers)
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not self._authorized(path):
                return
            key = self.headers.get(protocol.IDEMPOTENCY_HEADER)
            kind = {samples: "upload", batches: "batch", reports: "report"}.get(path, "other")
            with state.lock:
                state.posts.append((kind, key, time.monotonic()))
            if path == reports:
                with state.lock:
                    state.reports.append(json.loads(body))
                self._json(202, {"status": "recorded"})
                return
            failure = self._fail(state.upload_failures if path == samples else state.batch_failures)
            if failure is not None and failure != "lost_ack":
                return
            with state.lock:
                stored = state.acks.get(key) if key else None
                if stored is not None:
                    state.duplicates += 1
            if stored is not None:
                self._json(202, {**stored, "duplicate": True} if path == samples else stored)
                return
            status, answer = self._batch(json.loads(body), key) if path == batches else self._upload(body, key)
            if failure == "lost_ack" and status == 202:  # stored, but the edge never hears it: it retries the key
                self._json(503, {"detail": "injected failure: acknowledgement lost"})
            else:
                self._json(status, answer)

        def _batch(self, report: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
            target = state.on_batch(report) if state.on_batch is not None else None
            with state.lock:
                state.batch_reports.append({**report, "key": key})
                ack = {"version": state.version, "target_version": state.version if target is None else target,
                       "generation": state.generation, "calibrated": state.calibrated,
                       "replay_step": False}  # fmt: skip
                if key:
                    state.acks[key] = ack
            return 202, ack

        def _upload(self, body: bytes, key: str | None) -> tuple[int, dict[str, Any]]:
            if state.upload_delay_s:
                time.sleep(state.upload_delay_s)
            try:
                batch = samples_from_bytes(body)
            except Exception as exc:
                return 400, {"detail": str(exc)}
            with state.lock:
                if 0 < batch.generation < state.generation:
                    return 409, state.status_json()
            target = state.on_upload(batch) if state.on_upload is not None else None
            with state.lock:
                if batch.kind == KIND_CALIBRATION and batch.calibration == "start" and state.calibrate_on_upload:
                    state.calibrated = True
                state.uploads.append(body)
                state.batches.append(batch)
                buffered = sum(len(b) for b in state.batches)
                ack = {"accepted": len(batch), "pending": 0, "buffered": buffered, "version": state.version,
                       "target_version": target if target is not None else state.version + 1,
                       "generation": state.generation, "calibrated": state.calibrated}  # fmt: skip
                if key:
                    state.acks[key] = ack
            return 202, ack

        def do_GET(self) -> None:
            if state.on_request is not None:
                state.on_request(self.headers)
            url = urlsplit(self.path)
            if not self._authorized(url.path):
                return
            if url.path == model:
                with state.lock:
                    state.status_requests += 1
                    failure = state.status_failures.pop(0) if state.status_failures else None
                if failure is not None:
                    self._json(failure, {"detail": f"injected failure {failure}"})
                    return
                with state.lock:
                    self._json(200, state.status_json())
                return
            if url.path != blob:
                self._json(405, {"detail": "GET is only for the blob and status routes."})
                return
            q = parse_qs(url.query)
            after, wait = int(q.get("after", ["0"])[0]), float(q.get("wait", ["0"])[0])
            deadline = time.monotonic() + min(wait, 2.0)  # keep the fixture's long polls short
            with state.lock:
                state.blob_requests.append(after)
                state.blob_waits.append(wait)
                while not (newer := [v for v in state.blobs if v > after]) and time.monotonic() < deadline:
                    state.lock.wait(0.05)
                if not newer:
                    self._send(204)
                    return
                v = max(newer)
                data = state.blobs[v]
            self._send(200, data, {"Content-Type": protocol.BLOB_MEDIA_TYPE, protocol.VERSION_HEADER: str(v)})

    return Handler


class ProtocolServer:
    """The fixture server on 127.0.0.1; ``stop()`` and ``start()`` again reuse the same port (an outage)."""

    def __init__(self, state: ProtocolState, ssl_context: ssl.SSLContext | None = None) -> None:
        self.state = state
        self.ssl_context = ssl_context
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.state))
        httpd.daemon_threads = True
        if self.ssl_context is not None:
            httpd.socket = self.ssl_context.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = None


@pytest.fixture
def protocol_server() -> Iterator[Callable[..., ProtocolServer]]:
    """``protocol_server(fingerprint, token="t0k", ssl_context=None)`` -> a running :class:`ProtocolServer`;
    stopped after the test."""
    servers: list[ProtocolServer] = []

    def make(fingerprint: str, token: str = "t0k", ssl_context: ssl.SSLContext | None = None) -> ProtocolServer:
        s = ProtocolServer(ProtocolState(token=token, fingerprint=fingerprint), ssl_context)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def images(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Random uint8 RGB images ``[n, size, size, 3]``."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def until(pred: Callable[[], Any], timeout: float = 20.0) -> bool:
    """Poll ``pred`` every 10 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
