"""ONNX Runtime's hybrid in-place refit: a refit lands on an unfused engine in a few milliseconds, and the fused
engine with the same parameters replaces it once refits pause.

Two pairs of :class:`~cema_deploy.runtime.backends.onnxrt_inplace.InplaceEngine`: *fused* (the prepared graph, as
the ``inplace`` path) and *unfused* (the graph ORT makes with ``ConvBNFusion`` disabled, where each BatchNormalization
is a per-channel scale and shift: ResNet-50's refit writes 212 KB instead of 94 MB). A refit writes an engine that
neither serves nor holds the previous parameters, preferring an unfused one, and swaps it in. A promoter thread
waits until no swap happened for ``quiet_s``, then writes the serving parameters into a fused engine that is
neither serving nor previous, and swaps it in (same version: only the speed changes). There are three unfused
engines (their arrays are a few hundred KB; they share the unfused graph's constants) and two fused ones: one
engine serves and one holds the previous parameters, so an unfused one is always free for a refit and a fused
one for a promotion (a refit falls back to writing a fused engine only if no unfused one is ready).

The promoter never takes the refit lock: it claims its fused engine under the swap lock (a refit then picks
another), and only swaps if the state it promoted still serves; if a refit landed meanwhile and made that state
the previous one, the previous parameters move to the fused engine, which frees the unfused one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cema_deploy.runtime.backends.base import EngineState
from cema_deploy.runtime.backends.trt_slots import REFITTING, Slot, SlotPair


class HybridSlots:
    """The fused pair, the unfused engines and the rules that pick one to write (under the backend's swap lock)."""

    def __init__(self, fused: SlotPair, unfused: SlotPair) -> None:
        self.fused, self.unfused = fused, unfused

    def is_unfused(self, slot: Slot) -> bool:
        return any(slot is s for s in self.unfused.slots)

    def pair_of(self, slot: Slot) -> SlotPair:
        return self.unfused if self.is_unfused(slot) else self.fused

    def claim_for_refit(self, serving: Slot, previous: Slot | None) -> Slot:
        """A ready engine that neither serves nor holds ``previous``, unfused first; claimed."""
        for slot in (*self.unfused.slots, *self.fused.slots):
            if slot is not serving and slot is not previous and slot.state != REFITTING:
                slot.claim()
                return slot
        raise AssertionError("four engines, one serving, one previous, at most one promoting: one is free")

    def claim_for_promotion(self, serving: Slot, previous: Slot | None) -> Slot | None:
        for slot in self.fused.slots:
            if slot is not serving and slot is not previous and slot.state != REFITTING:
                slot.claim()
                return slot
        return None

    def close(self) -> None:
        self.fused.close()
        self.unfused.close()


class Promoter:
    """The thread that replaces an unfused serving engine by a fused one once refits pause for ``quiet_s``.

    ``lock`` is the backend's swap lock; ``get()`` reads (serving state, previous state) and ``put(serving,
    previous)`` replaces them, both called under it.
    """

    def __init__(
        self,
        slots: HybridSlots,
        lock: threading.Lock,
        get: Callable[[], tuple[EngineState, EngineState | None]],
        put: Callable[[EngineState, EngineState | None], None],
        *,
        quiet_s: float,
        drain_timeout_s: float,
    ) -> None:
        self.slots, self._lock, self._get, self._put = slots, lock, get, put
        self.quiet_s, self.drain_timeout_s = quiet_s, drain_timeout_s
        self.promotions = 0
        #: perf_counter() when a fused engine last began serving (after a promotion or a fused refit).
        self.full_speed_at = time.perf_counter()
        self._cond = threading.Condition()
        self._last_swap = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cema-promote", daemon=True)
        self._thread.start()

    def swapped(self, fused: bool) -> None:
        """Call after every swap (refit or rollback); ``fused``: the engine now serving is fused."""
        with self._cond:
            self._last_swap = time.monotonic()
            if fused:
                self.full_speed_at = time.perf_counter()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _due(self) -> bool:
        """Wait until the serving engine is unfused and no swap happened for ``quiet_s``; False once closed."""
        with self._cond:
            while not self._closed:
                state, _ = self._get()
                if not self.slots.is_unfused(state.engine):
                    self._cond.wait()
                    continue
                wait = self._last_swap + self.quiet_s - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                return True
            return False

    def _loop(self) -> None:
        while self._due():
            with self._lock:
                state, previous = self._get()
                if not self.slots.is_unfused(state.engine):
                    continue
                target = self.slots.claim_for_promotion(state.engine, None if previous is None else previous.engine)
            if target is None:  # cannot happen with two fused engines and one previous; never spin on it
                with self._cond:
                    self._last_swap = time.monotonic()
                continue
            try:
                self.slots.fused.refit(target, state.tensors, self.drain_timeout_s)
            except Exception:  # the fused engine was restored (or left invalid); unfused keeps serving
                with self._cond:
                    self._last_swap = time.monotonic()
                continue
            with self._lock:
                now, prev = self._get()
                fused = EngineState(target, state.version, state.tensors, state.applied_at, epoch=state.epoch)
                if now is state:
                    with self._cond:  # before the swap: whoever sees a fused engine serving sees this time
                        self.promotions += 1
                        self.full_speed_at = time.perf_counter()
                    self._put(fused, prev)
                elif prev is state:  # a refit landed meanwhile: keep the previous parameters on the fused engine
                    self._put(now, fused)
