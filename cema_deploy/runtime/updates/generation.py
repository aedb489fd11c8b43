"""The deployment as the edge knows it: its generation, whether it is calibrated, and when to calibrate.

Protocol 2 (``contract/protocol.py``): a deployment's *generation* rises on every operator reset; after a start
or reset it is *uncalibrated* until a calibration batch of that generation was applied. The edge reads
``status()`` at start and whenever an acknowledgement or a 409 shows a newer generation; while the deployment is
uncalibrated, its next edge batch goes up whole as a ``calibration="start"`` batch (one at a time: the next is
sent only if that one was lost). A shift the selector detects sends that batch as ``calibration="shift"``
(switchable). A newer generation starts a fresh selector (the runtime does that on its serving thread).

:class:`GenerationTracker` is also the uplink's listener: every acknowledgement names the generation and its
calibration state. An older cloud that sends neither (generation 0) changes nothing.

Protocol 3: an edge whose statistics adapter is on (``owns_statistics``) sends no calibration batch, neither at
start nor on a shift: it owns its running statistics (its adapter resets them on a shift itself) and reports them
with its batch reports instead. Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from cema_deploy.contract.messages import BatchAck, BatchReport, UploadAck
from cema_deploy.contract.samples import KIND_CALIBRATION, SampleBatch
from cema_deploy.exceptions import StaleGenerationError, UplinkError
from cema_deploy.runtime.link.client import CloudLink
from cema_deploy.runtime.link.uplink import UplinkListener

__all__ = ["GenerationTracker"]

log = logging.getLogger("cema_deploy.edge")


class GenerationTracker(UplinkListener):
    """Generation and calibration state of the edge's deployment, fed by status reads and acknowledgements.

    Thread-safe: the serving thread asks :meth:`begin_batch` and :meth:`claim_shift`, the uplink thread reports
    acknowledgements, the poller reads the status. ``on_new_generation(generation)`` is called (on the thread that
    saw it) when a newer generation than the known one appears.
    """

    def __init__(
        self,
        client: CloudLink | None,
        *,
        recalibrate: bool = True,
        generation: int = 0,
        calibrated: bool | None = None,
        on_new_generation: Callable[[int], None] | None = None,
        on_calibration_done: Callable[[int | None], None] | None = None,
        on_cloud_version: Callable[[int], None] | None = None,
        owns_statistics: bool = False,
    ) -> None:
        self.client, self.recalibrate = client, recalibrate
        #: The edge's adapter owns the running statistics: no calibration batches (see the module docstring).
        self.owns_statistics = owns_statistics
        self.generation = generation  # 0: not known yet
        self.calibrated = calibrated  # None: not known yet
        self.on_new_generation = on_new_generation
        #: Called with the calibration upload's ``target_version`` once acknowledged (None: it was lost).
        self.on_calibration_done = on_calibration_done
        #: Called with the newest version a status read or an acknowledgement names (unsigned: a hint only).
        self.on_cloud_version = on_cloud_version
        self.calibrations: collections.Counter[str] = collections.Counter()
        self.status_errors = 0
        self.status_due = client is not None  # read the status before calibrating (at start, on a new generation)
        self._calibrating = False  # a calibration batch is queued or in flight
        self._seen_calibrated = -1  # the generation the cloud has said (or acknowledged) is calibrated
        self._status_gone = False  # the cloud has no status route (an older cloud): stop asking
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()

    def read_status(self, timeout: float = 0.0, stop: threading.Event | None = None) -> bool:
        """Ask the cloud for the deployment's status if it is due, retrying for up to ``timeout`` seconds; True
        when it is known. A cloud without the route (a non-retryable refusal) is not asked again."""
        if self.client is None or self._status_gone:
            return False
        with self._status_lock:  # one read at a time (the poller and a --sync batch may both want it)
            if not self.status_due:
                return not self._status_gone
            return self._read_status(self.client, timeout, stop)

    def _read_status(self, client: CloudLink, timeout: float, stop: threading.Event | None) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = client.status()
            except UplinkError as exc:
                if not exc.retryable and exc.status not in (401, 403):  # a refused token is said by the uplink
                    self._status_gone, self.status_due = True, False
                    log.warning("the cloud answered no deployment status (%s); this edge will not calibrate", exc)
                    return False
                self.status_errors += 1
                if time.monotonic() >= deadline or (stop is not None and stop.wait(0.2)):
                    return False
                if stop is None:
                    time.sleep(0.2)
                continue
            self.status_due = False
            self.observe(status.generation, status.calibrated, "status")
            self._cloud_version(status.version)
            return True

    def observe(self, generation: int, calibrated: bool | None, source: str) -> None:
        """A message of the cloud named ``generation`` (0: an older cloud that does not say) and whether it is
        calibrated. Answers about an older generation are ignored."""
        if generation <= 0:
            return
        with self._lock:
            if generation < self.generation:
                return
            new = 0 < self.generation < generation
            if generation > self.generation:
                self.generation = generation
                if new:
                    self._calibrating = False
                    self.status_due = self.client is not None and not self._status_gone
            if calibrated:
                self.calibrated, self._seen_calibrated = True, generation
            elif calibrated is False and self._seen_calibrated != generation:
                # A generation, once calibrated, stays so until a reset (a new generation): an answer made before
                # the cloud applied a calibration (it does so after acknowledging it) must not undo it.
                self.calibrated = False
        if new:
            log.warning("deployment generation %d (seen in %s): the cloud was reset; starting a fresh selector%s",
                        generation, source, "" if calibrated else " and calibrating")  # fmt: skip
            if self.on_new_generation is not None:
                self.on_new_generation(generation)

    def calibrations_snapshot(self) -> dict[str, int]:
        """Calibration batches queued so far, by reason (a copy taken under the lock)."""
        with self._lock:
            return dict(self.calibrations)

    def begin_batch(self) -> tuple[str, int]:
        """For the edge batch about to be selected: ``("start", generation)`` when it goes up whole as the
        deployment's calibration batch (counted; one in flight at a time), else ``("", generation)``. The
        generation is the one to stamp on its uploads."""
        with self._lock:
            calibrates = self.client is not None and not self.owns_statistics
            if calibrates and not self._calibrating and self.calibrated is False:
                self._calibrating = True
                self.calibrations["start"] += 1
                return "start", self.generation
            return "", self.generation

    def claim_shift(self) -> bool:
        """The selector detected a shift on this batch: True when it goes up whole as ``calibration="shift"``
        (recalibration on, no calibration in flight); counted."""
        with self._lock:
            if self.client is None or not self.recalibrate or self._calibrating or self.owns_statistics:
                return False
            self._calibrating = True
            self.calibrations["shift"] += 1
            return True

    # ---- UplinkListener (the uplink thread) ----------------------------------------------------------------
    def on_upload_ack(self, batch: SampleBatch, ack: UploadAck) -> None:
        self.observe(ack.generation, ack.calibrated, "an upload acknowledgement")
        self._cloud_version(ack.version)
        if batch.kind == KIND_CALIBRATION:
            with self._lock:
                self._calibrating = False
                if batch.calibration == "start" and ack.generation in (0, self.generation):
                    self.calibrated, self._seen_calibrated = True, self.generation
            if self.on_calibration_done is not None:
                self.on_calibration_done(ack.target_version)

    def on_batch_ack(self, report: BatchReport, ack: BatchAck) -> None:
        self.observe(ack.generation, ack.calibrated, "a batch report acknowledgement")
        self._cloud_version(ack.version)

    def on_stale_generation(self, exc: StaleGenerationError) -> None:
        self.observe(exc.current.generation, exc.current.calibrated, "a 409 answer")
        self._cloud_version(exc.current.version)

    def _cloud_version(self, version: int) -> None:
        if self.on_cloud_version is not None:
            self.on_cloud_version(version)

    def on_restored(self, kind: str, calibration: str) -> None:
        if kind == KIND_CALIBRATION:  # a calibration batch spooled by the last run goes first: it is the one
            with self._lock:
                self._calibrating = True

    def on_dropped(self, kind: str, calibration: str) -> None:
        if kind == KIND_CALIBRATION:
            with self._lock:
                self._calibrating = False  # the next batch calibrates again if still needed
            if self.on_calibration_done is not None:
                self.on_calibration_done(None)
