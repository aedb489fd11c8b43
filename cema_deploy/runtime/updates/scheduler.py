"""Sustained hot refits: one worker builds the newest blob submitted, older waiting ones are skipped.

With K = 1 the cloud publishes a blob every adaptation step, faster than an edge may want to rebuild its
engine. :class:`RefitScheduler` decouples the two: :meth:`~RefitScheduler.submit` never blocks (the blob
poller hands over what it received and goes back to polling), and a single worker thread builds only the
newest blob waiting, counting the ones it skipped as *coalesced*. ``min_interval_s`` leaves the serving path
that long undisturbed between the end of one build and the start of the next (a blob refused by validation
built nothing and starts no pause). Because the backend keeps only the serving engine and the previous
one, at most two engines are resident, three while a build runs.

Every outcome goes to ``on_done`` on the worker thread, off the serving path::

    RefitOutcome(version, applied, error, report)

Example:
    >>> with RefitScheduler(backend, min_interval_s=1.0, on_done=print) as refits:  # doctest: +SKIP
    ...     refits.submit(blob)           # returns at once
    ...     refits.wait_idle(timeout=10)  # everything submitted applied or failed
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from cema_deploy.contract.blob import RefitBlob
from cema_deploy.exceptions import BlobError, RefitError
from cema_deploy.runtime.backends.base import Backend, RefitReport

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RefitOutcome:
    """What became of one submitted blob that reached the worker, or was dropped by :meth:`close`.

    ``applied`` is True when its version serves now (then ``report`` times the refit); otherwise ``error``
    says why it was refused or failed (``None`` for a blob still waiting when the scheduler closed).
    """

    version: int
    applied: bool
    error: BaseException | None = None
    report: RefitReport | None = None
    epoch: int = 0  # the blob's epoch: (epoch, version) names it


class RefitScheduler:
    """Hot refits of ``backend`` on one worker thread, newest blob first, at most one build at a time.

    Counters (read any time): ``submitted``; ``applied`` and ``failed`` (built or refused by the backend);
    ``coalesced`` (never built: a newer blob arrived while it waited, or it was waiting at :meth:`close`).
    ``submitted == applied + failed + coalesced`` once :meth:`wait_idle` returns True.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        min_interval_s: float = 0.0,
        on_done: Callable[[RefitOutcome], None] | None = None,
    ) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.backend = backend
        self.min_interval_s = float(min_interval_s)
        self.on_done = on_done
        #: Called on the worker right before each build: the blob to build instead (the edge's own statistics
        #: substituted when its adapter is on, :class:`~cema_deploy.runtime.edge.EdgeRuntime`); None: as received.
        self.prepare: Callable[[RefitBlob], RefitBlob] | None = None
        self.submitted = 0
        self.applied = 0
        self.coalesced = 0
        self.failed = 0
        self._cond = threading.Condition()
        self._pending: RefitBlob | None = None
        self._busy = False
        self._closed = False
        self._last_end = float("-inf")  # monotonic time the last build ended
        self._worker = threading.Thread(target=self._loop, name=f"{backend.name}-refit", daemon=True)
        self._worker.start()

    def submit(self, blob: RefitBlob) -> None:
        """Hand ``blob`` to the worker and return at once. A waiting blob of a lower (or equal) ``(epoch, version)`` is
        replaced by it; a blob older than the one waiting is dropped. Both count as coalesced."""
        with self._cond:
            if self._closed:
                raise RefitError(f"RefitScheduler.submit(v{blob.version}) after close(): make a new scheduler.")
            self.submitted += 1
            dropped: RefitBlob | None = None
            if self._pending is not None and self._pending.stamp > blob.stamp:  # (epoch, version)
                dropped = blob
            else:
                dropped, self._pending = self._pending, blob
            if dropped is not None:
                self.coalesced += 1
            self._cond.notify_all()
        if dropped is not None:
            log.debug("refit to v%d skipped: a newer blob is waiting", dropped.version)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no blob waits and no build runs; False when ``timeout`` (seconds) passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._pending is None and not self._busy

    def close(self) -> None:
        """Let a running build finish, drop a waiting blob (coalesced, reported with ``applied=False``) and
        stop the worker. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._worker.join()

    def __enter__(self) -> RefitScheduler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- worker -------------------------------------------------------------------------------------
    def _next(self) -> RefitBlob | None:
        """The next blob to build (waiting out ``min_interval_s``), or None once closed."""
        with self._cond:
            while not self._closed:
                if self._pending is None:
                    self._cond.wait()
                    continue
                wait = self._last_end + self.min_interval_s - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                blob, self._pending = self._pending, None
                self._busy = True
                return blob
            return None

    def _loop(self) -> None:
        while (blob := self._next()) is not None:
            outcome = self._apply(blob)
            with self._cond:
                if not isinstance(outcome.error, BlobError):  # a refused blob built nothing: no pause after it
                    self._last_end = time.monotonic()
                if outcome.applied:
                    self.applied += 1
                else:
                    self.failed += 1
            self._report(outcome)  # before going idle, so wait_idle() returns after the callback ran
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        with self._cond:
            dropped, self._pending = self._pending, None
            if dropped is not None:
                self.coalesced += 1
            self._cond.notify_all()
        if dropped is not None:
            self._report(RefitOutcome(version=dropped.version, applied=False, epoch=dropped.epoch))

    def _apply(self, blob: RefitBlob) -> RefitOutcome:
        try:
            report = self.backend.refit(blob if self.prepare is None else self.prepare(blob))
        except Exception as exc:  # a refused or failed blob: the old parameters keep serving
            log.warning("refit to v%d not applied: %s", blob.version, exc)
            return RefitOutcome(version=blob.version, applied=False, error=exc, epoch=blob.epoch)
        return RefitOutcome(version=blob.version, applied=True, report=report, epoch=blob.epoch)

    def _report(self, outcome: RefitOutcome) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(outcome)
        except Exception:  # a broken callback must not stop the refits
            log.exception("RefitScheduler on_done callback failed for v%d", outcome.version)
