"""The edge's link to the cloud: a small HTTP client and a background uploader with a bounded queue.

Nothing here runs on the inference path: :meth:`Uplink.put` appends to an in-memory queue (O(1)) and returns.
A worker thread batches queued samples into uploads, retries with jittered exponential back-off while the cloud
is unreachable, and, when the queue is full (samples or bytes), drops the oldest samples and counts them.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract import protocol
from cema_deploy.contract.samples import SampleBatch, samples_to_bytes
from cema_deploy.exceptions import UplinkError

log = logging.getLogger("cema_deploy.edge")


@dataclass(frozen=True)
class UploadAck:
    """The cloud's answer to an upload (see ``contract/protocol.py``)."""

    accepted: int
    pending: int
    buffered: int
    version: int
    target_version: int


class CloudClient:
    """Blocking HTTP calls to one cloud for one model. Transport errors and 5xx raise :class:`UplinkError` with
    ``retryable=True``; 4xx raise it with the server's message and ``retryable=False``.

    Example:
        >>> client = CloudClient("http://127.0.0.1:8750", token, manifest.fingerprint)  # doctest: +SKIP
        >>> client.fetch_blob(after=0, wait=10.0)  # raw bytes or None  # doctest: +SKIP
    """

    def __init__(self, base_url: str, token: str, fingerprint: str, *, device_id: str = "",
                 timeout_s: float = 30.0) -> None:
        httpx = lazy_import("httpx", extra="edge", purpose="talking to the CEMA cloud")
        self.base_url, self.fingerprint, self.device_id = base_url.rstrip("/"), fingerprint, device_id
        self._httpx = httpx
        self._http = httpx.Client(timeout=timeout_s, headers={
            "Authorization": f"Bearer {token}", protocol.DEVICE_HEADER: device_id})

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, url, **kw)
        except self._httpx.HTTPError as exc:
            raise UplinkError(f"Cannot reach the cloud at {self.base_url} ({type(exc).__name__}: {exc}).",
                              retryable=True) from exc
        if r.status_code >= 500:
            raise UplinkError(f"The cloud failed ({r.status_code}) on {method} {url}.", retryable=True)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise UplinkError(f"The cloud refused {method} {url} ({r.status_code}): {detail}", retryable=False,
                              status=r.status_code)
        return r

    def upload_bytes(self, body: bytes) -> UploadAck:
        r = self._request("POST", protocol.samples_url(self.base_url, self.fingerprint), content=body,
                          headers={"Content-Type": protocol.SAMPLES_MEDIA_TYPE})
        d = r.json()
        return UploadAck(int(d["accepted"]), int(d["pending"]), int(d["buffered"]), int(d["version"]),
                         int(d["target_version"]))

    def upload(self, batch: SampleBatch, *, encoding: str = "png") -> UploadAck:
        return self.upload_bytes(samples_to_bytes(batch, encoding=encoding))

    def fetch_blob(self, after: int, wait: float = 0.0) -> tuple[int, bytes] | None:
        """``(version, raw bytes)`` of the newest blob newer than ``after``, or ``None``. Bytes are not parsed:
        the caller verifies a signature first."""
        r = self._request("GET", protocol.blob_url(self.base_url, self.fingerprint),
                          params={"after": after, "wait": wait}, timeout=wait + 30.0)
        if r.status_code == 204:
            return None
        return int(r.headers.get(protocol.VERSION_HEADER, "0")), bytes(r.content)

    def report(self, kind: str, version: int, reason: str) -> None:
        self._request("POST", protocol.reports_url(self.base_url, self.fingerprint),
                      content=json.dumps({"kind": kind, "version": version, "reason": reason}),
                      headers={"Content-Type": "application/json"})

    def close(self) -> None:
        self._http.close()


@dataclass
class UplinkCounters:
    queued: int = 0
    uploaded: int = 0
    bytes_sent: int = 0
    dropped_queue: int = 0
    rejected: int = 0
    upload_errors: int = 0
    retries: int = 0


