"""What the edge's uplink queues: its counters, the listener it reports to, and one queued entry (samples, a batch
report or an edge report), split and merged by the rules of :mod:`cema_deploy.runtime.link.uplink`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cema_deploy.contract.messages import BatchAck, BatchReport, EdgeReport, UploadAck
from cema_deploy.contract.samples import KIND_CALIBRATION, SAMPLE_KINDS, SampleBatch
from cema_deploy.exceptions import StaleGenerationError
from cema_deploy.runtime.link.spool import SpoolRecord

__all__ = ["BATCH_REPORT", "EDGE_REPORT", "Entry", "UplinkCounters", "UplinkListener"]

#: Entry kinds beside the sample kinds.
BATCH_REPORT, EDGE_REPORT = "batch_report", "edge_report"


@dataclass
class UplinkCounters:
    """Totals since the uplink started (samples unless named ``bytes``/``errors``/``retries``/``reports``)."""

    queued: int = 0  # samples put in the queue (all kinds)
    uploaded: int = 0  # samples the cloud acknowledged (all kinds)
    uploaded_selected: int = 0
    uploaded_calibration: int = 0
    uploaded_statistics: int = 0
    bytes_sent: int = 0  # bodies of acknowledged uploads (as the client counts them; 0 in-process)
    dropped_queue: int = 0  # oldest samples dropped because the memory queue was full
    dropped_spool: int = 0  # oldest samples dropped because the spool was full (or could not be written)
    rejected: int = 0  # samples in uploads the cloud refused (4xx other than 409, not retried)
    stale_generation: int = 0  # samples in uploads refused with 409 (made for a generation before a reset)
    upload_errors: int = 0  # failed upload attempts, retried or not
    retries: int = 0  # attempts (uploads and reports) repeated after a retryable failure
    reports_sent: int = 0  # batch reports the cloud acknowledged
    reports_dropped: int = 0  # batch reports refused (4xx) or dropped from a full queue
    statistics_superseded: int = 0  # unsent statistics reports replaced by a newer one (protocol 3)
    edge_reports_sent: int = 0  # rollback/refusal reports delivered
    edge_reports_dropped: int = 0
    restored: int = 0  # samples found in the spool at start (left by an earlier run)
    refusals: int = 0  # attempts the cloud refused because of this device (HOLD_STATUSES); the entries were kept


class UplinkListener:
    """What the uplink tells its owner, on the worker thread (no-ops here; the edge runtime overrides them).

    Callbacks run outside the uplink's lock and must not block for long: the queue waits for them.
    """

    def on_upload_ack(self, batch: SampleBatch, ack: UploadAck) -> None:
        """The cloud acknowledged ``batch``."""

    def on_batch_ack(self, report: BatchReport, ack: BatchAck) -> None:
        """The cloud acknowledged a batch report."""

    def on_stale_generation(self, exc: StaleGenerationError) -> None:
        """An upload was refused with 409: ``exc.current`` is the deployment's status now."""

    def on_dropped(self, kind: str, calibration: str) -> None:
        """Samples of ``kind`` were dropped without reaching the cloud (full queue, refusal, 409)."""

    def on_restored(self, kind: str, calibration: str) -> None:
        """Samples of ``kind`` left in the spool by an earlier run are queued again (called at start)."""


@dataclass(eq=False)  # identity: entries are found and removed by identity, never compared by value
class Entry:
    kind: str  # a sample kind, BATCH_REPORT or EDGE_REPORT
    n: int = 0  # samples
    nbytes: int = 0
    images: np.ndarray | None = None  # None when spooled (read back when taken)
    entropy: np.ndarray | None = None
    selected: np.ndarray | None = None
    version: int = 0
    generation: int = 0
    calibration: str = ""
    message: BatchReport | EdgeReport | None = None
    key: str = ""
    rec: SpoolRecord | None = None
    t: float = 0.0  # when queued (monotonic)
    inflight: bool = False  # taken by the worker
    done: bool = False  # sent or dropped: its spool file (if any) is deleted

    @property
    def is_samples(self) -> bool:
        return self.kind in SAMPLE_KINDS

    def joins(self, head: Entry) -> bool:
        """Can this entry go in the same upload as ``head``?"""
        return (
            self.is_samples
            and self.kind != KIND_CALIBRATION
            and (self.kind, self.version, self.generation) == (head.kind, head.version, head.generation)
        )

    def split(self, k: int) -> Entry:
        """Remove and return the first ``k`` samples (memory entries only)."""
        assert self.images is not None and self.entropy is not None and 0 < k < self.n
        per = self.nbytes // self.n
        head = replace(self, n=k, nbytes=per * k, images=self.images[:k], entropy=self.entropy[:k])
        self.images, self.entropy, self.n, self.nbytes = (
            self.images[k:],
            self.entropy[k:],
            self.n - k,
            self.nbytes - per * k,
        )
        return head
