"""Blob intake on the edge: poll -> verify -> parse -> validate -> refit scheduler.

The poller thread long-polls the cloud for a version above the ledger's floor
(:class:`~cema_deploy.runtime.updates.ledger.VersionLedger`: the one owner of the epoch, refusals and rollbacks);
each blob's signature is checked on the raw bytes before parsing (``verifier``), and without a verifier a blob
from a cloud that is not on a loopback address is refused unless unsigned blobs are allowed (every unsigned blob
applied is counted and warned about once). Valid blobs go to the refit scheduler
(``runtime.updates.scheduler.RefitScheduler``: builds the newest off the serving path, coalescing older ones).
A refusal is counted by reason, logged and reported to the cloud as an ``EdgeReport``; the ledger remembers it
(never fetched again) only when the blob's own, verified metadata named its version. An answer that cannot be
verified is never remembered: the poller backs off (0.5 s doubling to 30 s) and asks again, so a forged answer
costs at most that delay and a correctly signed blob served afterwards is applied.
Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cema_deploy.contract.blob import RefitBlob, blob_from_bytes, validate_blob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.messages import EdgeReport
from cema_deploy.exceptions import (
    BlobFormatError,
    BlobSchemaError,
    BlobValueError,
    CemaError,
    FingerprintMismatchError,
    RefitError,
    SignatureError,
    StaleBlobError,
    StaleEpochError,
    UplinkError,
)
from cema_deploy.runtime.link.backoff import Backoff
from cema_deploy.runtime.link.client import CloudLink
from cema_deploy.runtime.updates.ledger import Stamp, VersionLedger, previous_stamp, serving_stamp
from cema_deploy.runtime.updates.scheduler import RefitOutcome, RefitScheduler

__all__ = ["REFUSAL_REASONS", "BlobIntake"]

log = logging.getLogger("cema_deploy.edge")

#: Refusal reason of each error type (a blob raises exactly one of them).
REFUSAL_REASONS: tuple[tuple[type[CemaError], str], ...] = (
    (SignatureError, "signature"),
    (FingerprintMismatchError, "fingerprint"),
    (StaleEpochError, "stale epoch"),
    (StaleBlobError, "stale"),
    (BlobSchemaError, "schema"),
    (BlobValueError, "value"),
    (BlobFormatError, "format"),
    (RefitError, "build"),
)
_POLL_BACKOFF_BASE_S, _POLL_BACKOFF_CAP_S = 0.5, 30.0
#: Shortest time between two blob polls when the cloud answers 204 at once (it ignores ``wait``, or wait=0).
_MIN_POLL_INTERVAL_S = 0.1


class BlobIntake:
    """Fetches, checks and schedules blobs; the :class:`VersionLedger` (``ledger``) records what they did.

    ``report(EdgeReport)`` sends refusals to the cloud (the runtime passes the uplink's); ``on_applied(version)``
    runs after a refit swapped in (the rollback monitor judges it); ``on_changed()`` after anything the durable
    state holds changed; ``before_poll()`` at the top of every poll (the deployment's status read);
    ``before_decline()`` before a blob is declined because the guard holds an episode's line (the runtime asks the
    cloud whether it was reset since: a reset starts a new episode, and its blob is a new start, not the line).
    """

    def __init__(
        self,
        backend: Any,
        manifest: Manifest,
        *,
        client: CloudLink | None,
        verifier: Callable[[bytes], Any] | None,
        require_signature: bool,
        swap_lock: threading.Lock,
        poll_wait_s: float,
        ledger: VersionLedger | None = None,
        min_refit_interval_s: float = 0.0,
        report: Callable[[EdgeReport], None] | None = None,
        on_applied: Callable[[int], None] | None = None,
        on_changed: Callable[[], None] | None = None,
        before_poll: Callable[[], None] | None = None,
        before_decline: Callable[[], object] | None = None,
        pin_version: int | None = None,
    ) -> None:
        self.backend, self.manifest, self.client, self.verifier = backend, manifest, client, verifier
        self.require_signature, self.swap_lock, self.poll_wait_s = require_signature, swap_lock, poll_wait_s
        self.report, self.on_applied, self.on_changed, self.before_poll = report, on_applied, on_changed, before_poll
        self.before_decline = before_decline
        self.ledger = ledger if ledger is not None else VersionLedger(lambda: serving_stamp(backend))
        self.blobs_applied = self.unsigned_applied = self.poll_errors = self.bytes_received = 0
        self.last_blob_at: float | None = None
        #: raw bytes of the serving and previous parameters, by (epoch, version) (for the state folder)
        self.blob_bytes: dict[Stamp, bytes] = {}
        self._warned_unsigned = False
        self._reported_unverified: int | None = None  # the announced version last reported unverifiable
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.scheduler = RefitScheduler(
            # The runtime's swap lock is not held across a refit (a build can take seconds, minutes for ort-trt):
            # a rollback names the version it undoes (Backend.rollback(only_if_serving=...)) instead.
            backend,
            min_interval_s=min_refit_interval_s,
            on_done=self._on_done,
        )
        self._poller: threading.Thread | None = None
        #: Apply no blob above this version (``edge run --pin-version``); None: not pinned.
        self.pin_version = pin_version
        #: Newest version seen above the pin and not applied (0: none).
        self.held_by_pin = 0

    def start(self) -> None:
        """Start the poller thread (with a client)."""
        if self.client is not None and self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="cema-poller", daemon=True)
            self._poller.start()

    @property
    def floor(self) -> int:
        """Every version of the followed epoch up to this one is served, submitted, rolled back or refused."""
        return self.ledger.floor

    @property
    def refused(self) -> collections.Counter[str]:
        """Refusals since start, by reason (a copy)."""
        return collections.Counter(self.ledger.snapshot().refusals)

    @property
    def refused_upto(self) -> int:
        return self.ledger.refused_upto

    @property
    def refused_versions(self) -> dict[int, str]:
        """Refused versions of the followed epoch, with their reasons (a copy)."""
        return self.ledger.snapshot().refused

    def apply_bytes(self, data: bytes, *, source: str, timeout: float) -> bool:
        """Check ``data`` and refit now, blocking until that refit is done; True when it serves."""
        blob = self.admit(data, source, announced=None)
        if blob is None:
            return False
        self.scheduler.submit(blob)
        deadline = time.monotonic() + timeout
        self.scheduler.wait_idle(timeout)
        while not self.ledger.settled(blob.stamp):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return bool(serving_stamp(self.backend) == blob.stamp)

    def admit(self, data: bytes, source: str, *, announced: int | None, probe: bool = False) -> RefitBlob | None:
        """Signature, parsing, ordering and validation of received bytes; the blob (claimed in the ledger: submit
        it), or None when refused (counted, logged, reported; remembered only when its metadata is trusted).
        ``probe``: an answer to a probe from version 0, for which a blob of the followed epoch at or below the
        floor is no news rather than a refusal."""
        stamp: Stamp | None = None  # known once the metadata can be trusted
        try:
            if self.verifier is not None:
                self.verifier(data)
            elif self.require_signature:
                raise SignatureError(
                    f"Unsigned blob from {getattr(self.client, 'base_url', 'the cloud')}, which is not on a loopback "
                    "address: give the edge the cloud's public key (--public-key), or pass --allow-unsigned to trust "
                    "this network."
                )
            blob = blob_from_bytes(data, source=source)
            stamp = blob.stamp
            self.ledger.check_epoch(blob)
            if self.pin_version is not None and blob.version > self.pin_version:
                self._hold_by_pin(blob.version)
                return None
            validate_blob(blob, self.manifest)
            if self.ledger.holding is not None and self.before_decline is not None:
                self.before_decline()  # a reset since the rollback ends the hold (a new episode)
            if self.ledger.declines(blob):  # the rollback guard holds this episode's line (ledger.py): not reported
                return None
            self.ledger.admit(blob, source=source)
        except StaleBlobError as exc:
            if probe and not isinstance(exc, StaleEpochError):
                log.debug("probe from v0 answered with %s: nothing newer", source)
                return None
            self.refuse(stamp, exc, source, announced=announced)
            return None
        except CemaError as exc:
            self.refuse(stamp, exc, source, announced=announced)
            return None
        if self.verifier is None and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("applying UNSIGNED blobs (%s): whoever answers for that address can change this model; "
                        "give the edge the cloud's public key (--public-key)", source)  # fmt: skip
        with self._lock:
            self.blob_bytes[blob.stamp] = data
        return blob

    def _hold_by_pin(self, version: int) -> None:
        if version > self.held_by_pin:
            log.warning("blob v%d is newer than the pinned v%s: not applied (restart without --pin-version to "
                        "take it)", version, self.pin_version)  # fmt: skip
        self.held_by_pin = max(self.held_by_pin, version)

    def submit(self, blob: RefitBlob) -> None:
        """Hand an admitted blob to the refit scheduler."""
        self.scheduler.submit(blob)

    def refuse(self, stamp: Stamp | None, exc: CemaError, source: str, *, announced: int | None = None) -> None:
        """Count, log and report a refusal; ``stamp`` is the blob's own (epoch, version) when its metadata can be
        trusted, None otherwise (never remembered)."""
        reason = next((name for kind, name in REFUSAL_REASONS if isinstance(exc, kind)), "other")
        remembered = self.ledger.refused(stamp, reason)
        if stamp is None:
            log.warning("refused %s (%s): %s; an unverifiable answer: not remembered, polling again after a back-off",
                        source, reason, exc)  # fmt: skip
            version = announced or 0
            if version == self._reported_unverified:
                version = 0  # reported once per announced version: a repeated forgery is not re-reported
            else:
                self._reported_unverified = version
        else:
            log.warning("refused %s (%s): %s", source, reason, exc)
            version = stamp[1] if stamp[0] == self.ledger.epoch else 0
        if self.report is not None and version > 0:
            self.report(EdgeReport(kind="refused", version=version, reason=f"{reason}: {exc}"))
        if remembered and self.on_changed is not None:
            self.on_changed()

    def close(self) -> None:
        """Stop polling and building (a build in progress finishes; nothing is applied afterwards)."""
        self._stop.set()
        self.scheduler.close()
        if self._poller is not None:
            # A long poll in flight cannot be interrupted (httpx has no cancel for a blocking call); rather than
            # wait up to poll_wait_s for it, leave it to end on its own: the poller is a daemon thread that
            # applies nothing once stopped and swallows the error of the closed client.
            self._poller.join(timeout=0.1)

    def _on_done(self, outcome: RefitOutcome) -> None:
        """RefitScheduler callback (its thread)."""
        stamp = (outcome.epoch, outcome.version)
        if outcome.applied:
            with self._lock:
                self.blobs_applied += 1
                self.last_blob_at = time.monotonic()
                self.unsigned_applied += self.verifier is None
                keep = {stamp, previous_stamp(self.backend)}
                for s in [s for s in self.blob_bytes if s not in keep and s < stamp]:
                    del self.blob_bytes[s]
            log.info("now serving parameters v%d%s", outcome.version, f" (epoch {outcome.epoch})" * bool(outcome.epoch))
            if self.on_applied is not None:
                self.on_applied(outcome.version)
            if self.on_changed is not None:
                self.on_changed()
        elif outcome.error is not None:
            with self._lock:
                self.blob_bytes.pop(stamp, None)
            error = outcome.error if isinstance(outcome.error, CemaError) else RefitError(repr(outcome.error))
            self.refuse(stamp, error, f"blob v{outcome.version}")

    def _poll_loop(self) -> None:
        client = self.client
        assert client is not None  # the thread starts only with a client
        backoff, attempt = Backoff(_POLL_BACKOFF_BASE_S, _POLL_BACKOFF_CAP_S), 0
        while not self._stop.is_set():
            if self.before_poll is not None:
                self.before_poll()
            probe = self.ledger.take_probe()  # the cloud says it is behind the floor: a new cloud state?
            # pinned: ask only for what is newer than held already
            after = 0 if probe else max(self.floor, self.held_by_pin)
            t0 = time.monotonic()
            try:
                found = client.fetch_blob(after=after, wait=0.0 if probe else self.poll_wait_s)
                if found is None:
                    attempt = 0
                    self._stop.wait(max(0.0, _MIN_POLL_INTERVAL_S - (time.monotonic() - t0)))  # never spin
                    continue
                if self._stop.is_set():
                    return  # closed while the poll was in flight: apply nothing any more
                announced, data = found  # the header's version: unauthenticated, only named in logs and reports
                self.bytes_received += len(data)
                where = getattr(client, "base_url", "the cloud")
                floor = self.floor
                blob = self.admit(data, f"blob v{announced} from {where}", announced=announced, probe=probe)
                if blob is not None:
                    self.submit(blob)
                if blob is not None or probe or self.floor > floor or self.held_by_pin > floor:
                    attempt = 0
                    continue
                # Nothing this edge may remember (unverifiable, another epoch) or nothing newer: back off.
            except UplinkError as exc:
                self.poll_errors += 1
                log.debug("blob poll failed: %s", exc)
            except Exception as exc:  # never let the poller die; the engine keeps serving
                if self._stop.is_set():
                    return
                self.poll_errors += 1
                log.error("blob poller error: %r", exc)
            self._stop.wait(backoff.delay(attempt))
            attempt += 1
