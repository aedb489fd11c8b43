"""The statistics probe's sidecar (``stats_probe.json``): which graph returns which BatchNorm layer's batch statistics.

``cema-deploy export`` writes, beside ``model.onnx``, a second graph ``stats_probe.onnx`` (for models with BatchNorm
layers that track running statistics) and this sidecar. The probe takes the model input, a scalar ``stats_mix`` and
every BatchNorm layer's tensors (weight, bias, running mean and variance, fed by name, so the probe always sees the
parameters the engine serves without a rebuild). Each BatchNorm layer normalizes with
``(1 - mix) * prior + mix * batch`` statistics and the probe returns, per layer, the batch mean and the (biased)
batch variance of the layer's input over every axis but the channel axis. Models without such layers (GroupNorm,
LayerNorm) get no probe: they have no running statistics to adapt.

numpy-free; imported by the export side (writes) and the edge (reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cema_deploy.exceptions import ModelError

__all__ = ["PROBE_FILE", "PROBE_FORMAT", "PROBE_SIDECAR", "ProbeLayer", "ProbeSpec", "probe_spec_from_dir"]

PROBE_FORMAT = "cema-stats-probe/1"
PROBE_FILE = "stats_probe.onnx"
PROBE_SIDECAR = "stats_probe.json"


@dataclass(frozen=True, kw_only=True)
class ProbeLayer:
    """One BatchNorm layer as the probe sees it: its tensors' names (state-dict names) and its two outputs."""

    name: str  # the module name, e.g. "layer1.0.bn1"
    mean: str  # running mean (a refittable tensor)
    var: str  # running variance (a refittable tensor)
    channels: int
    eps: float
    batch_mean: str  # the probe output holding the batch mean [C]
    batch_var: str  # the probe output holding the biased batch variance [C]


@dataclass(frozen=True, kw_only=True)
class ProbeSpec:
    """The sidecar: the probe's file, inputs, fed tensors and layers, bound to the export's fingerprint."""

    fingerprint: str
    model_file: str
    input_name: str
    mix_input: str
    feeds: tuple[str, ...]  # refittable tensors fed to the probe at every run
    layers: tuple[ProbeLayer, ...]

    def to_json(self) -> str:
        return json.dumps({"format": PROBE_FORMAT, **asdict(self)}, indent=1)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / PROBE_SIDECAR
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def probe_spec_from_dir(directory: str | os.PathLike[str], fingerprint: str) -> ProbeSpec | None:
    """The probe sidecar of an export folder; None when the export has none (no BatchNorm running statistics).

    Raises :class:`~cema_deploy.exceptions.ModelError` when it is unreadable or belongs to another export.
    """
    path = Path(directory) / PROBE_SIDECAR
    if not path.exists():
        return None
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if raw.pop("format", None) != PROBE_FORMAT:
            raise ValueError(f"format is not {PROBE_FORMAT!r}")
        layers = tuple(ProbeLayer(**layer) for layer in raw.pop("layers"))
        spec = ProbeSpec(layers=layers, feeds=tuple(raw.pop("feeds")), **raw)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"The statistics probe sidecar {path} is unreadable ({exc}); export the model again.") from exc
    if spec.fingerprint != fingerprint:
        raise ModelError(
            f"The statistics probe in {path.parent} was written for fingerprint {spec.fingerprint[:12]}…, not "
            f"{fingerprint[:12]}… (this export's manifest); export the model again."
        )
    return spec
