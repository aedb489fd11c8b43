"""The backend interface: run a batch, apply a refit blob atomically, report and roll back the version.

A backend holds one immutable *engine state* (an engine/session plus the parameters it was built with and
their version). ``infer`` reads the current state once and runs on it, so a request that started before a
swap finishes on the old parameters. ``refit`` validates the blob against the manifest, builds a new engine
off the serving path (on the calling thread; :class:`~cema_deploy.runtime.updates.scheduler.RefitScheduler` or
``refit_async`` build on a worker), runs one warm-up inference on it at the shape last served, and replaces
the state reference in one assignment. A blob that fails validation, building or the warm-up raises and
changes nothing.

Resident engines: the serving state and the previous one (for ``rollback`` and ``infer_previous``), plus
the one being built during a refit. An engine that leaves the backend is freed once the requests running on
it return. Backends that write new parameters into an existing engine instead (TensorRT, ONNX Runtime's
in-place path) keep two engines and write the one that does not serve (``trt_slots.SlotPair``).

Two locks: refits are serialised by one, held across validation, the build and the warm-up; the *swap* lock
is held only to read or replace the serving and previous states, so ``rollback`` and the readers of those
states never wait behind an engine build or a numpy recompute.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_path, validate_blob
from cema_deploy.contract.manifest import Manifest, manifest_from_dir
from cema_deploy.exceptions import BlobError, CemaError, RefitError, StaleBlobError


@dataclass(frozen=True)
class EngineState:
    """One set of parameters built into an engine. Never mutated; replaced whole."""

    engine: Any
    version: int
    tensors: Mapping[str, np.ndarray]
    applied_at: float = field(default_factory=time.time)
    epoch: int = 0  # the cloud state that minted ``version`` (RefitBlob.epoch)


@dataclass(frozen=True, kw_only=True)
class RefitReport:
    """What a refit did: versions and how long validation and the build took (seconds)."""

    old_version: int
    new_version: int
    validate_s: float
    build_s: float
    warmup_s: float = 0.0  # the warm-up inference at the serving shape, after the build, before the swap


class Backend(ABC):
    """Base of every inference backend. Subclasses implement ``_build`` and ``_run`` only."""

    name: str = "backend"
    #: Run one inference on a freshly built engine before it serves (off for engines refitted in place, which
    #: served before and keep their warm state).
    refit_warm_up: bool = True

    def __init__(self, model_dir: str | os.PathLike[str], *, manifest: Manifest | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest or manifest_from_dir(self.model_dir)
        self._refit_lock = threading.Lock()  # serialises refits (held across a build)
        self._swap_lock = threading.Lock()  # guards _state/_previous swaps only (never held across a build)
        self._executor: ThreadPoolExecutor | None = None
        blob = blob_from_path(self.model_dir / self.manifest.params_file)
        validate_blob(blob, self.manifest)
        self._prepare(blob.tensors)
        self._state = EngineState(self._build(blob.tensors), blob.version, blob.tensors, epoch=blob.epoch)
        self._previous: EngineState | None = None
        self._serving_shape: tuple[int, ...] = (1, *self.manifest.input.shape[1:])

    # ---- subclass hooks -------------------------------------------------------------------------------
    def _prepare(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Once, before the first build: work every later build can reuse (default: none)."""
        return None

    def build_plain(self, tensors: Mapping[str, np.ndarray]) -> Any:
        """An engine built as a fresh deployment builds it, without what ``_prepare`` made (for benchmarks)."""
        return self._build(tensors)

    @abstractmethod
    def _build(self, tensors: Mapping[str, np.ndarray]) -> Any:
        """Build an engine whose refittable tensors hold ``tensors``. Must not touch the serving state."""

    def _resident(self, state: EngineState) -> str | None:
        """None when ``state``'s engine still holds its parameters and may serve again; otherwise why not."""
        return None

    @abstractmethod
    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        """Run one batch on ``engine``; returns logits [N, C]."""

    # ---- public API -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Version of the parameters serving now (0 = the export's own)."""
        return self._state.version

    @property
    def stamp(self) -> tuple[int, int]:
        """``(epoch, version)`` of the parameters serving now: how the edge orders versions."""
        state = self._state
        return state.epoch, state.version

    @property
    def providers(self) -> list[str]:
        return [self.name]

    @property
    def refit_path(self) -> str:
        """How refits reach the engine: "build" (a new engine per refit) unless a backend says otherwise."""
        return "build"

    @property
    def previous_version(self) -> int | None:
        """Version of the parameters that served before the last refit (still resident), None when none."""
        prev = self._previous
        return None if prev is None else prev.version

    @property
    def serving_shape(self) -> tuple[int, ...]:
        """The batch shape served last: the shape the next refit's warm-up inference runs at."""
        return self._serving_shape

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for one NCHW float32 batch, computed entirely with one version's parameters."""
        state = self._state  # one read: a concurrent swap cannot mix versions within this call
        self._serving_shape = x.shape
        return self._run(state.engine, x)

    def infer_versioned(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Like :meth:`infer`, also returning the parameter version that produced the logits."""
        state = self._state
        self._serving_shape = x.shape
        return self._run(state.engine, x), state.version

    def infer_previous(self, x: np.ndarray) -> np.ndarray | None:
        """Logits of the parameters that served before the last refit (:attr:`previous_version`), or None.

        For comparing old and new parameters on the same inputs off the serving path (e.g. a rollback
        check); it does not change the serving shape the next refit warms up at.
        """
        prev = self._previous
        return None if prev is None else self._run(prev.engine, x)

    def refit(self, blob: RefitBlob) -> RefitReport:
        """Validate ``blob``, build a new engine with it, then swap it in atomically.

        Raises a :class:`~cema_deploy.exceptions.BlobError` (bad blob) or :class:`RefitError` (build failed);
        either way the old parameters keep serving.
        """
        with self._refit_lock:  # refits are serialised; inference and rollback are not blocked
            t0 = time.perf_counter()
            old = self._state
            if blob.stamp <= (old.epoch, old.version):  # (epoch, version), lexicographically
                raise StaleBlobError(
                    f"Blob (epoch {blob.epoch}, v{blob.version}) is not newer than the serving (epoch {old.epoch}, "
                    f"v{old.version}); refusing a replay."
                )
            validate_blob(blob, self.manifest)
            t1 = time.perf_counter()
            engine = self._build_checked(blob.tensors)
            t2 = time.perf_counter()
            if self.refit_warm_up:
                self._warm_up(engine)
            t3 = time.perf_counter()
            with self._swap_lock:
                old = self._state  # read again: a rollback may have swapped meanwhile
                self._previous = old  # the state before it (if any) leaves: at most two engines stay resident
                self._state = EngineState(engine, blob.version, blob.tensors, epoch=blob.epoch)
            return RefitReport(
                old_version=old.version,
                new_version=blob.version,
                validate_s=t1 - t0,
                build_s=t2 - t1,
                warmup_s=t3 - t2,
            )

    def refit_local(self, tensors: Mapping[str, np.ndarray]) -> RefitReport:
        """Replace some serving tensors (the edge's own BatchNorm statistics) under the *same* version.

        The new values are merged into the tensors serving now (under the refit lock, so a cloud refit in between
        keeps its other parameters), checked (known names, same shapes, finite, variances >= 0), built, warmed up
        and swapped in atomically as :meth:`refit` does. :attr:`previous_version` is kept: a rollback still
        returns to the parameters before the last cloud blob. Raises a :class:`BlobError` or :class:`RefitError`;
        the serving state is then unchanged.
        """
        with self._refit_lock:
            old = self._state
            t0 = time.perf_counter()
            for name, value in tensors.items():
                ref = old.tensors.get(name)
                if ref is None or value.shape != ref.shape or not np.isfinite(value).all():
                    raise BlobError(
                        f"Local tensor {name!r} {getattr(value, 'shape', None)} does not fit the serving parameters "
                        f"({None if ref is None else ref.shape}) or is not finite; nothing was refitted."
                    )
                if name.endswith("running_var") and (value < 0).any():
                    raise BlobError(f"Local running variance {name!r} has negative values; nothing was refitted.")
            merged = {**old.tensors, **{n: np.asarray(v, old.tensors[n].dtype) for n, v in tensors.items()}}
            t1 = time.perf_counter()
            engine = self._build_checked(merged)
            t2 = time.perf_counter()
            self._warm_up(engine)
            t3 = time.perf_counter()
            with self._swap_lock:
                if self._state is not old:  # a rollback landed meanwhile: swapping now would undo it
                    raise RefitError("A rollback landed while the edge's statistics were refitted; nothing was "
                                     "swapped. The next batch refits them into what serves now.")  # fmt: skip
                self._state = EngineState(engine, old.version, merged, applied_at=old.applied_at, epoch=old.epoch)
            return RefitReport(old_version=old.version, new_version=old.version, validate_s=t1 - t0,
                               build_s=t2 - t1, warmup_s=t3 - t2)  # fmt: skip

    def refit_async(self, blob: RefitBlob) -> Future[RefitReport]:
        """:meth:`refit` on a background worker; the future raises what ``refit`` would."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-refit")
        return self._executor.submit(self.refit, blob)

    def rollback(self, *, only_if_serving: int | None = None) -> int:
        """Restore the parameters that served before the last refit; returns the version now serving.

        ``only_if_serving``: roll back only while that version serves (checked atomically with the swap, so a
        refit that lands meanwhile is never undone in its place); otherwise raise :class:`RefitError`.
        """
        with self._swap_lock:  # not the refit lock: a rollback never waits behind a build
            if only_if_serving is not None and self._state.version != only_if_serving:
                raise RefitError(
                    f"Not rolled back: v{only_if_serving} no longer serves (v{self._state.version} does); "
                    "nothing was changed."
                )
            prev = self._previous
            if prev is None:
                raise RefitError("Nothing to roll back to: no refit has been applied since the backend started.")
            why = self._resident(prev)
            if why is not None:  # previous stays: a failed refit in progress restores its engine
                raise RefitError(f"Nothing to roll back to: {why}. The current parameters keep serving.")
            self._state, self._previous = prev, None
            return self._state.version

    @property
    def tensors(self) -> Mapping[str, np.ndarray]:
        """The refittable tensors serving now."""
        return self._state.tensors

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------------------
    def _warm_up(self, engine: Any) -> None:
        """One inference at the shape served last, so the first request on ``engine`` is not its cold start."""
        x = np.zeros(self._serving_shape, np.float32)
        try:
            self._run(engine, x)
        except Exception as exc:
            raise RefitError(
                f"The new {self.name} engine failed its warm-up inference at shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {exc}); the previous parameters keep serving."
            ) from exc

    def _build_checked(self, tensors: Mapping[str, np.ndarray]) -> Any:
        try:
            return self._build(tensors)
        except BlobError:
            raise
        except CemaError as exc:
            raise RefitError(f"Building the engine with new parameters failed: {exc}") from exc
        except Exception as exc:
            raise RefitError(
                f"Building the {self.name} engine with new parameters failed ({type(exc).__name__}: {exc}); "
                "the previous parameters keep serving."
            ) from exc
