"""A small stdlib HTTP server that speaks the edge-cloud protocol (contract/protocol.py), as a test fixture.

It is not the cloud service: it records what edges send (raw upload bodies, decoded batches, reports) and serves
blobs the test publishes, so the edge client can be tested against real sockets without fastapi or torch.
"""

from __future__ import annotations

import json
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
from cema_deploy.contract.samples import SampleBatch, samples_from_bytes


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
    #: status to answer the next N sample uploads with, e.g. [503, 503] (popped one per upload)
    upload_failures: list[int] = field(default_factory=list)
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

    def uploaded_images(self) -> Any:
        import numpy as np

        with self.lock:
            return np.concatenate([b.images for b in self.batches]) if self.batches else np.zeros((0, 0, 0, 3))


def _handler(state: ProtocolState) -> type[BaseHTTPRequestHandler]:
    samples = protocol.SAMPLES_PATH.format(fingerprint=state.fingerprint)
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

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _authorized(self, path: str) -> bool:
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._json(401, {"detail": "Unknown device token; ask the operator for one."})
                return False
            if path not in (samples, blob, reports):
                self._json(404, {"detail": f"No model with that fingerprint here ({path})."})
                return False
            return True

        def do_POST(self) -> None:
            if state.on_request is not None:
                state.on_request(self.headers)
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not self._authorized(path):
                return
            if path == reports:
                with state.lock:
                    state.reports.append(json.loads(body))
                self._json(202, {"status": "recorded"})
                return
            with state.lock:
                failure = state.upload_failures.pop(0) if state.upload_failures else None
            if failure is not None:
                self._json(failure, {"detail": f"injected failure {failure}"})
                return
            if state.upload_delay_s:
                time.sleep(state.upload_delay_s)
            try:
                batch = samples_from_bytes(body)
            except Exception as exc:
                self._json(400, {"detail": str(exc)})
                return
            target = state.on_upload(batch) if state.on_upload is not None else None
            with state.lock:
                state.uploads.append(body)
                state.batches.append(batch)
                buffered = sum(len(b) for b in state.batches)
                ack = {"accepted": len(batch), "pending": 0, "buffered": buffered, "version": state.version,
                       "target_version": target if target is not None else state.version + 1}  # fmt: skip
            self._json(202, ack)

        def do_GET(self) -> None:
            if state.on_request is not None:
                state.on_request(self.headers)
            url = urlsplit(self.path)
            if not self._authorized(url.path):
                return
            if url.path != blob:
                self._json(405, {"detail": "GET is only for the blob route."})
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

    def __init__(self, state: ProtocolState) -> None:
        self.state = state
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.state))
        httpd.daemon_threads = True
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
    """``protocol_server(fingerprint, token="t0k")`` -> a running :class:`ProtocolServer`; stopped after the test."""
    servers: list[ProtocolServer] = []

    def make(fingerprint: str, token: str = "t0k") -> ProtocolServer:
        s = ProtocolServer(ProtocolState(token=token, fingerprint=fingerprint))
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
