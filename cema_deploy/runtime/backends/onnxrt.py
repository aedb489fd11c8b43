"""ONNX Runtime: a session loader that applies refit tensors at full speed, and the ONNX Runtime backend.

Why a new session per refit: ORT fuses Conv+BatchNormalization only when the BN inputs are constant
initializers, and ``SessionOptions.add_initializer`` is silently ignored for fused BN parameters. A refit
therefore builds a *new* session, off the serving path, and swaps it in atomically (FACTS.md, "ONNX Runtime").
Three refit paths:

- ``hybrid`` (CPU provider, the default for BatchNorm models where its self-tests pass): as ``inplace``, plus
  two sessions on the graph ORT makes without Conv+BN fusion, which take a refit in a few milliseconds; the
  fused sessions catch up once refits pause (:mod:`cema_deploy.runtime.backends.onnxrt_hybrid`).
- ``inplace`` (CPU provider, the default where its start-up self-test passes and ``hybrid`` does not apply): two
  sessions on the prepared graph below, a refit writes the new fused arrays into the idle one and swaps
  (:mod:`cema_deploy.runtime.backends.onnxrt_inplace`): no session is built at all.

- ``prepared`` (CPU provider, the fallback when the self-test fails): ORT's optimised graph is saved once per backend
  and each refit computes the fused, re-laid-out initializers in numpy and builds a session on that graph
  with optimisations off (:mod:`cema_deploy.runtime.backends.onnxrt_prepared`): ResNet-50 spends ~35 ms of CPU on it
  instead of ~170 ms, and the session computes bit for bit what ORT's own fusion gives.
- ``plain``: the model file with the new values handed over through
  ``SessionOptions.add_external_initializers``, fully optimised again at every refit.

Lifetime rule (ORT keeps a pointer, only a C++ comment says so): the arrays handed to a session as
initializers must outlive it and, with ``add_initializer``, are read in place, so they are never written
after the session is made, except by the in-place path while no run reads them. :class:`OrtSession` (and
``InplaceEngine``) own them for exactly as long as they own the session.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.blob import RefitBlob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import BackendError, BackendUnavailableError, RefitError
from cema_deploy.runtime.backends.base import Backend, EngineState, RefitReport
from cema_deploy.runtime.backends.onnxrt_hybrid import HybridSlots, Promoter
from cema_deploy.runtime.backends.onnxrt_inplace import InplaceEngine, pair_from_prepared, self_test
from cema_deploy.runtime.backends.onnxrt_prepared import PreparedGraph, PreparedGraphError, prepared_from_onnx
from cema_deploy.runtime.backends.trt_slots import Slot, SlotPair, refit_local_in_slots

log = logging.getLogger(__name__)

#: How refits reach the engine (see the module docstring); "auto" = hybrid, else inplace where their self-tests
#: pass, else prepared where it applies, else plain.
REFIT_PATHS = ("auto", "hybrid", "inplace", "prepared", "plain")
#: Hybrid path: seconds without a swap before the fused engine replaces an unfused one.
PROMOTE_QUIET_S = 0.25

#: Provider names by backend alias.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


class OrtSession:
    """An ``onnxruntime.InferenceSession`` plus the arrays it borrows (kept alive as long as the session).

    ``recycle`` (prepared sessions) is called once this object is gone *and* it held the only reference to
    the ORT session, so no request can be running on it: the borrowed arrays may then be written again.
    """

    def __init__(
        self,
        session: Any,
        held: list[Any],
        input_name: str,
        output_name: str,
        recycle: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self._held = held
        self.input_name = input_name
        self.output_name = output_name
        self._recycle = recycle

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out)

    def __del__(self) -> None:
        recycle, self._recycle = self._recycle, None
        if recycle is None:
            return
        session, self.session = self.session, None
        if sys.getrefcount(session) > 2:  # someone else still holds the ORT session: leave its arrays alone
            return
        del session  # the ORT session is destroyed here, before its arrays are handed back
        try:
            recycle()
        except Exception:  # never raise from a finalizer; the arrays are simply freed
            log.debug("recycling a session's arrays failed", exc_info=True)


def session_from_onnx(
    path: str | os.PathLike[str],
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
    provider_options: Sequence[dict[str, Any]] | None = None,
    allow_spinning: bool = False,
) -> OrtSession:
    """Build an ORT session for ``path`` whose initializers named in ``tensors`` take those values.

    Graph optimisations stay fully on, so Conv+BN fusion uses the new values. Raises
    :class:`BackendUnavailableError` when the first requested provider is not the one ORT actually uses
    (ORT silently falls back to CPU otherwise).

    Example:
        >>> sess = session_from_onnx("out/r50/model.onnx", tensors=blob.tensors)  # doctest: +SKIP
        >>> sess.run(x).shape  # doctest: +SKIP
    """
    ort = lazy_import("onnxruntime", extra="edge", purpose="the ONNX Runtime backend")
    available = set(ort.get_available_providers())
    if providers[0] not in available:
        extra = "gpu" if providers[0] != "CPUExecutionProvider" else "edge"
        raise BackendUnavailableError(
            f"ONNX Runtime provider {providers[0]} is not available here (available: {sorted(available)}). "
            f"Install the '{extra}' extra (pip install 'cema-deploy[{extra}]') on a machine with that device."
        )
    so = session_options(intra_op_threads, allow_spinning=allow_spinning)
    held: list[Any] = []
    if tensors:
        names = sorted(tensors)
        arrays = [np.ascontiguousarray(tensors[n]) for n in names]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        held = [*arrays, *values]
        so.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(
            str(path), sess_options=so, providers=list(providers), provider_options=provider_options
        )
    except Exception as exc:
        raise BackendError(f"ONNX Runtime could not load {path}: {exc}") from exc
    if session.get_providers()[0] != providers[0]:
        raise BackendUnavailableError(
            f"ONNX Runtime fell back to {session.get_providers()[0]} although {providers[0]} was requested; "
            "check the CUDA/TensorRT installation (see `cema-deploy bench --help`)."
        )
    return OrtSession(session, held, session.get_inputs()[0].name, session.get_outputs()[0].name)


def session_options(intra_op_threads: int | None = None, *, allow_spinning: bool = False) -> Any:
    """The ``SessionOptions`` every session of this module starts from (full optimisation, quiet, threads).

    Intra-op threads do not spin-wait between operators unless ``allow_spinning``: on an edge CPU that
    also runs a refit, the uplink and preprocessing, a spinning pool thread takes the core the work needs
    (ResNet-50 on 2 busy cores, measured: a refit's build 110 -> 40 ms, its warm-up 215 -> 65 ms, and the
    serving latency itself lower; ORT's default is to spin).
    """
    ort = lazy_import("onnxruntime", extra="edge", purpose="the ONNX Runtime backend")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return so


class OnnxrtBackend(Backend):
    """ONNX Runtime backend (CPU, CUDA or TensorRT execution provider) with atomic hot refit.

    Example:
        >>> with OnnxrtBackend("out/r50", provider="ort-cpu") as be:  # doctest: +SKIP
        ...     logits = be.infer(x)
        ...     be.refit(blob)
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        provider: str = "ort-cpu",
        manifest: Manifest | None = None,
        intra_op_threads: int | None = None,
        refit_path: str = "auto",
        allow_spinning: bool = False,
    ) -> None:
        if provider not in PROVIDERS:
            raise BackendUnavailableError(
                f"Unknown ONNX Runtime backend {provider!r}; expected one of {list(PROVIDERS)}."
            )
        if refit_path not in REFIT_PATHS:
            raise BackendError(f"Unknown refit path {refit_path!r}; expected one of {list(REFIT_PATHS)}.")
        self.name = provider
        self._providers = PROVIDERS[provider]
        self._threads = intra_op_threads
        self._options = partial(session_options, intra_op_threads, allow_spinning=allow_spinning)
        self.allow_spinning = allow_spinning
        self._requested_path = refit_path
        self._prepared: PreparedGraph | None = None
        self._pair: SlotPair | None = None
        self._unfused: PreparedGraph | None = None
        self._hybrid: HybridSlots | None = None
        self._promoter: Promoter | None = None
        #: Why the prepared refit path is not used (None when it is, or was not asked for).
        self.prepare_error: str | None = None
        #: Why the in-place refit path is not used (None when it is, or was not asked for).
        self.inplace_error: str | None = None
        super().__init__(model_dir, manifest=manifest)
        if self._hybrid is not None:
            self._promoter = Promoter(
                self._hybrid,
                self._swap_lock,
                lambda: (self._state, self._previous),
                self._put,
                quiet_s=PROMOTE_QUIET_S,
                drain_timeout_s=self.drain_timeout_s,
            )

    def _put(self, state: EngineState, previous: EngineState | None) -> None:
        self._state, self._previous = state, previous

    @property
    def refit_path(self) -> str:
        """How refits reach the engine here: "hybrid", "inplace", "prepared" or "plain"."""
        if self._hybrid is not None:
            return "hybrid"
        if self._pair is not None:
            return "inplace"
        return "prepared" if self._prepared is not None else "plain"

    @property
    def engine_bytes(self) -> int:
        """Bytes of refit-dependent arrays the in-place engines own (both together; 0 on the other paths)."""
        pairs = [p for p in (self._pair, None if self._hybrid is None else self._hybrid.unfused) if p is not None]
        return sum(cast(InplaceEngine, s.engine).nbytes for p in pairs for s in p.slots)

    @property
    def serving_fused(self) -> bool:
        """False while the hybrid path serves an unfused engine (fused parameters, slower kernels)."""
        return self._hybrid is None or not self._hybrid.is_unfused(self._state.engine)

    @property
    def full_speed_at(self) -> float | None:
        """``time.perf_counter()`` when a fused engine last began serving (hybrid path only, else None)."""
        return None if self._promoter is None else self._promoter.full_speed_at

    def _prepare(self, tensors: Mapping[str, np.ndarray]) -> None:
        if self._requested_path == "plain":
            return
        if self._providers[0] != "CPUExecutionProvider":
            self.prepare_error = f"the prepared graph is made for ORT's CPU provider, not {self._providers[0]}"
        else:
            try:
                self._prepared = prepared_from_onnx(
                    self.model_dir / self.manifest.model_file,
                    tensors,
                    self._options,
                    input_shape=tuple(self.manifest.input.shape),
                )
            except (PreparedGraphError, OSError) as exc:
                self.prepare_error = str(exc)
            except Exception as exc:  # an ORT failure on the way: the plain path still works
                self.prepare_error = f"{type(exc).__name__}: {exc}"
        if self.prepare_error is not None:
            if self._requested_path in ("prepared", "inplace", "hybrid"):
                raise BackendError(
                    f"The {self._requested_path} refit path is not available for {self.model_dir}: {self.prepare_error}"
                )
            log.info("refits of %s build plain sessions: %s", self.model_dir, self.prepare_error)
            return
        if self._requested_path in ("auto", "inplace", "hybrid"):
            self._prepare_inplace(tensors)

    def _prepare_inplace(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Two in-place engines, kept when the self-test passes; otherwise one log line and the prepared path."""
        assert self._prepared is not None
        x = np.random.default_rng(1).standard_normal((1, *self.manifest.input.shape[1:])).astype(np.float32)
        pair: SlotPair | None = None
        try:
            pair = pair_from_prepared(self._prepared, tensors, self._options)
            self.inplace_error = self_test(pair, tensors, lambda t: self.build_plain(t).run, x)
        except Exception as exc:  # an ORT failure on the way: the prepared path still works
            self.inplace_error = f"{type(exc).__name__}: {exc}"
        if self.inplace_error is None:
            self._pair = pair
            self.refit_warm_up = False  # both sessions ran already; a refit changes values, not shapes
            if self._requested_path in ("auto", "hybrid"):
                self._prepare_hybrid(tensors, x)
            return
        if pair is not None:
            pair.close()
        if self._requested_path in ("inplace", "hybrid"):
            raise BackendError(f"The inplace refit path failed its self-test on {self.model_dir}: {self.inplace_error}")
        log.warning("refits of %s build a session each (prepared path): in-place self-test: %s", self.model_dir,
                    self.inplace_error)  # fmt: skip

    def _prepare_hybrid(self, tensors: Mapping[str, np.ndarray], x: np.ndarray) -> None:
        """Three unfused in-place engines next to the fused pair, kept when their self-test passes."""
        assert self._prepared is not None and self._pair is not None
        why: str | None = None
        if self._prepared.fused_layers == 0:
            why = "no Conv+BatchNormalization pair is fused in this model"
        else:
            pair: SlotPair | None = None
            try:
                shape = tuple(self.manifest.input.shape)
                self._unfused = prepared_from_onnx(
                    self.model_dir / self.manifest.model_file, tensors, self._options, input_shape=shape, fuse=False
                )
                pair = pair_from_prepared(self._unfused, tensors, self._options, count=3)
                why = self_test(pair, tensors, lambda t: self.build_plain(t).run, x)
            except Exception as exc:  # the fused in-place path still works
                why = f"{type(exc).__name__}: {exc}"
            if why is None and pair is not None:
                self._hybrid = HybridSlots(self._pair, pair)
                return
            if pair is not None:
                pair.close()
            if self._unfused is not None:
                self._unfused.close()
                self._unfused = None
        if self._requested_path == "hybrid":
            raise BackendError(f"The hybrid refit path is not available for {self.model_dir}: {why}")
        log.info("refits of %s are written in place into fused engines only (no hybrid): %s", self.model_dir, why)

    def refit(self, blob: RefitBlob) -> RefitReport:
        report = super().refit(blob)
        if self._promoter is not None:
            self._promoter.swapped(self.serving_fused)
        return report

    def refit_local(self, tensors: Mapping[str, np.ndarray]) -> RefitReport:
        """On the in-place path (two slots) the edge's statistics go into the serving and the previous slot, as on
        TensorRT's double buffer, so a cloud blob's rollback stays possible after a local refit; elsewhere (hybrid,
        prepared, plain: separate engines) :meth:`Backend.refit_local`."""
        if self._pair is not None and self._hybrid is None and getattr(self, "_state", None) is not None:
            return refit_local_in_slots(self, self._pair, tensors)
        return super().refit_local(tensors)

    def rollback(self, *, only_if_serving: int | None = None) -> int:
        version = super().rollback(only_if_serving=only_if_serving)
        if self._promoter is not None:
            self._promoter.swapped(self.serving_fused)
        return version

    def _build(self, tensors: Mapping[str, np.ndarray]) -> OrtSession | Slot:
        if self._hybrid is not None and getattr(self, "_state", None) is not None:
            with self._swap_lock:
                prev = self._previous
                target = self._hybrid.claim_for_refit(self._state.engine, None if prev is None else prev.engine)
            return self._hybrid.pair_of(target).refit(target, tensors, self.drain_timeout_s)
        if self._pair is not None:
            if getattr(self, "_state", None) is None:  # at start: slot 0 serves
                return self._pair.slots[0]
            with self._swap_lock:
                standby = self._pair.claim_standby(self._state.engine)
            return self._pair.refit(standby, tensors, self.drain_timeout_s)
        if self._prepared is None:
            return self.build_plain(tensors)
        try:
            session, held, recycle = self._prepared.session(tensors, self._options)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not build the prepared graph of {self.model_dir}: {exc}") from exc
        return OrtSession(session, held, session.get_inputs()[0].name, session.get_outputs()[0].name, recycle)

    def build_plain(self, tensors: Mapping[str, np.ndarray]) -> OrtSession:
        return session_from_onnx(
            Path(self.model_dir) / self.manifest.model_file,
            tensors=tensors,
            providers=self._providers,
            intra_op_threads=self._threads,
            allow_spinning=self.allow_spinning,
            provider_options=self._provider_options(tensors),
        )

    def _provider_options(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]] | None:
        """Per-provider options for the session that will hold ``tensors`` (None: ORT's defaults).

        A hook for subclasses: ``runtime.ort_trt.OrtTrtBackend`` keys the TensorRT engine cache by the weights.
        """
        return None

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        if isinstance(engine, Slot):
            got = SlotPair.run_on(engine, x)  # this slot: the previous parameters, never the serving ones
            if got is None:
                raise RefitError(f"Engine slot {engine.index} is {engine.state}: it cannot run a request now; retry.")
            return got
        out: np.ndarray = engine.run(x)
        return out

    # ---- the in-place path serves through its slots -------------------------------------------------------
    #: Longest wait for requests running on the idle in-place engine before a refit gives up (seconds).
    drain_timeout_s: float = 30.0

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.infer_versioned(x)[0]

    def infer_versioned(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        if self._pair is None:
            return super().infer_versioned(x)
        self._serving_shape = x.shape

        def read() -> tuple[Slot, int]:
            state = self._state
            return state.engine, state.version

        return SlotPair.run_current(read, x)

    def infer_previous(self, x: np.ndarray) -> np.ndarray | None:
        prev = self._previous
        if prev is None or not isinstance(prev.engine, Slot):
            return super().infer_previous(x)
        return SlotPair.run_on(prev.engine, x)

    def _resident(self, state: EngineState) -> str | None:
        return SlotPair.resident(state.engine, state.tensors) if isinstance(state.engine, Slot) else None

    def close(self) -> None:
        if self._promoter is not None:
            self._promoter.close()
            self._promoter = None
        super().close()
        if self._hybrid is not None:
            self._hybrid.unfused.close()
        if self._unfused is not None:
            self._unfused.close()
            self._unfused = None
        if self._pair is not None:
            self._pair.close()
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None

    @property
    def providers(self) -> list[str]:
        engine: Any = self._state.engine
        if isinstance(engine, Slot):
            return list(cast(InplaceEngine, engine.engine).providers)
        return list(engine.providers)
