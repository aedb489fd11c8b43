"""How the uplink's worker delivers one entry: an upload or a report, retried with jittered back-off, held while the
cloud refuses this device (:data:`HOLD_STATUSES`), dropped when the cloud refuses the entry itself. A mixin of
:class:`~cema_deploy.runtime.link.uplink.Uplink`, which owns the queue these methods take entries from."""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np

from cema_deploy.contract.messages import BatchAck, BatchReport, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import StaleGenerationError, UplinkError
from cema_deploy.runtime.link.backoff import Backoff
from cema_deploy.runtime.link.client import CloudLink
from cema_deploy.runtime.link.entries import Entry, UplinkCounters, UplinkListener
from cema_deploy.runtime.link.spool import Spool

__all__ = ["HOLD_STATUSES", "UplinkDelivery", "refusal_advice"]

log = logging.getLogger("cema_deploy.edge")

_T = TypeVar("_T")
#: Refusals of the device rather than of the entry: the entry is kept and retried (authorization, scope, fingerprint).
HOLD_STATUSES = (401, 403, 404, 409)


def refusal_advice(status: int | None) -> str:
    """What an operator does about a refusal of :data:`HOLD_STATUSES` (one sentence)."""
    if status == 401:
        return ("the cloud does not know this device's token (revoked, expired or mistyped): create one with "
                "`cema-deploy cloud token add DEVICE --deployment NAME` and restart the edge with it")  # fmt: skip
    if status == 403:
        return "this device's token may not do this: ask the operator for a device token of this deployment"
    if status == 404:
        return ("the cloud serves no deployment of this export's fingerprint to this token: check the token's "
                "--deployment and that the cloud serves this export (`cloud serve --edge` this folder)")  # fmt: skip
    return "the cloud refuses this export's fingerprint: export again or serve this export on the cloud"


