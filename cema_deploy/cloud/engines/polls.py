"""Long polls parked on :class:`asyncio.Event`, woken from any thread: one wait/wake for every engine.

A poll registers its event before it checks, so a publish between the check and the wait still wakes it. Parked
polls of one key share one event per event loop, and one wake sets them all: N parked polls cost one wake, never N.
The local engine keys by fingerprint and wakes from the deployment's worker thread; the Ray engine's ingress wakes
from its subscription thread, and each Ray actor parks its ``wait_for_version`` calls the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable


class ParkedPolls:
    """Polls parked per key until :meth:`wake` (thread-safe)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._events: dict[str, dict[asyncio.AbstractEventLoop, asyncio.Event]] = {k: {} for k in keys}
        self._lock = threading.Lock()

    async def wait(self, key: str, ready: Callable[[], bool], timeout: float, closing: Callable[[], bool]) -> None:
        """Return once ``ready()``, after ``timeout`` seconds, or once ``closing()`` (checked at least every second)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not closing():
            with self._lock:  # registered before the check: a wake in between sets this event
                event = self._events[key].setdefault(loop, asyncio.Event())
            remaining = deadline - loop.time()
            if ready() or remaining <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(remaining, 1.0))

    def wake(self, key: str) -> None:
        """Wake every poll parked on ``key`` (any thread)."""
        with self._lock:
            waiting = list(self._events[key].items())
            self._events[key].clear()
        for loop, event in waiting:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)
