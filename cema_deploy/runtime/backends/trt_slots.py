"""Two engines refitted in turn (*slots*), so a refit never changes weights under a request and never leaves a
slot with mixed weights that could serve or be rolled back to. No TensorRT here: the discipline is tested with a
plain-Python engine.

A refittable engine is refitted in place, so the backend holds two copies of it (a third would not fit an 8 GB
Jetson next to the cloud's replica of the model). One serves; the other is the *standby* and holds the
parameters that served before the last refit, which is what ``rollback`` returns to. A refit:

1. picks the standby and marks it ``refitting``: from now on it refuses new requests (a request that read the
   old state retries on the serving slot) and rollback is refused;
2. waits until requests already running on it have finished;
3. refits it. On success it holds the new parameters and the base class swaps it in. On failure (a refit can
   fail half way, e.g. some weights rejected) it is refitted back to the parameters it held; if even that fails
   it stays ``invalid``: it never serves and ``rollback`` says there is nothing to roll back to. The next
   successful refit of that slot makes it valid again.

Slot states: ``ready`` (holds ``tensors`` exactly) -> ``refitting`` -> ``ready`` | ``invalid``.
"""

from __future__ import annotations

import os
import threading
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CemaError, RefitError
from cema_deploy.runtime.backends.base import Backend

READY, REFITTING, INVALID = "ready", "refitting", "invalid"


class SlotEngine(Protocol):
    """What a slot needs from an engine: run a batch, take new refittable tensors in place, release."""

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


class Slot:
    """One engine, the tensors it holds, its state and a count of requests running on it."""

    def __init__(self, engine: SlotEngine, tensors: Mapping[str, np.ndarray], index: int) -> None:
        self.engine = engine
        self.tensors = tensors
        self.index = index
        self.state = READY
        self.in_flight = 0
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()  # one execution context runs one request at a time

    def try_acquire(self) -> bool:
        with self._cond:
            if self.state != READY:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run on an acquired slot (see :meth:`DoubleBufferedBackend._run_on_current`)."""
        with self._run_lock:
            return self.engine.run(x)

    def begin_refit(self, timeout: float) -> None:
        """Refuse new requests, then wait for those running; on time-out the slot is ready again, unchanged."""
        with self._cond:
            if self.state == REFITTING:
                raise RefitError(f"Slot {self.index} is already being refitted.")
            before, self.state = self.state, REFITTING
            if not self._cond.wait_for(lambda: self.in_flight == 0, timeout=timeout):
                self.state = before
                raise RefitError(
                    f"The standby engine still had {self.in_flight} request(s) running after {timeout:g} s; "
                    "nothing was changed. Retry the refit."
                )

    def end_refit(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """``tensors``: what the slot now holds exactly; None: unknown (mixed), the slot becomes invalid."""
        with self._cond:
            if tensors is None:
                self.state = INVALID
            else:
                self.tensors, self.state = tensors, READY

    def holds(self, tensors: Mapping[str, np.ndarray]) -> bool:
        with self._cond:
            return self.state == READY and self.tensors is tensors


class DoubleBufferedBackend(Backend):
    """A :class:`Backend` over two refittable engines; subclasses say how to make one (``_new_engine``)."""

    #: Longest wait for requests running on the standby before a refit gives up (seconds).
    drain_timeout_s: float = 30.0

    def __init__(self, model_dir: str | os.PathLike[str], *, manifest: Manifest | None = None) -> None:
        self._slots: list[Slot] = []
        super().__init__(model_dir, manifest=manifest)

    # ---- subclass hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _new_engine(self, tensors: Mapping[str, np.ndarray]) -> SlotEngine:
        """A new engine holding ``tensors`` (called twice, at start)."""

    # ---- Backend hooks --------------------------------------------------------------------------------
    def _build(self, tensors: Mapping[str, np.ndarray]) -> Slot:
        if not self._slots:  # at start: both slots hold the serving blob
            try:
                for i in range(2):
                    self._slots.append(Slot(self._new_engine(tensors), tensors, i))
            except BaseException:
                self._close_slots()
                raise
            return self._slots[0]
        serving = self._state.engine
        standby = self._slots[1] if serving is self._slots[0] else self._slots[0]
        standby.begin_refit(self.drain_timeout_s)
        held = standby.tensors
        try:
            standby.engine.refit(tensors)
        except BaseException as exc:
            standby.end_refit(self._restore(standby, held))
            if isinstance(exc, CemaError):
                raise
            raise RefitError(f"Refitting the standby engine failed ({type(exc).__name__}: {exc}).") from exc
        standby.end_refit(tensors)
        return standby

    def _restore(self, slot: Slot, held: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray] | None:
        """Refit ``slot`` back to ``held`` after a failed refit; None when that fails too (slot invalid)."""
        try:
            slot.engine.refit(held)
        except Exception:
            return None
        return held

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        out, _ = self._run_on_current(x)
        return out

    # ---- serving ----------------------------------------------------------------------------------------
    def infer(self, x: np.ndarray) -> np.ndarray:
        out, _ = self._run_on_current(x)
        return out

    def infer_versioned(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        return self._run_on_current(x)

    def _run_on_current(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Run on the serving slot; if a swap made it the standby being refitted, on the new serving one."""
        for _ in range(1000):
            state = self._state
            slot: Slot = state.engine
            if slot.try_acquire():
                try:
                    return slot.run(x), state.version
                finally:
                    slot.release()
        raise RefitError("No TensorRT engine could take the request (both slots busy refitting); retry.")

    def rollback(self) -> int:
        """Like :meth:`Backend.rollback`, refused when the previous parameters' engine no longer holds them."""
        with self._refit_lock:
            prev = self._previous
            if prev is None:
                raise RefitError("Nothing to roll back to: no refit has been applied since the backend started.")
            if not prev.engine.holds(prev.tensors):
                self._previous = None
                raise RefitError(
                    "Nothing to roll back to: the engine that held the previous parameters was left invalid by a "
                    "failed refit (they could not be restored). The current parameters keep serving."
                )
            self._state, self._previous = prev, None
            return self._state.version

    @property
    def slot_states(self) -> list[str]:
        """State of each slot (``ready``, ``refitting``, ``invalid``), for reports and tests."""
        return [s.state for s in self._slots]

    def close(self) -> None:
        super().close()
        self._close_slots()

    def _close_slots(self) -> None:
        slots, self._slots = self._slots, []
        for s in slots:
            s.engine.close()
