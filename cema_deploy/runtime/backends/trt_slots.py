"""Two engines refitted in turn (*slots*), so a refit never changes weights under a request and never leaves a
slot with mixed weights that could serve or be rolled back to. No TensorRT here: the discipline is tested with a
plain-Python engine, and it is shared by every backend whose engines take new weights in place: TensorRT
(:class:`DoubleBufferedBackend`) and ONNX Runtime's in-place path (``onnxrt_inplace``), both through
:class:`SlotPair`.

A refittable engine is refitted in place, so the backend holds two copies of it (a third would not fit an 8 GB
Jetson next to the cloud's replica of the model). One serves; the other is the *standby* and holds the
parameters that served before the last refit, which is what ``rollback`` returns to. A refit:

1. picks the standby and marks it ``refitting`` (under the backend's swap lock, so a rollback cannot make it the
   serving slot meanwhile): from now on it refuses new requests (a request that read the old state retries on the
   serving slot) and rollback is refused;
2. waits until requests already running on it have finished;
3. refits it. On success it holds the new parameters and the base class swaps it in. On failure (a refit can
   fail half way, e.g. some weights rejected) it is refitted back to the parameters it held; if even that fails
   it stays ``invalid``: it never serves and ``rollback`` says there is nothing to roll back to. The next
   successful refit of that slot makes it valid again.

Slot states: ``ready`` (holds ``tensors`` exactly) -> ``refitting`` -> ``ready`` | ``invalid``.

A local refit of the edge's own statistics (``refit_local``) writes both parameter sets, serving and previous,
since the edge owns the statistics and a rollback concerns the cloud's parameters (see
:meth:`DoubleBufferedBackend.refit_local`).

Runs on a given slot (``infer_previous``, the warm-up of a refitted slot) run on *that* slot, never on the serving
one; a slot that is being refitted or is invalid answers None there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CemaError, RefitError
from cema_deploy.runtime.backends.base import Backend, EngineState, RefitReport, merge_local

log = logging.getLogger("cema_deploy.edge")

READY, REFITTING, INVALID = "ready", "refitting", "invalid"


class SlotEngine(Protocol):
    """What a slot needs from an engine: run a batch, take new refittable tensors in place, release."""

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


class Slot:
    """One engine, the tensors it holds, its state and a count of requests running on it."""

    def __init__(
        self, engine: SlotEngine, tensors: Mapping[str, np.ndarray], index: int, *, serial: bool = True
    ) -> None:
        self.engine = engine
        self.tensors = tensors
        self.index = index
        self.state = READY
        self.in_flight = 0
        self._cond = threading.Condition()
        self._before = READY
        # serial: one execution context runs one request at a time (TensorRT); an ORT session runs many at once
        self._run_lock: threading.Lock | None = threading.Lock() if serial else None

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
        """Run on an acquired slot (see :meth:`SlotPair.run_current`)."""
        if self._run_lock is None:
            return self.engine.run(x)
        with self._run_lock:
            return self.engine.run(x)

    def begin_refit(self, timeout: float) -> None:
        """Refuse new requests, then wait for those running; on time-out the slot is ready again, unchanged."""
        self.claim()
        self.drain(timeout)

    def claim(self) -> None:
        """Refuse new requests from now on (returns at once; :meth:`drain` waits for those running)."""
        with self._cond:
            if self.state == REFITTING:
                raise RefitError(f"Slot {self.index} is already being refitted.")
            self._before, self.state = self.state, REFITTING

    def drain(self, timeout: float) -> None:
        """Wait until no request runs on this claimed slot; on time-out it is as before :meth:`claim`, unchanged."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_flight == 0, timeout=timeout):
                self.state = self._before
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


