"""ONNX Runtime: a session loader that applies refit tensors at full speed, and the ONNX Runtime backend.

Why a new session per refit: ORT fuses Conv+BatchNormalization only when the BN inputs are constant
initializers, and ``SessionOptions.add_initializer`` is silently ignored for fused BN parameters. Handing the
new values to a *new* session through ``SessionOptions.add_external_initializers`` keeps full fusion; it takes
~0.4 s for ResNet-50 on CPU, so it happens off the serving path and the new session is swapped in atomically
(FACTS.md, "ONNX Runtime").

Lifetime rule (ORT keeps a pointer, only a C++ comment says so): the arrays handed to a session as external
initializers must outlive it. :class:`OrtSession` owns them for exactly as long as it owns the session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import BackendError, BackendUnavailableError
from cema_deploy.runtime.base import Backend

#: Provider names by backend alias.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


class OrtSession:
    """An ``onnxruntime.InferenceSession`` plus the arrays it borrows (kept alive as long as the session)."""

    def __init__(self, session: Any, held: list[Any], input_name: str, output_name: str) -> None:
        self.session = session
        self._held = held
        self.input_name = input_name
        self.output_name = output_name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out)


def session_from_onnx(
    path: str | os.PathLike[str],
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
    provider_options: Sequence[dict[str, Any]] | None = None,
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
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
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
    ) -> None:
        if provider not in PROVIDERS:
            raise BackendUnavailableError(
                f"Unknown ONNX Runtime backend {provider!r}; expected one of {list(PROVIDERS)}."
            )
        self.name = provider
        self._providers = PROVIDERS[provider]
        self._threads = intra_op_threads
        super().__init__(model_dir, manifest=manifest)

    def _build(self, tensors: Mapping[str, np.ndarray]) -> OrtSession:
        return session_from_onnx(
            Path(self.model_dir) / self.manifest.model_file,
            tensors=tensors,
            providers=self._providers,
            intra_op_threads=self._threads,
            provider_options=self._provider_options(tensors),
        )

    def _provider_options(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]] | None:
        """Per-provider options for the session that will hold ``tensors`` (None: ORT's defaults).

        A hook for subclasses: ``runtime.ort_trt.OrtTrtBackend`` keys the TensorRT engine cache by the weights.
        """
        return None

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = engine.run(x)
        return out

    @property
    def providers(self) -> list[str]:
        return list(self._state.engine.providers)
