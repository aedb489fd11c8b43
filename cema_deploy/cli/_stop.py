"""A requested stop (SIGINT, SIGTERM) for a long-running command: finish the work in hand, write the outputs.

The first signal only sets :attr:`StopSignals.requested`: the command ends after the batch it is serving and
writes everything. While the command waits for something outside it (the next frame of a source, the cloud
taking the last uploads), the signal interrupts that wait at once (:class:`StopRequested`, raised only inside
:meth:`StopSignals.interruptible`). A second signal outside such a wait raises ``KeyboardInterrupt`` (the
operator insists: the outputs may then be incomplete). SIGKILL cannot be caught.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["StopRequested", "StopSignals"]


class StopRequested(BaseException):
    """A stop signal interrupted a wait (a BaseException, so ``except Exception`` in between does not eat it)."""


class StopSignals:
    """Install handlers for SIGINT and SIGTERM for the life of a ``with`` block (main thread only; elsewhere it
    does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        #: The name of the first stop signal received (None: none).
        self.requested: str | None = None
        #: Called (in the handler) on the first signal, e.g. to end waits that only set flags can end.
        self.on_stop: Callable[[], None] | None = None
        self._waiting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.requested is None
        if first:
            self.requested = signal.Signals(signum).name
            if self.on_stop is not None:
                self.on_stop()
        if self._waiting:
            self._waiting = False
            raise StopRequested
        if not first:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self, *, after_stop: bool = False) -> Iterator[None]:
        """A wait that a stop signal ends at once (raises :class:`StopRequested`). Entered after a stop was
        requested, it raises at once unless ``after_stop`` (a last wait that the next signal ends)."""
        if self.requested is not None and not after_stop:
            raise StopRequested
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
