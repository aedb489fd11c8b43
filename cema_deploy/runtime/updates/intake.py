"""Blob intake on the edge: poll -> verify -> parse -> validate -> refit scheduler, and the refusal ledger.

The poller thread long-polls the cloud for a version above everything this edge serves, has submitted, rolled
back or refused; each blob's signature is checked on the raw bytes before parsing (``verifier``), and without a
verifier a blob from a cloud that is not on a loopback address is refused unless unsigned blobs are allowed
(every unsigned blob applied is counted and warned about once). Valid blobs go to the refit scheduler
(``runtime.updates.scheduler.RefitScheduler``: builds the newest off the serving path, coalescing older ones).
A refusal is counted by reason, logged, reported to the cloud as an ``EdgeReport`` and never fetched again.
Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import random
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
    UplinkError,
)
from cema_deploy.runtime.link.client import CloudLink
from cema_deploy.runtime.updates.scheduler import RefitOutcome, RefitScheduler

__all__ = ["REFUSAL_REASONS", "BlobIntake"]

log = logging.getLogger("cema_deploy.edge")

#: Refusal reason of each error type (a blob raises exactly one of them).
REFUSAL_REASONS: tuple[tuple[type[CemaError], str], ...] = (
    (SignatureError, "signature"),
    (FingerprintMismatchError, "fingerprint"),
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
    """Fetches, checks and schedules blobs; keeps the ledger of refused versions.

    ``report(EdgeReport)`` sends refusals to the cloud (the runtime passes the uplink's); ``on_applied(version)``
    runs after a refit swapped in (the rollback monitor judges it); ``on_changed()`` after anything the durable
    state holds changed; ``before_poll()`` at the top of every poll (the deployment's status read).
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
        min_refit_interval_s: float = 0.0,
        report: Callable[[EdgeReport], None] | None = None,
        on_applied: Callable[[int], None] | None = None,
        on_changed: Callable[[], None] | None = None,
        before_poll: Callable[[], None] | None = None,
    ) -> None:
        self.backend, self.manifest, self.client, self.verifier = backend, manifest, client, verifier
        self.require_signature, self.swap_lock, self.poll_wait_s = require_signature, swap_lock, poll_wait_s
        self.report, self.on_applied, self.on_changed, self.before_poll = report, on_applied, on_changed, before_poll
        self.refused: collections.Counter[str] = collections.Counter()
        self.refused_versions: dict[int, str] = {}
        self.refused_upto = 0  # versions <= this are never applied (rolled back, or refused when fetched)
        self.blobs_applied = self.unsigned_applied = self.poll_errors = self.bytes_received = 0
        self.last_blob_at: float | None = None
        self.submitted_upto = 0
        self.blob_bytes: dict[int, bytes] = {}  # raw bytes of the serving and previous versions (for the state)
        self._warned_unsigned = False
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

    def start(self) -> None:
        """Start the poller thread (with a client)."""
        if self.client is not None and self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="cema-poller", daemon=True)
            self._poller.start()

    @property
    def floor(self) -> int:
        """Every version up to this one is served, submitted, rolled back or refused: ask for newer ones."""
        return max(int(self.backend.version), self.refused_upto, self.submitted_upto)

    def apply_bytes(self, data: bytes, *, source: str, timeout: float) -> bool:
        """Check ``data`` and refit now, blocking until that refit is done; True when it serves."""
        blob = self.admit(data, source, announced=None)
        if blob is None:
            return False
        self.submit(blob)
        deadline = time.monotonic() + timeout
        self.scheduler.wait_idle(timeout)
        while self.backend.version < blob.version and blob.version not in self.refused_versions:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return bool(self.backend.version == blob.version)

    def admit(self, data: bytes, source: str, *, announced: int | None) -> RefitBlob | None:
        """Signature, parsing and validation of received bytes; the blob, or None when refused (counted,
        logged, reported)."""
        version = announced or 0
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
            version = blob.version
            if blob.version <= self.floor:
                raise StaleBlobError(
                    f"Blob version {blob.version} is not above version {self.floor}, which this edge serves, built, "
                    "rolled back or refused; not applying it. The cloud must publish a newer version."
                )
            validate_blob(blob, self.manifest)
        except CemaError as exc:
            self.refuse(version, exc, source)
            return None
        if self.verifier is None and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("applying UNSIGNED blobs (%s): whoever answers for that address can change this model; "
                        "give the edge the cloud's public key (--public-key)", source)  # fmt: skip
        with self._lock:
            self.blob_bytes[blob.version] = data
        return blob

    def submit(self, blob: RefitBlob) -> None:
        with self.swap_lock:
            self.submitted_upto = max(self.submitted_upto, blob.version)
        self.scheduler.submit(blob)

    def refuse(self, version: int, exc: CemaError, source: str) -> None:
        reason = next((name for kind, name in REFUSAL_REASONS if isinstance(exc, kind)), "other")
        with self.swap_lock:
            self.refused_upto = max(self.refused_upto, version)  # never fetched or applied again
        with self._lock:
            self.refused[reason] += 1
            if version > 0:
                self.refused_versions[version] = reason
        log.warning("refused %s (%s): %s", source, reason, exc)
        if self.report is not None and version > 0:
            self.report(EdgeReport(kind="refused", version=version, reason=f"{reason}: {exc}"))
        if self.on_changed is not None:
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
        if outcome.applied:
            with self._lock:
                self.blobs_applied += 1
                self.last_blob_at = time.monotonic()
                self.unsigned_applied += self.verifier is None
                keep = {outcome.version, *self._previous_versions()}
                for v in [v for v in self.blob_bytes if v not in keep and v < outcome.version]:
                    del self.blob_bytes[v]
            log.info("now serving parameters v%d", outcome.version)
            if self.on_applied is not None:
                self.on_applied(outcome.version)
            if self.on_changed is not None:
                self.on_changed()
        elif outcome.error is not None:
            with self._lock:
                self.blob_bytes.pop(outcome.version, None)
            error = outcome.error if isinstance(outcome.error, CemaError) else RefitError(repr(outcome.error))
            self.refuse(outcome.version, error, f"blob v{outcome.version}")

    def _previous_versions(self) -> set[int]:
        prev = getattr(self.backend, "previous_version", None)
        if prev is None:
            state = getattr(self.backend, "_previous", None)
            prev = state.version if state is not None else None
        return {int(prev)} if prev is not None else set()

    def _poll_loop(self) -> None:
        client = self.client
        assert client is not None  # the thread starts only with a client
        delay = _POLL_BACKOFF_BASE_S
        while not self._stop.is_set():
            if self.before_poll is not None:
                self.before_poll()
            after = self.floor
            t0 = time.monotonic()
            try:
                found = client.fetch_blob(after=after, wait=self.poll_wait_s)
                if found is None:
                    delay = _POLL_BACKOFF_BASE_S
                    self._stop.wait(max(0.0, _MIN_POLL_INTERVAL_S - (time.monotonic() - t0)))  # never spin
                    continue
                if self._stop.is_set():
                    return  # closed while the poll was in flight: apply nothing any more
                version, data = found
                self.bytes_received += len(data)
                where = getattr(client, "base_url", "the cloud")
                blob = self.admit(data, f"blob v{version} from {where}", announced=version)
                if blob is None:
                    with self.swap_lock:
                        self.refused_upto = max(self.refused_upto, version)  # do not fetch it again
                else:
                    self.submit(blob)
                if self.floor > after:
                    delay = _POLL_BACKOFF_BASE_S
                    continue
                # The cloud answered with nothing newer than asked for: treat as an error, do not spin.
                log.warning("the cloud sent blob v%d when asked for a version above %d", version, after)
            except UplinkError as exc:
                self.poll_errors += 1
                log.debug("blob poll failed: %s", exc)
            except Exception as exc:  # never let the poller die; the engine keeps serving
                if self._stop.is_set():
                    return
                self.poll_errors += 1
                log.error("blob poller error: %r", exc)
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _POLL_BACKOFF_CAP_S)