class UplinkDelivery:
    """Sending entries for :class:`~cema_deploy.runtime.link.uplink.Uplink` (the attributes below are its)."""

    client: CloudLink
    fingerprint: str
    device_id: str
    spool: Spool | None
    listener: UplinkListener
    backoff_cap_s: float
    refusal: UplinkError | None
    last_ack: UploadAck | None
    last_batch_ack: BatchAck | None
    max_target_version: int
    _cond: threading.Condition
    _counters: UplinkCounters
    _stop: bool
    _warned: set[tuple[str, int | None]]
    _q_samples: int
    _inflight: int
    _rng: random.Random
    _backoff: Backoff

    def _release(self, items: list[Entry]) -> None:
        raise NotImplementedError  # the queue's (Uplink._release)

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based), as :class:`~cema_deploy.runtime.link.backoff.Backoff`."""
        return self._backoff.delay(attempt)

    def _batch_of(self, e: Entry) -> SampleBatch:
        assert e.images is not None
        return SampleBatch(
            images=e.images, fingerprint=self.fingerprint, edge_version=e.version, device_id=self.device_id,
            entropy=e.entropy, kind=e.kind, generation=e.generation, selected=e.selected, calibration=e.calibration,
        )  # fmt: skip

    def _send(self, items: list[Entry]) -> None:
        head = items[0]
        if not head.is_samples:
            self._send_report(head)
            return
        if head.rec is not None and self.spool is not None:
            batch = self.spool.read_samples(head.rec)
            if batch is None:
                with self._cond:
                    self._counters.dropped_spool += head.n
                    self._release(items)
                return
        elif len(items) == 1:
            batch = self._batch_of(head)
        else:
            merged = replace(head, images=np.concatenate([e.images for e in items if e.images is not None]),
                             entropy=np.concatenate([e.entropy for e in items if e.entropy is not None]))  # fmt: skip
            batch = self._batch_of(merged)
        key = head.key or str(uuid.uuid4())  # one key for this upload and all its retries: the cloud stores it once
        n = len(batch)
        stale: StaleGenerationError | None = None

        def call() -> UploadAck:
            return self.client.upload(batch, idempotency_key=key)

        try:
            ack = self._deliver(call, f"upload of {n} {batch.kind} samples", upload=True)
        except StaleGenerationError as exc:
            stale, ack = exc, None
        with self._cond:
            if ack is not None:
                self._counters.uploaded += n
                kind_field = f"uploaded_{batch.kind}"
                setattr(self._counters, kind_field, getattr(self._counters, kind_field) + n)
                self.last_ack = ack
                self.max_target_version = max(self.max_target_version, ack.target_version)
            elif stale is not None:
                self._counters.stale_generation += n
            elif not self._stop:
                self._counters.rejected += n
            if ack is not None or not self._stop:  # stopped mid-retry: a spooled entry stays for the next run
                self._release(items)
        if ack is not None:
            self.listener.on_upload_ack(batch, ack)
        elif stale is not None:
            log.warning("upload of %d samples dropped: %s", n, stale)
            self.listener.on_dropped(batch.kind, batch.calibration)
            self.listener.on_stale_generation(stale)
        elif not self._stop:
            self.listener.on_dropped(batch.kind, batch.calibration)

    def _send_report(self, e: Entry) -> None:
        key = e.key or str(uuid.uuid4())
        msg = e.message
        if isinstance(msg, BatchReport):
            report = msg
            ack = self._deliver(lambda: self.client.batch_report(report, idempotency_key=key), "batch report")
            with self._cond:
                if ack is not None:
                    self._counters.reports_sent += 1
                    self.last_batch_ack = ack
                    self.max_target_version = max(self.max_target_version, ack.target_version)
                elif not self._stop:
                    self._counters.reports_dropped += 1
                if ack is not None or not self._stop:
                    self._release([e])
            if ack is not None:
                self.listener.on_batch_ack(report, ack)
            return
        assert isinstance(msg, EdgeReport)
        edge_report = msg

        def deliver_report() -> bool:
            self.client.report(edge_report)
            return True

        done = self._deliver(deliver_report, f"{edge_report.kind} report")
        with self._cond:
            if done:
                self._counters.edge_reports_sent += 1
            elif not self._stop:
                self._counters.edge_reports_dropped += 1
            if done or not self._stop:
                self._release([e])

    def _deliver(self, call: Callable[[], _T], what: str, *, upload: bool = False) -> _T | None:
        """``call()`` until it succeeds (its result), the cloud refuses it (None; a 409 is raised), or stop."""
        attempt = 0
        while True:
            try:
                result = call()
            except UplinkError as exc:
                with self._cond:
                    self._counters.upload_errors += upload
                if isinstance(exc, StaleGenerationError):
                    raise
                if not exc.retryable and exc.status in HOLD_STATUSES:  # this device is refused, not this entry
                    self._hold(exc, what)
                    with self._cond:
                        if self._cond.wait_for(lambda: self._stop, self._backoff.jitter(self.backoff_cap_s)):
                            return None
                    continue
                if not exc.retryable:  # the cloud refused it: retrying cannot help
                    first = (what.split()[0], exc.status) not in self._warned  # once per kind and status
                    self._warned.add((what.split()[0], exc.status))
                    log.log(logging.WARNING if first else logging.DEBUG, "%s refused, dropped: %s", what, exc)
                    return None
                delay = self.backoff_delay(attempt)
                if exc.retry_after is not None:  # 429: the cloud said when to come back
                    delay = max(delay, exc.retry_after * self._rng.uniform(1.0, 1.2))  # capped by the client
                attempt += 1
                log.debug("%s failed (%s); retry %d in %.2f s", what, exc, attempt, delay)
                with self._cond:
                    if self._cond.wait_for(lambda: self._stop, delay):
                        return None
                    self._counters.retries += 1
            else:
                if self.refusal is not None:
                    with self._cond:
                        self.refusal = None
                        queued = self._q_samples + self._inflight
                    log.warning("the cloud accepts this device again; sending the %d queued samples", queued)
                return result

    def _hold(self, exc: UplinkError, what: str) -> None:
        """The cloud refused this device (HOLD_STATUSES): keep the entry, say so once per status."""
        with self._cond:
            first = self.refusal is None or self.refusal.status != exc.status
            self.refusal = exc
            self._counters.refusals += 1
            queued = self._q_samples + self._inflight
            self._cond.notify_all()  # a flush() waiting for the queue gives up: nothing goes until this changes
        if first:
            where = "spooled" if self.spool is not None else "queued in memory (lost on exit without --state)"
            log.warning("the cloud refuses this device (%s, answering the %s): %s. What waits to be uploaded "
                        "(%d samples now) stays %s and is retried every %g s; nothing is dropped. [%s]",
                        exc.status, what, refusal_advice(exc.status), queued, where, self.backoff_cap_s,
                        exc)  # fmt: skip
