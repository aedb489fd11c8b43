"""The edge's background uploader: one FIFO of uploads and reports, sent through a
:class:`~cema_deploy.runtime.link.client.CloudLink` (the HTTP client lives in ``client.py``, the entries in
``entries.py``, sending one entry in ``delivery.py``).

Nothing here touches the network on the inference path: :meth:`Uplink.put` and the report methods append to the
queue and return. One worker thread sends the queue's entries strictly in order, so the
:class:`~cema_deploy.contract.messages.BatchReport` of an edge batch reaches the cloud after that batch's uploads
(protocol 2). Entries:

* **samples** (kind ``selected``, ``statistics`` or ``calibration``): consecutive ``selected``/``statistics``
  entries of one parameter version, kind and generation are merged into uploads of at most ``upload_batch``
  samples; an upload goes when it is full, when the next entry cannot join it (a report, another kind or version),
  on :meth:`flush`, or ``flush_interval_s`` after its first sample was queued. A calibration batch goes whole, as
  one upload.
* **batch reports** and **edge reports** (rollbacks, refusals).

Each upload and each batch report has one idempotency key (uuid4), reused on every retry. Transport errors, 5xx,
408 and 429 are retried with jittered exponential back-off (a 429 waits at least its ``Retry-After``); a 409
(:class:`~cema_deploy.runtime.link.client.StaleGenerationError`: the deployment was reset) drops the upload, counted
as ``stale_generation``, and tells the listener. A refusal of *this device* (401 token unknown or revoked, 403 not
allowed, 404 no such deployment for this token, a 409 that is not about a generation: :data:`HOLD_STATUSES`) is not
the entry's fault: it stays queued (or spooled), the sending pauses and is retried every ``backoff_cap_s``, it is
said once per status with what to do (:attr:`Uplink.refusal`, counted as ``refusals``), and nothing is dropped.
Any other refusal drops the entry, counted as ``rejected``.

Bounds: in memory, ``max_queue_samples`` samples / ``max_queue_bytes`` bytes (the oldest samples are dropped,
counted in ``dropped_queue``; a calibration batch is dropped whole) and ``max_queue_reports`` reports. With a
``spool_dir`` the queue lives on disk instead (:mod:`cema_deploy.runtime.link.spool`), bounded by ``max_spool_bytes``
(oldest entries dropped, counted in ``dropped_spool``), and survives restarts; entries are then never merged (each
upload's key is fixed when it is spooled).

Routes, headers and limits are those of :mod:`cema_deploy.contract.protocol`.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from cema_deploy.contract.messages import BatchAck, BatchReport, EdgeReport, UploadAck
from cema_deploy.contract.samples import (
    KIND_CALIBRATION,
    KIND_SELECTED,
    KIND_STATISTICS,
)
from cema_deploy.exceptions import CemaError, ProtocolError, UplinkError
from cema_deploy.runtime.link.backoff import Backoff
from cema_deploy.runtime.link.client import CloudLink, EdgeConfigError
from cema_deploy.runtime.link.delivery import HOLD_STATUSES, UplinkDelivery, refusal_advice
from cema_deploy.runtime.link.entries import BATCH_REPORT, EDGE_REPORT, Entry, UplinkCounters, UplinkListener
from cema_deploy.runtime.link.spool import Spool

__all__ = ["HOLD_STATUSES", "Uplink", "UplinkCounters", "UplinkListener", "refusal_advice"]

log = logging.getLogger("cema_deploy.edge")

#: Estimated spool bytes of an entry beyond its arrays, until its file is written (metadata, report JSON).
_SPOOL_HEADER_BYTES = 256  # an underestimate: the spool thread corrects it and re-applies the bound


class Uplink(UplinkDelivery):
    """Background uploader: one FIFO of uploads and reports, batching, jittered exponential back-off.

    Ownership: :meth:`put` keeps references to the rows of ``images``; pass arrays the caller will not modify
    afterwards (boolean-mask indexing, as :class:`~cema_deploy.runtime.edge.EdgeRuntime` does, makes a copy).

    Example:
        >>> up = Uplink(client, fingerprint=manifest.fingerprint, upload_batch=32)  # doctest: +SKIP
        >>> up.put(images[mask], entropy[mask], version=backend.version)  # returns at once  # doctest: +SKIP
        >>> up.put_report(BatchReport(seen=64, selected=int(mask.sum()), uploaded=int(mask.sum()), generation=1))
        ...  # doctest: +SKIP
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
        max_queue_reports: int = 4096,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        spool_dir: str | Path | None = None,
        max_spool_bytes: int = 1024 * 2**20,
        listener: UplinkListener | None = None,
        seed: int | None = None,
    ) -> None:
        if min(upload_batch, max_queue_samples, max_queue_bytes, max_queue_reports, max_spool_bytes) < 1:
            raise EdgeConfigError(
                "upload_batch, max_queue_samples, max_queue_bytes, max_queue_reports and max_spool_bytes must be "
                f">= 1, got {upload_batch}, {max_queue_samples}, {max_queue_bytes}, {max_queue_reports}, "
                f"{max_spool_bytes}."
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
        self.max_queue_reports, self.max_spool_bytes = max_queue_reports, max_spool_bytes
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.listener = listener or UplinkListener()
        self.last_ack: UploadAck | None = None
        self.last_batch_ack: BatchAck | None = None
        #: Highest ``target_version`` of any acknowledgement (uploads and batch reports) so far.
        self.max_target_version = 0
        #: Version stamped on samples put without one (kept for callers that set it instead of passing it).
        self.edge_version = 0
        self._counters = UplinkCounters()
        self._q: collections.deque[Entry] = collections.deque()
        self._q_samples = self._q_bytes = self._q_reports = 0
        self._inflight = 0
        self._busy = False  # an entry is being sent
        self._cond = threading.Condition()
        self._stop = False
        self._flush_waiters = 0
        self._flush_cut = False  # cut_flush(): flush() returns at once from now on
        self._rng = random.Random(seed)
        self._backoff = Backoff(backoff_base_s, backoff_cap_s, rng=self._rng)
        self._warned: set[tuple[str, int | None]] = set()
        #: The cloud's refusal of this device now holding the queue (None: none); see HOLD_STATUSES.
        self.refusal: UplinkError | None = None
        self._to_spool: collections.deque[Entry] = collections.deque()
        self.spool = Spool(spool_dir) if spool_dir is not None else None
        self._spooler: threading.Thread | None = None
        if self.spool is not None:
            self._restore(self.spool)
            self._spooler = threading.Thread(target=self._spool_loop, args=(self.spool,), name="cema-spool",
                                             daemon=True)  # fmt: skip
            self._spooler.start()
        self._thread = threading.Thread(target=self._loop, name="cema-uplink", daemon=True)
        self._thread.start()

    # ---- caller side (never touches the network) -------------------------------------------------------------
    def put(
        self,
        images: np.ndarray,
        entropy: np.ndarray,
        *,
        version: int | None = None,
        kind: str = KIND_SELECTED,
        generation: int = 0,
    ) -> None:
        """Queue uint8 images ``[N, H, W, 3]`` of ``kind`` (``selected`` or ``statistics``) with their entropies,
        made with parameter ``version`` in deployment ``generation`` (0: not known yet).

        Returns at once; drops the oldest queued samples (counted) when a bound is exceeded.
        """
        if kind not in (KIND_SELECTED, KIND_STATISTICS):
            raise EdgeConfigError(f"put() takes kind 'selected' or 'statistics', got {kind!r}; see put_calibration.")
        if len(images) == 0:
            return
        v = self.edge_version if version is None else int(version)
        ent = np.asarray(entropy, np.float32)
        step = self.upload_batch if self.spool is not None else len(images)  # spooled: one file per upload
        for i in range(0, len(images), step):
            im = images[i : i + step]
            self._append(Entry(kind, len(im), im.nbytes, im, ent[i : i + step], version=v, generation=generation))

    def put_calibration(
        self,
        images: np.ndarray,
        entropy: np.ndarray,
        selected: np.ndarray,
        *,
        version: int,
        generation: int,
        reason: str,
    ) -> None:
        """Queue a whole edge batch as one calibration upload (``reason`` ``start`` or ``shift``; ``selected``:
        the rule's mask)."""
        self._append(
            Entry(KIND_CALIBRATION, len(images), images.nbytes, images, np.asarray(entropy, np.float32),
                   np.asarray(selected, bool), version=int(version), generation=generation, calibration=reason)
        )  # fmt: skip

    def put_report(self, report: BatchReport) -> None:
        """Queue a batch report behind the uploads queued so far. A statistics report (protocol 3: ``seen`` 0 with
        ``statistics``) replaces the statistics reports still queued and unsent: only the newest statistics matter,
        and a ResNet-50's are ~150 KB, so an edge offline for hours holds one, not thousands."""
        e = Entry(BATCH_REPORT, message=report)
        if _statistics_only(e):
            with self._cond:
                for old in [x for x in self._q if _statistics_only(x) and not x.inflight]:
                    self._q.remove(old)
                    self._q_reports -= 1
                    self._q_bytes -= old.nbytes
                    self._forget(old)
                    self._counters.statistics_superseded += 1
        self._append(e)

    def put_edge_report(self, report: EdgeReport) -> None:
        """Queue a rollback or refusal report (delivered in order, retried like uploads)."""
        self._append(Entry(EDGE_REPORT, message=report))

    @property
    def counters(self) -> UplinkCounters:
        """A consistent snapshot of the counters."""
        with self._cond:
            return replace(self._counters, bytes_sent=int(getattr(self.client, "bytes_sent", 0)))

    @property
    def calibration_queued(self) -> bool:
        """True while a calibration batch waits in the queue (or spool)."""
        with self._cond:
            return any(e.kind == KIND_CALIBRATION for e in self._q)

    @property
    def queued_now(self) -> int:
        """Samples waiting in the queue (or spool) or in the upload being sent."""
        with self._cond:
            return self._q_samples + self._inflight

    @property
    def reports_queued(self) -> int:
        with self._cond:
            return self._q_reports

    @property
    def spool_bytes(self) -> int:
        """Bytes of the spooled entries (0 without a spool)."""
        with self._cond:
            return self._q_bytes if self.spool is not None else 0

    def flush(self, timeout: float = 60.0) -> bool:
        """Send everything queued now (uploads and reports) without waiting for a full batch; True when all of
        it was acknowledged (or refused by the cloud) within ``timeout``, False on timeout or once closed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._q or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop or self.refusal is not None or self._flush_cut:
                        return False
                    self._cond.wait(min(left, 0.1))
                return True
            finally:
                self._flush_waiters -= 1

    def cut_flush(self, cut: bool = True) -> None:
        """Make every :meth:`flush`, running or to come, return False within 0.1 s (a stop was requested;
        ``cut=False`` undoes it). Only sets a flag: safe from a signal handler."""
        self._flush_cut = cut

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker. Entries still queued are discarded in memory; spooled ones stay for the next run
        (call :meth:`flush` first to send them)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self.spool is not None and self._spooler is not None:
            self._spooler.join(timeout)  # everything queued reaches the spool first
            self.spool.sync()

    # ---- the queue -----------------------------------------------------------------------------------------
    def _append(self, e: Entry) -> None:
        lost: list[tuple[str, str]] = []
        with self._cond:
            e.t = time.monotonic()
            if self.spool is not None:  # written to disk by the spool thread, never on the caller's thread
                e.key = str(uuid.uuid4())
                e.nbytes = e.nbytes + 4 * e.n + _SPOOL_HEADER_BYTES if e.is_samples else _SPOOL_HEADER_BYTES
                self._to_spool.append(e)
            self._q.append(e)
            self._q_samples += e.n
            self._q_bytes += e.nbytes
            self._q_reports += not e.is_samples
            self._counters.queued += e.n
            self._enforce_bounds(e, lost)
            self._cond.notify_all()
        for kind, calibration in lost:
            self.listener.on_dropped(kind, calibration)

    def _spool_loop(self, spool: Spool) -> None:
        """Write queued entries to the spool in FIFO order (off the caller's thread); drains before stopping."""
        while True:
            with self._cond:
                while not self._to_spool and not self._stop:
                    self._cond.wait(0.1)
                if not self._to_spool:
                    return
                e = self._to_spool.popleft()
            try:
                if e.is_samples:
                    rec = spool.write_samples(self._batch_of(e), key=e.key)
                else:
                    assert e.message is not None
                    rec = spool.write_report({"type": e.kind, "body": e.message.to_json()}, key=e.key)
            except CemaError as exc:  # the entry stays in memory (sent if the edge keeps running)
                log.warning("could not write an entry to the upload spool: %s", exc)
                continue
            lost: list[tuple[str, str]] = []
            with self._cond:
                if e.done:  # sent (or dropped) while being written
                    spool.remove(rec)
                    continue
                self._q_bytes += rec.nbytes - e.nbytes
                e.rec, e.nbytes = rec, rec.nbytes
                if not e.inflight:
                    e.images = e.entropy = e.selected = None  # read back from the file when taken
                self._enforce_bounds(None, lost)
            for kind, calibration in lost:
                self.listener.on_dropped(kind, calibration)

    def _restore(self, spool: Spool) -> None:
        for rec in spool.load():
            if rec.is_samples:
                batch = spool.read_samples(rec)
                if batch is None:
                    continue
                e = Entry(batch.kind, len(batch), rec.nbytes, version=batch.edge_version, generation=batch.generation,
                           calibration=batch.calibration, key=rec.key, rec=rec)  # fmt: skip
                self._counters.restored += e.n
            else:
                body = spool.read_report(rec)
                try:
                    kind = body["type"] if body else ""
                    message: BatchReport | EdgeReport = (BatchReport if kind == BATCH_REPORT else EdgeReport).from_json(
                        body["body"] if body else None
                    )
                except (KeyError, TypeError, ProtocolError) as exc:
                    log.warning("spooled report %s is malformed and was dropped: %s", rec.path.name, exc)
                    spool.remove(rec)
                    continue
                e = Entry(kind, nbytes=rec.nbytes, message=message, key=rec.key, rec=rec)
            e.t = time.monotonic()
            self._q.append(e)
            self._q_samples += e.n
            self._q_bytes += e.nbytes
            self._q_reports += not e.is_samples
        if self._q:
            log.info("upload spool %s: %d samples and %d reports from an earlier run", spool.directory,
                     self._q_samples, self._q_reports)  # fmt: skip
        lost: list[tuple[str, str]] = []
        with self._cond:
            held, before = self._q_bytes, self._counters.dropped_spool
            self._enforce_bounds(None, lost)  # a bound lowered since (--spool-mb): the oldest entries go, counted
        if lost:
            log.warning("upload spool %s held %d bytes, above its bound of %d: dropped the oldest %d samples",
                        spool.directory, held, self.max_spool_bytes, self._counters.dropped_spool - before)  # fmt: skip
        for kind, calibration in lost:
            self.listener.on_dropped(kind, calibration)
        for e in self._q:  # the owner learns of a calibration batch in flight (it must not queue another)
            if e.is_samples:
                self.listener.on_restored(e.kind, e.calibration)

    def _enforce_bounds(self, newest: Entry | None, lost: list[tuple[str, str]]) -> None:
        """Drop the oldest samples (or whole spooled entries / calibration batches) while a bound is exceeded;
        the entry just queued is never dropped whole when it alone exceeds a bound."""
        spooled = self.spool is not None
        cap_samples = math.inf if spooled else float(self.max_queue_samples)
        cap_bytes = self.max_spool_bytes if spooled else self.max_queue_bytes
        while self._q_samples > cap_samples or self._q_bytes > cap_bytes:
            e = next((x for x in self._q if x.is_samples), None)
            if e is None or (e is newest and (spooled or e.kind == KIND_CALIBRATION)):
                break
            k = e.n
            if not spooled and e.kind != KIND_CALIBRATION and e.n > 1:  # drop only as many samples as needed
                per = max(1, e.nbytes // e.n)
                k = min(e.n, max(1, self._q_samples - self.max_queue_samples, -(-(self._q_bytes - cap_bytes) // per)))
            if k == e.n:
                self._q.remove(e)
                self._q_samples -= e.n
                self._q_bytes -= e.nbytes
                self._count_drop(e, spool=spooled, lost=lost)
            else:
                part = e.split(k)
                self._q_samples -= part.n
                self._q_bytes -= part.nbytes
                self._count_drop(part, spool=False, lost=lost)
        while self._q_reports > self.max_queue_reports:
            e = next(x for x in self._q if not x.is_samples)
            self._q.remove(e)
            self._q_reports -= 1
            self._q_bytes -= e.nbytes
            self._count_drop(e, spool=spooled, lost=lost)

    def _count_drop(self, e: Entry, *, spool: bool, lost: list[tuple[str, str]]) -> None:
        self._forget(e)
        if e.is_samples:
            if spool:
                self._counters.dropped_spool += e.n
            else:
                self._counters.dropped_queue += e.n
            lost.append((e.kind, e.calibration))
        elif e.kind == BATCH_REPORT:
            self._counters.reports_dropped += 1
        elif e.kind == EDGE_REPORT:
            self._counters.edge_reports_dropped += 1

    # ---- worker ------------------------------------------------------------------------------------------------
    def _ready(self) -> bool:
        head = self._q[0]
        if not head.is_samples or head.kind == KIND_CALIBRATION or self.spool is not None or self._flush_waiters:
            return True
        n = 0
        for e in self._q:
            if not e.joins(head):
                return True  # the upload cannot grow any more: send it now
            n += e.n
            if n >= self.upload_batch:
                return True
        return time.monotonic() - head.t >= self.flush_interval_s

    def _take(self) -> list[Entry] | None:
        """Wait until the head of the queue should go (or stop); pop it (and the samples that join it)."""
        with self._cond:
            while not self._stop and not (self._q and self._ready()):
                self._cond.wait(0.05)
            if self._stop:
                return None
            head = self._q.popleft()
            items = [head]
            if head.is_samples and self.spool is None and head.kind != KIND_CALIBRATION:
                n = head.n
                if n > self.upload_batch:  # a large put: send its first upload_batch samples, keep the rest
                    self._q.appendleft(head)
                    items = [head.split(self.upload_batch)]
                    n = self.upload_batch
                while self._q and self._q[0].joins(head) and n < self.upload_batch:
                    e = self._q[0]
                    if e.n > self.upload_batch - n:
                        items.append(e.split(self.upload_batch - n))
                    else:
                        items.append(self._q.popleft())
                    n += items[-1].n
            for e in items:
                self._q_samples -= e.n
                self._q_bytes -= e.nbytes if self.spool is None else 0  # spooled bytes stay until acknowledged
                self._q_reports -= not e.is_samples
            for e in items:
                e.inflight = True
            self._inflight = sum(e.n for e in items)
            self._busy = True
            return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            try:
                self._send(items)
            except Exception as exc:  # never let the worker die: log, count, drop this entry
                log.error("sending a queued %s failed unexpectedly and it was dropped: %r", items[0].kind, exc)
                with self._cond:
                    self._counters.upload_errors += 1
                    self._counters.rejected += sum(e.n for e in items)
                    self._release(items)
            with self._cond:
                self._inflight = 0
                self._busy = False
                self._cond.notify_all()

    def _forget(self, e: Entry) -> None:
        """``e`` is done: delete its spool file (or skip writing it). Holds the lock."""
        e.done = True
        if self.spool is not None:
            if e.rec is not None:
                self.spool.remove(e.rec)
            elif e in self._to_spool:
                self._to_spool.remove(e)

    def _release(self, items: list[Entry]) -> None:
        """The entries are done (sent or dropped): delete their spool files. Holds the lock."""
        for e in items:
            self._forget(e)
            if self.spool is not None:
                self._q_bytes -= e.nbytes


def _statistics_only(e: Entry) -> bool:
    """A statistics report: a batch report of ``seen`` 0 carrying the edge's statistics (protocol 3)."""
    m = e.message
    return e.kind == BATCH_REPORT and isinstance(m, BatchReport) and m.seen == 0 and bool(m.statistics)
