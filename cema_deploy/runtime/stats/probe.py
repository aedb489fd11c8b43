"""Run the export's statistics probe (``stats_probe.onnx``) on ONNX Runtime: per-layer batch mean and variance.

The graph and its sidecar are described in :mod:`cema_deploy.contract.stats_probe`. The probe is a second session
beside the serving engine: it never touches the serving state, and the BatchNorm tensors it normalizes with are fed
at every run (the engine's serving tensors, with the running statistics replaced by the prior the caller passes).
Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.stats_probe import ProbeSpec, probe_spec_from_dir
from cema_deploy.exceptions import BackendError

__all__ = ["BatchStats", "StatsProbe", "probe_from_dir"]


@dataclass(frozen=True)
class BatchStats:
    """One probe run: per layer (by module name) the batch mean and biased variance ``[C]``, and the frame count."""

    mean: dict[str, np.ndarray]
    var: dict[str, np.ndarray]
    frames: int


class StatsProbe:
    """An ONNX Runtime CPU session on the probe graph.

    Example:
        >>> probe = probe_from_dir("out/r50", manifest)  # doctest: +SKIP
        >>> stats = probe.run(x, backend.tensors, mix=1.0)  # test-batch BN statistics  # doctest: +SKIP
    """

    def __init__(self, model_dir: str | os.PathLike[str], spec: ProbeSpec, *, intra_op_threads: int | None = None):
        ort = lazy_import("onnxruntime", extra="edge", purpose="the statistics probe")
        from cema_deploy.runtime.backends.onnxrt import session_options

        self.spec = spec
        path = Path(model_dir) / spec.model_file
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the statistics probe {path}: {exc}") from exc
        self._outputs = [name for layer in spec.layers for name in (layer.batch_mean, layer.batch_var)]

    @property
    def layers(self) -> list[str]:
        return [layer.name for layer in self.spec.layers]

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
        feed: dict[str, np.ndarray] = {self.spec.input_name: x, self.spec.mix_input: np.array(mix, np.float32)}
        for name in self.spec.feeds:
            value = prior[name] if prior is not None and name in prior else tensors[name]
            feed[name] = np.ascontiguousarray(value, np.float32)
        try:
            out = self._session.run(self._outputs, feed)
        except Exception as exc:
            raise BackendError(f"The statistics probe failed on a batch of shape {list(x.shape)}: {exc}") from exc
        means = {layer.name: np.asarray(out[2 * i]) for i, layer in enumerate(self.spec.layers)}
        variances = {layer.name: np.asarray(out[2 * i + 1]) for i, layer in enumerate(self.spec.layers)}
        return BatchStats(mean=means, var=variances, frames=int(x.shape[0]))


def probe_from_dir(model_dir: str | os.PathLike[str], manifest: Manifest) -> StatsProbe | None:
    """The export's statistics probe, or None when it has none (a model without BatchNorm running statistics)."""
    spec = probe_spec_from_dir(model_dir, manifest.fingerprint)
    return None if spec is None else StatsProbe(model_dir, spec)