class SlotPair:
    """Two slots of one engine kind and the discipline of the module docstring, for any backend to delegate to.

    The backend keeps a slot as its ``EngineState.engine`` and calls: :meth:`claim_standby` under its swap lock,
    :meth:`refit` outside it, :meth:`run_current` to serve, :meth:`run_on` for a given slot, :meth:`resident`
    before a rollback.
    """

    def __init__(
        self,
        make: Callable[[Mapping[str, np.ndarray]], SlotEngine],
        tensors: Mapping[str, np.ndarray],
        *,
        serial: bool,
        count: int = 2,
    ) -> None:
        self.slots: list[Slot] = []
        try:
            for i in range(count):  # at start every slot holds the serving blob
                self.slots.append(Slot(make(tensors), tensors, i, serial=serial))
        except BaseException:
            self.close()
            raise

    def claim_standby(self, serving: Slot) -> Slot:
        """The slot that does not serve, claimed for a refit (call under the backend's swap lock)."""
        standby = self.slots[1] if serving is self.slots[0] else self.slots[0]
        standby.claim()
        return standby

    def refit(self, standby: Slot, tensors: Mapping[str, np.ndarray], drain_timeout_s: float) -> Slot:
        """Wait for ``standby``'s requests, write ``tensors`` into it, return it; on failure restore it and raise."""
        standby.drain(drain_timeout_s)
        held = standby.tensors
        try:
            standby.engine.refit(tensors)
        except BaseException as exc:
            standby.end_refit(_restore(standby, held))
            if isinstance(exc, CemaError):
                raise
            raise RefitError(f"Refitting the standby engine failed ({type(exc).__name__}: {exc}).") from exc
        standby.end_refit(tensors)
        return standby

    @staticmethod
    def run_on(slot: Slot, x: np.ndarray) -> np.ndarray | None:
        """Run on ``slot`` itself; None when it is being refitted or invalid."""
        if not slot.try_acquire():
            return None
        try:
            return slot.run(x)
        finally:
            slot.release()

    @staticmethod
    def run_current(read: Callable[[], tuple[Slot, int]], x: np.ndarray) -> tuple[np.ndarray, int]:
        """Run on the serving slot (``read()`` -> (slot, version)); if a swap made it the standby being refitted,
        read again: the swap that did it has published the new serving slot already."""
        for _ in range(1000):
            slot, version = read()
            if slot.try_acquire():
                try:
                    return slot.run(x), version
                finally:
                    slot.release()
        raise RefitError("No engine could take the request (both slots busy refitting); retry.")

    @staticmethod
    def resident(slot: Slot, tensors: Mapping[str, np.ndarray]) -> str | None:
        """None when ``slot`` holds ``tensors`` and may serve; otherwise why not (for the rollback's error)."""
        if slot.holds(tensors):
            return None
        if slot.state == REFITTING:
            return "a refit in progress is writing the engine that held the previous parameters"
        return (
            "the engine that held the previous parameters was left invalid by a failed refit (they could not be "
            "restored)"
        )

    @property
    def states(self) -> list[str]:
        return [s.state for s in self.slots]

    def close(self) -> None:
        slots, self.slots = self.slots, []
        for s in slots:
            s.engine.close()


def _local_report(version: int, t0: float, t1: float, t2: float, t3: float) -> RefitReport:
    return RefitReport(old_version=version, new_version=version, validate_s=t1 - t0, build_s=t2 - t1, warmup_s=t3 - t2)


def _restore(slot: Slot, held: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray] | None:
    """Refit ``slot`` back to ``held`` after a failed refit; None when that fails too (slot invalid)."""
    try:
        slot.engine.refit(held)
    except Exception:
        return None
    return held


