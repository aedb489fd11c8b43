"""A minimal private stand-in for ``cema_deploy.runtime.refit`` (the refit helper's branch), used by the edge
runtime only while that module does not exist. Same names and call shapes: ``RefitScheduler(backend, *,
min_interval_s=0.0, on_done=None)`` with ``submit``, ``wait_idle``, ``close`` and counters, and ``on_done``
called with a :class:`RefitOutcome` after every build (and for every blob a newer one replaced before it was
built). Delete this file once ``runtime/refit.py`` is merged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cema_deploy.contract.blob import RefitBlob
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.base import RefitReport

log = logging.getLogger("cema_deploy.edge")


@dataclass(frozen=True)
class RefitOutcome:
    """What became of one submitted blob: ``applied``, or ``error`` (the build or validation failed), or
    neither (a newer blob replaced it before it was built)."""

    version: int
    applied: bool
    error: CemaError | None = None
    report: RefitReport | None = None


class RefitScheduler:
    """Builds submitted blobs on one worker thread, newest first: a blob submitted while another waits replaces
    it (coalescing); builds start at least ``min_interval_s`` apart."""

    def __init__(
        self, backend: Any, *, min_interval_s: float = 0.0, on_done: Callable[[RefitOutcome], None] | None = None
    ) -> None:
        self.backend, self.min_interval_s, self.on_done = backend, min_interval_s, on_done
        self.submitted = self.built = self.applied = self.failed = self.coalesced = 0
        self._pending: RefitBlob | None = None
        self._building = False
        self._stop = False
        self._last_start = -float("inf")
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="cema-refit", daemon=True)
        self._thread.start()

    def submit(self, blob: RefitBlob) -> None:
        """Queue ``blob`` for building (never blocks); an older blob still waiting is dropped."""
        replaced = None
        with self._cond:
            self.submitted += 1
            if self._pending is not None:
                replaced = self._pending
                self.coalesced += 1
            self._pending = blob
            self._cond.notify_all()
        if replaced is not None:
            self._done(RefitOutcome(replaced.version, False))

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing waits and nothing is being built (``on_done`` included), False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._building:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        """Stop after the build in progress (a waiting blob is not built)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                    self._pending is None or time.monotonic() - self._last_start < self.min_interval_s
                ):
                    wait = self.min_interval_s - (time.monotonic() - self._last_start)
                    self._cond.wait(max(0.01, min(wait, 0.1)) if self._pending is not None else 0.1)
                if self._stop:
                    return
                blob, self._pending = self._pending, None
                self._building = True
                self._last_start = time.monotonic()
            assert blob is not None
            try:
                report = self.backend.refit(blob)
                outcome = RefitOutcome(blob.version, True, None, report)
                self.applied += 1
            except CemaError as exc:
                outcome = RefitOutcome(blob.version, False, exc, None)
                self.failed += 1
            except Exception as exc:  # never let the worker die
                log.error("refit of v%d failed unexpectedly: %r", blob.version, exc)
                outcome = RefitOutcome(blob.version, False, CemaError(repr(exc)), None)
                self.failed += 1
            self.built += 1
            self._done(outcome)
            with self._cond:
                self._building = False
                self._cond.notify_all()

    def _done(self, outcome: RefitOutcome) -> None:
        if self.on_done is not None:
            try:
                self.on_done(outcome)
            except Exception as exc:
                log.error("refit callback failed for v%d: %r", outcome.version, exc)
