"""Run the export's statistics probe (``stats_probe.onnx``): per-layer batch mean and variance, on any backend.

The graph and its sidecar are described in :mod:`cema_deploy.contract.stats_probe`. :class:`StatsProbe` is the
backend-agnostic part: it assembles the probe's inputs (the batch, the mix, and every BatchNorm layer's tensors: the
engine's serving tensors with the running statistics replaced by the prior the caller passes) and maps its outputs to
layers. A :class:`ProbeEngine` runs the graph: ONNX Runtime on the CPU (:class:`OrtProbeEngine`, every backend's
fallback), or the backend's own device when it offers one (``Backend.stats_probe_engine``: a second TensorRT engine
on the ``trt`` backend, ``runtime.backends.trt_probe``). The probe never touches the serving state: the layers'
tensors are inputs fed at every run, so it follows every refit of the serving engine without one of its own.
Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.stats_probe import ProbeSpec, probe_spec_from_dir
from cema_deploy.exceptions import BackendError

if TYPE_CHECKING:
    from cema_deploy.runtime.backends.base import Backend

__all__ = ["BatchStats", "OrtProbeEngine", "ProbeEngine", "StatsProbe", "probe_from_dir"]


@dataclass(frozen=True)
class BatchStats:
    """One probe run: per layer (by module name) the batch mean and biased variance ``[C]``, and the frame count."""

    mean: dict[str, np.ndarray]
    var: dict[str, np.ndarray]
    frames: int


class ProbeEngine(Protocol):
    """What runs the probe graph: float32 inputs by name in, the named outputs back in the order asked."""

    #: Where it runs, for reports: e.g. "onnxruntime-cpu", "tensorrt".
    kind: str

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class OrtProbeEngine:
    """An ONNX Runtime CPU session on the probe graph (the probe of every backend that has no engine of its own)."""

    kind = "onnxruntime-cpu"

    def __init__(self, model_dir: str | os.PathLike[str], spec: ProbeSpec, *, intra_op_threads: int | None = None):
        ort = lazy_import("onnxruntime", extra="edge", purpose="the statistics probe")
        from cema_deploy.runtime.backends.onnxrt import session_options

        path = Path(model_dir) / spec.model_file
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the statistics probe {path}: {exc}") from exc

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._session.run(list(outputs), dict(feed))]

    def close(self) -> None:
        return None


class StatsProbe:
    """The probe of one export on one :class:`ProbeEngine`.

    Example:
        >>> probe = probe_from_dir("out/r50", manifest, backend=backend)  # doctest: +SKIP
        >>> stats = probe.run(x, backend.tensors, mix=1.0)  # test-batch BN statistics  # doctest: +SKIP
    """

    def __init__(self, spec: ProbeSpec, engine: ProbeEngine) -> None:
        self.spec, self.engine = spec, engine
        self._outputs = [name for layer in spec.layers for name in (layer.batch_mean, layer.batch_var)]

    @property
    def layers(self) -> list[str]:
        return [layer.name for layer in self.spec.layers]

    @property
    def kind(self) -> str:
        """Where the probe runs ("onnxruntime-cpu", "tensorrt", ...)."""
        return self.engine.kind

    def run(
        self,
        x: np.ndarray,
        tensors: Mapping[str, np.ndarray],
        *,
        mix: float,
        prior: Mapping[str, np.ndarray] | None = None,
    ) -> BatchStats:
        """Batch statistics of every BN layer's input for the NCHW float32 batch ``x``.

        ``tensors``: the serving refittable tensors (weights, biases, running statistics, by name); ``prior``
        overrides some of them (the running means/variances the layers mix with); ``mix`` in [0, 1] is the share of
        the batch statistics in what each layer normalizes with inside the probe.
        """
        feed: dict[str, np.ndarray] = {
            self.spec.input_name: np.ascontiguousarray(x, np.float32),
            self.spec.mix_input: np.array(mix, np.float32),
        }
        for name in self.spec.feeds:
            value = prior[name] if prior is not None and name in prior else tensors[name]
            feed[name] = np.ascontiguousarray(value, np.float32)
        try:
            out = self.engine.run(feed, self._outputs)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"The statistics probe ({self.kind}) failed on a batch of shape {list(x.shape)}: {exc}"
            ) from exc
        means = {layer.name: out[2 * i] for i, layer in enumerate(self.spec.layers)}
        variances = {layer.name: out[2 * i + 1] for i, layer in enumerate(self.spec.layers)}
        return BatchStats(mean=means, var=variances, frames=int(x.shape[0]))

    def close(self) -> None:
        self.engine.close()


def probe_from_dir(
    model_dir: str | os.PathLike[str], manifest: Manifest, *, backend: Backend | None = None
) -> StatsProbe | None:
    """The export's statistics probe, or None when it has none (a model without BatchNorm running statistics).

    It runs on ``backend``'s own probe engine when the backend offers one (``trt``: a second TensorRT engine),
    otherwise on ONNX Runtime's CPU provider.
    """
    spec = probe_spec_from_dir(model_dir, manifest.fingerprint)
    if spec is None:
        return None
    engine = None if backend is None else backend.stats_probe_engine(spec)
    return StatsProbe(spec, engine if engine is not None else OrtProbeEngine(model_dir, spec))
