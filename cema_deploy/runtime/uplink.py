"""The edge's background uploader: a bounded queue of selected samples, sent through a
:class:`~cema_deploy.runtime.client.CloudLink` (the HTTP client lives in ``client.py``).

Nothing here runs on the inference path: :meth:`Uplink.put` appends to an in-memory queue and returns (O(1) per
sample, no network, no encoding). A worker thread batches queued samples into uploads of at most ``upload_batch``
samples (or whatever is queued once ``flush_interval_s`` has passed), encodes them, and retries with jittered
exponential back-off while the cloud is unreachable or failing (5xx, 408, 429, transport errors). A request the
cloud refuses (any other 4xx) is not retried: its samples are counted as ``rejected``. When the queue is full
(``max_queue_samples`` samples or ``max_queue_bytes`` bytes) the oldest samples are dropped and counted.

Routes, headers and limits are those of :mod:`cema_deploy.contract.protocol`.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from cema_deploy.contract.messages import UploadAck
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import UplinkError
from cema_deploy.runtime.client import CloudLink, EdgeConfigError

log = logging.getLogger("cema_deploy.edge")


@dataclass
class UplinkCounters:
    """Totals since the uplink started (samples unless named ``bytes``/``errors``/``retries``)."""

    queued: int = 0  # samples put in the queue
    uploaded: int = 0  # samples the cloud acknowledged
    bytes_sent: int = 0  # bodies of acknowledged uploads (as the client counts them; 0 in-process)
    dropped_queue: int = 0  # oldest samples dropped because the queue was full
    rejected: int = 0  # samples in uploads the cloud refused (4xx, not retried)
    upload_errors: int = 0  # failed upload attempts, retried or not
    retries: int = 0  # upload attempts repeated after a retryable failure


class Uplink:
    """Background uploader: bounded queue (drop-oldest), batching, jittered exponential back-off.

    Ownership: :meth:`put` keeps references to the rows of ``images``; pass arrays the caller will not modify
    afterwards (boolean-mask indexing, as :class:`~cema_deploy.runtime.edge.EdgeRuntime` does, makes a copy).

    Example:
        >>> up = Uplink(client, fingerprint=manifest.fingerprint, upload_batch=32)  # doctest: +SKIP
        >>> up.put(images[mask], entropy[mask], version=backend.version)  # returns at once  # doctest: +SKIP
        >>> up.flush(timeout=30.0); up.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        client: CloudLink,
        *,
        fingerprint: str,
        device_id: str | None = None,
        upload_batch: int = 32,
        flush_interval_s: float = 0.5,
        max_queue_samples: int = 4096,
        max_queue_bytes: int = 64 * 2**20,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        if upload_batch < 1 or max_queue_samples < 1 or max_queue_bytes < 1:
            raise EdgeConfigError(
                f"upload_batch, max_queue_samples and max_queue_bytes must be >= 1, got {upload_batch}, "
                f"{max_queue_samples}, {max_queue_bytes}."
            )
        if flush_interval_s < 0 or backoff_base_s <= 0 or backoff_cap_s < backoff_base_s:
            raise EdgeConfigError(
                f"Need flush_interval_s >= 0 and 0 < backoff_base_s <= backoff_cap_s, got {flush_interval_s}, "
                f"{backoff_base_s}, {backoff_cap_s}."
            )
        self.client, self.fingerprint = client, fingerprint
        self.device_id = getattr(client, "device_id", "") if device_id is None else device_id
        self.upload_batch, self.flush_interval_s = upload_batch, flush_interval_s
        self.max_queue_samples, self.max_queue_bytes = max_queue_samples, max_queue_bytes
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.last_ack: UploadAck | None = None
        #: Version stamped on samples put without one (kept for callers that set it instead of passing it).
        self.edge_version = 0
        self._counters = UplinkCounters()
        self._q: collections.deque[tuple[np.ndarray, float, int]] = collections.deque()
        self._q_bytes = 0
        self._inflight = 0
        self._cond = threading.Condition()
        self._stop = False
        self._flush_waiters = 0
        self._rng = random.Random(seed)
        self._thread = threading.Thread(target=self._loop, name="cema-uplink", daemon=True)
        self._thread.start()

    # ---- caller side (never touches the network) -------------------------------------------------------------
    def put(self, images: np.ndarray, entropy: np.ndarray, *, version: int | None = None) -> None:
        """Queue selected uint8 images ``[N, H, W, 3]`` with their entropies, made with parameter ``version``.

        Returns at once; drops the oldest queued samples (counted in ``dropped_queue``) when a cap is exceeded.
        """
        v = self.edge_version if version is None else int(version)
        with self._cond:
            for img, e in zip(images, entropy, strict=True):
                self._q.append((img, float(e), v))
                self._q_bytes += img.nbytes
            self._counters.queued += len(images)
            while self._q and (len(self._q) > self.max_queue_samples or self._q_bytes > self.max_queue_bytes):
                old = self._q.popleft()
                self._q_bytes -= old[0].nbytes
                self._counters.dropped_queue += 1
            if len(self._q) >= self.upload_batch:
                self._cond.notify_all()

    @property
    def counters(self) -> UplinkCounters:
        """A consistent snapshot of the counters."""
        with self._cond:
            return replace(self._counters, bytes_sent=int(getattr(self.client, "bytes_sent", 0)))

    @property
    def queued_now(self) -> int:
        """Samples waiting in the queue or in the upload being sent."""
        with self._cond:
            return len(self._q) + self._inflight

    def flush(self, timeout: float = 60.0) -> bool:
        """Upload everything queued now without waiting for a full batch; True when it was all acknowledged (or
        refused by the cloud) within ``timeout``, False on timeout or when the uplink was closed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._q or self._inflight:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop:
                        return False
                    self._cond.wait(min(left, 0.1))
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (samples still queued are discarded; call :meth:`flush` first to send them)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): ``min(cap, base * 2**attempt)`` times a uniform
        jitter in [0.5, 1] (so edges that lost the cloud together do not come back in step)."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** min(attempt, 32)) * self._rng.uniform(0.5, 1.0)

    # ---- worker ------------------------------------------------------------------------------------------------
    def _take(self) -> list[tuple[np.ndarray, float, int]] | None:
        """Wait for a full batch, the flush interval, a flush or stop; pop up to ``upload_batch`` samples of one
        parameter version (so every upload's ``edge_version`` is exact)."""
        with self._cond:
            t_first = time.monotonic()
            while not self._stop:
                if not self._q:
                    t_first = time.monotonic()
                elif (
                    len(self._q) >= self.upload_batch
                    or self._flush_waiters
                    or time.monotonic() - t_first >= self.flush_interval_s
                ):
                    break
                self._cond.wait(0.05)
            if self._stop:
                return None
            version = self._q[0][2]
            items: list[tuple[np.ndarray, float, int]] = []
            while self._q and len(items) < self.upload_batch and self._q[0][2] == version:
                items.append(self._q.popleft())
            self._q_bytes -= sum(img.nbytes for img, _, _ in items)
            self._inflight = len(items)
            return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            try:
                self._send(items)
            except Exception as exc:  # never let the worker die: log, count, drop this batch
                log.error("upload of %d samples failed unexpectedly and was dropped: %r", len(items), exc)
                with self._cond:
                    self._counters.upload_errors += 1
                    self._counters.rejected += len(items)
            with self._cond:
                self._inflight = 0
                self._cond.notify_all()

    def _send(self, items: list[tuple[np.ndarray, float, int]]) -> None:
        batch = SampleBatch(
            images=np.stack([img for img, _, _ in items]),
            fingerprint=self.fingerprint,
            edge_version=items[0][2],
            device_id=self.device_id,
            entropy=np.asarray([e for _, e, _ in items], np.float32),
        )
        key = str(uuid.uuid4())  # one key for this upload and all its retries: the cloud stores it once
        attempt = 0
        while True:
            try:
                ack = self.client.upload(batch, idempotency_key=key)
            except UplinkError as exc:
                with self._cond:
                    self._counters.upload_errors += 1
                    if not exc.retryable:  # the cloud refused these samples: retrying cannot help
                        self._counters.rejected += len(items)
                if not exc.retryable:
                    log.warning("upload refused, %d samples dropped: %s", len(items), exc)
                    return
                delay = self.backoff_delay(attempt)
                if exc.retry_after is not None:  # 429: the cloud said when to come back
                    delay = max(delay, exc.retry_after * self._rng.uniform(1.0, 1.2))
                attempt += 1
                log.debug("upload failed (%s); retry %d in %.2f s", exc, attempt, delay)
                with self._cond:
                    if self._cond.wait_for(lambda: self._stop, delay):
                        return
                    self._counters.retries += 1
                continue
            with self._cond:
                self._counters.uploaded += len(items)
                self.last_ack = ack
            return