class Uplink:
    """Background uploader: bounded queue (drop-oldest), batching, jittered exponential back-off."""

    def __init__(self, client: CloudClient, *, fingerprint: str, device_id: str = "", encoding: str = "png",
                 upload_batch: int = 32, flush_interval_s: float = 0.5, max_queue_samples: int = 4096,
                 max_queue_bytes: int = 64 * 2**20, backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0) -> None:
        self.client, self.fingerprint, self.device_id, self.encoding = client, fingerprint, device_id, encoding
        self.upload_batch, self.flush_interval_s = upload_batch, flush_interval_s
        self.max_queue_samples, self.max_queue_bytes = max_queue_samples, max_queue_bytes
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.counters = UplinkCounters()
        self.last_ack: UploadAck | None = None
        self.edge_version = 0
        self._q: collections.deque[tuple[np.ndarray, float]] = collections.deque()
        self._q_bytes = 0
        self._inflight = 0
        self._cond = threading.Condition()
        self._stop = False
        self._flush_now = False
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._loop, name="cema-uplink", daemon=True)
        self._thread.start()

    def put(self, images: np.ndarray, entropy: np.ndarray) -> None:
        """Queue selected uint8 images ``[N, H, W, 3]`` with their entropies; never blocks on the network."""
        with self._cond:
            for img, e in zip(images, entropy, strict=True):
                self._q.append((img, float(e)))
                self._q_bytes += img.nbytes
                self.counters.queued += 1
            while self._q and (len(self._q) > self.max_queue_samples or self._q_bytes > self.max_queue_bytes):
                old, _ = self._q.popleft()
                self._q_bytes -= old.nbytes
                self.counters.dropped_queue += 1
            if len(self._q) >= self.upload_batch:
                self._cond.notify_all()

    @property
    def queued_now(self) -> int:
        with self._cond:
            return len(self._q) + self._inflight

    def flush(self, timeout: float = 60.0) -> bool:
        """Upload everything queued now; True when the queue drained within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_now = True
            self._cond.notify_all()
            while (self._q or self._inflight) and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            self._flush_now = False
            return True

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[np.ndarray, float]] | None:
        with self._cond:
            t_first = time.monotonic()
            while not self._stop:
                if len(self._q) >= self.upload_batch or (self._q and (
                        self._flush_now or time.monotonic() - t_first >= self.flush_interval_s)):
                    break
                if not self._q:
                    t_first = time.monotonic()
                self._cond.wait(0.05)
            if self._stop:
                return None
            items = [self._q.popleft() for _ in range(min(self.upload_batch, len(self._q)))]
            self._q_bytes -= sum(img.nbytes for img, _ in items)
            self._inflight = len(items)
            return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            batch = SampleBatch(images=np.stack([i for i, _ in items]), fingerprint=self.fingerprint,
                                edge_version=self.edge_version, device_id=self.device_id,
                                entropy=np.asarray([e for _, e in items], np.float32))
            body = samples_to_bytes(batch, encoding=self.encoding)
            attempt = 0
            while True:
                try:
                    ack = self.client.upload_bytes(body)
                except UplinkError as exc:
                    self.counters.upload_errors += 1
                    if not exc.retryable:  # the cloud refused these samples: retrying cannot help
                        log.warning("upload refused, %d samples dropped: %s", len(items), exc)
                        self.counters.rejected += len(items)
                        break
                    delay = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt) * self._rng.uniform(0.5, 1.0)
                    attempt += 1
                    self.counters.retries += 1
                    with self._cond:
                        if self._cond.wait_for(lambda: self._stop, delay):
                            self._inflight = 0
                            return
                    continue
                with self._cond:
                    self.counters.uploaded += len(items)
                    self.counters.bytes_sent += len(body)
                    self.last_ack = ack
                break
            with self._cond:
                self._inflight = 0
                self._cond.notify_all()
