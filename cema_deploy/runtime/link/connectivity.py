"""Whether the cloud answers, as the edge's requests see it: one log line when it stops answering, one when it is
back (with what waits to be uploaded), and the state for ``cema_edge_cloud_up``.

An *answer* is any HTTP response, a refusal included (the cloud is up; what it says is the uplink's business); a
transport error (connection refused, timeout, TLS, DNS) marks the cloud unreachable. The edge keeps serving either
way: uploads wait in the queue or the spool and are retried with back-off. Never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Connectivity"]

log = logging.getLogger("cema_deploy.edge")


class Connectivity:
    """Reachability of the cloud at ``url``: :attr:`up` is None until the first request ended, then whether the
    last one got an answer. ``backlog()`` (set by the runtime) describes what waits, for the line when it is
    back. Thread-safe: the uplink and the blob poller both report."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.up: bool | None = None
        #: Times the cloud became unreachable (after an answer, or at the first request).
        self.outages = 0
        #: Seconds the cloud was unreachable so far (closed outages; see :meth:`down_s`).
        self.down_total_s = 0.0
        self.backlog: Callable[[], str] | None = None
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def answered(self) -> None:
        """A request got an HTTP response."""
        with self._lock:
            was_down, since = self.up is False, self._down_since
            self.up, self._down_since = True, None
            if was_down and since is not None:
                self.down_total_s += time.monotonic() - since
        if was_down:
            what = self.backlog() if self.backlog is not None else ""
            log.warning("the cloud at %s answers again after %.0f s%s", self.url,
                        time.monotonic() - (since or time.monotonic()), f"; {what}" if what else "")  # fmt: skip

    def unreachable(self, reason: str) -> None:
        """A request failed without a response (``reason``: the transport error)."""
        with self._lock:
            new = self.up is not False
            self.up = False
            if new:
                self.outages += 1
                self._down_since = time.monotonic()
        if new:
            log.warning("the cloud at %s is unreachable (%s); the edge keeps serving, uploads wait and are retried",
                        self.url, reason)  # fmt: skip

    def down_s(self) -> float:
        """Seconds unreachable in all, the current outage included."""
        with self._lock:
            now = time.monotonic() - self._down_since if self._down_since is not None else 0.0
            return self.down_total_s + now