def refit_local_in_slots(backend: Any, pair: SlotPair, tensors: Mapping[str, np.ndarray]) -> RefitReport:
    """The edge's own statistics into *both* parameter sets: the serving one and the previous one.

    The edge owns the running statistics and a rollback concerns the cloud's parameters, so the previous set
    (the rollback target) takes the new statistics too, and rollback stays possible after a local refit. With
    two slots that takes two refits: the standby (it held the previous set) is refitted with the serving
    parameters and the new statistics and swapped in; then the slot that served until now is refitted with the
    previous parameters and the new statistics and becomes the rollback target. A rollback in between is
    refused as during any refit ("a refit in progress"). Without a previous set (no cloud blob since the start
    or since a rollback) the second refit is skipped. If the second refit fails, the new statistics serve and
    the rollback target is dropped (logged): a rollback then says there is nothing to roll back to, never
    serves mixed or stale parameters. Raises :class:`~cema_deploy.exceptions.BlobError` or
    :class:`RefitError` when the first refit fails; the serving state is then unchanged.

    ``backend`` is a :class:`Backend` serving from ``pair`` (the TensorRT double buffer, ONNX Runtime's in-place
    path): its refit/swap locks, states, ``_warm_up`` and ``drain_timeout_s`` are used.
    """
    with backend._refit_lock:
        t0 = time.perf_counter()
        merge_local(backend._state.tensors, tensors)  # the checks, before a slot is claimed
        with backend._swap_lock:
            old, prev = backend._state, backend._previous
            standby = pair.claim_standby(old.engine)
        merged = merge_local(old.tensors, tensors)
        t1 = time.perf_counter()
        slot = pair.refit(standby, merged, backend.drain_timeout_s)
        t2 = time.perf_counter()
        backend._warm_up(slot)
        t3 = time.perf_counter()
        kept = None if prev is None else merge_local(prev.tensors, tensors)
        with backend._swap_lock:
            backend._state = EngineState(slot, old.version, merged, applied_at=old.applied_at, epoch=old.epoch)
            if prev is None or kept is None:
                return _local_report(old.version, t0, t1, t2, t3)
            backend._previous = EngineState(old.engine, prev.version, kept, applied_at=prev.applied_at,
                                            epoch=prev.epoch)  # fmt: skip
            old.engine.claim()  # rollback refuses it until it holds ``kept``
        try:
            pair.refit(old.engine, kept, backend.drain_timeout_s)
        except CemaError as exc:
            with backend._swap_lock:
                if backend._previous is not None and backend._previous.tensors is kept:
                    backend._previous = None
            log.warning("the edge's statistics serve, but the rollback target v%d was dropped: %s", prev.version,
                        exc)  # fmt: skip
        return _local_report(old.version, t0, t1, t2, time.perf_counter())


class DoubleBufferedBackend(Backend):
    """A :class:`Backend` over two refittable engines; subclasses say how to make one (``_new_engine``)."""

    #: Longest wait for requests running on the standby before a refit gives up (seconds).
    drain_timeout_s: float = 30.0

    def __init__(self, model_dir: str | os.PathLike[str], *, manifest: Manifest | None = None) -> None:
        self._pair: SlotPair | None = None
        super().__init__(model_dir, manifest=manifest)

    # ---- subclass hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _new_engine(self, tensors: Mapping[str, np.ndarray]) -> SlotEngine:
        """A new engine holding ``tensors`` (called twice, at start)."""

    # ---- Backend hooks --------------------------------------------------------------------------------
    @property
    def _slots(self) -> list[Slot]:
        return [] if self._pair is None else self._pair.slots

    def _build(self, tensors: Mapping[str, np.ndarray]) -> Slot:
        if self._pair is None:
            self._pair = SlotPair(self._new_engine, tensors, serial=True)
            return self._pair.slots[0]
        with self._swap_lock:
            standby = self._pair.claim_standby(self._state.engine)
        return self._pair.refit(standby, tensors, self.drain_timeout_s)

    def refit_local(self, tensors: Mapping[str, np.ndarray]) -> RefitReport:
        """The edge's own statistics into the serving and the previous parameter sets: :func:`refit_local_in_slots`."""
        assert self._pair is not None
        return refit_local_in_slots(self, self._pair, tensors)

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        out = SlotPair.run_on(engine, x)  # this slot, not the serving one (previous parameters, warm-up)
        if out is None:
            raise RefitError(f"Engine slot {engine.index} is {engine.state}: it cannot run a request now; retry.")
        return out

    def _resident(self, state: EngineState) -> str | None:
        return SlotPair.resident(state.engine, state.tensors)

    # ---- serving ----------------------------------------------------------------------------------------
    def infer(self, x: np.ndarray) -> np.ndarray:
        out, _ = self._run_on_current(x)
        return out

    def infer_versioned(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        return self._run_on_current(x)

    def infer_previous(self, x: np.ndarray) -> np.ndarray | None:
        prev = self._previous
        return None if prev is None else SlotPair.run_on(prev.engine, x)

    def _run_on_current(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        def read() -> tuple[Slot, int]:
            state = self._state
            return state.engine, state.version

        return SlotPair.run_current(read, x)

    @property
    def refit_path(self) -> str:
        """ "inplace": refits write the idle one of two engines, then swap (the module docstring)."""
        return "inplace"

    @property
    def slot_states(self) -> list[str]:
        """State of each slot (``ready``, ``refitting``, ``invalid``), for reports and tests."""
        return [] if self._pair is None else self._pair.states

    def close(self) -> None:
        super().close()
        if self._pair is not None:
            self._pair.close()
