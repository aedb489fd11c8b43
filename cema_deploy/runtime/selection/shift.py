"""A label-free shift detector for continual streams (beyond the paper): when the input distribution changes, the
edge sends a calibration batch and the cloud re-initialises the running statistics from it.

Why this is needed: on a continual stream CEMA's statistics come from the first batch and then move only by
momentum on *selected* samples. After an abrupt shift (a new weather, a blur) the edge can collapse onto a few
confident wrong classes; every sample then falls under E_min as "low-informative", nothing is uploaded, and
nothing corrects it (measured on the demo, severity 5, defocus and motion blur: 0 % uploaded, chance accuracy).

Two triggers, both judged against a *reference* taken over the first ``reference_frames`` frames after the last
(re)calibration, and neither firing before that reference is complete (a cool-down after every calibration):

1. **Input statistics** (the primary trigger). Per frame, three numbers of the uint8 image at model size:
   luminance mean, luminance standard deviation, and mean absolute neighbour difference (high-frequency energy:
   noise raises it, blur lowers it). These are what BatchNorm statistics respond to, and they do not move while
   the model adapts, so adaptation itself never looks like a shift. A batch fires when the z-score of its mean of
   any feature against the reference (per-frame spread / sqrt(n), the standard error of a batch mean) exceeds
   ``z_threshold``. With ``z_threshold = 8`` a stationary stream of i.i.d. batches essentially never fires
   (the batch mean of 64 frames is close to normal); abrupt changes of the kind ImageNet-C models move batch
   means by tens of standard errors.
2. **Prediction collapse** (optional). The effective number of predicted classes of a batch, ``exp(H(mean p))``,
   falls below ``collapse_ratio`` times its reference value: the failure mode above, caught even when the
   inputs' low-level statistics look alike.

Example:
    >>> det = ShiftDetector(ShiftConfig(reference_frames=4))
    >>> flat = np.full((4, 8, 8, 3), 100, np.uint8); noisy = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3))
    >>> det.update(flat, None), det.update(flat, None), det.update(noisy.astype(np.uint8), None)
    (False, False, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.selection.entropy import entropy_of_mean

#: Names of the per-frame input features, in order.
FEATURES = ("luminance_mean", "luminance_std", "gradient_energy")
#: Largest side the features are computed at (frames are subsampled by a whole stride above it).
_FEATURE_SIDE = 64


class ShiftConfigError(CemaError, ValueError):
    """A shift-detector option out of range."""


@dataclass(frozen=True, kw_only=True)
class ShiftConfig:
    """Thresholds of the shift detector."""

    z_threshold: float = 8.0  # fire when a batch mean moves this many standard errors from the reference
    reference_frames: int = 128  # frames after a (re)calibration that form the reference (the cool-down)
    collapse_ratio: float | None = 0.4  # fire when effective classes < ratio x reference; None = trigger off
    min_spread: float = 0.005  # floor of each feature's per-frame spread (features are in [0, 1] units)

    def __post_init__(self) -> None:
        if not (self.z_threshold > 0 and self.reference_frames >= 1 and self.min_spread > 0):
            raise ShiftConfigError(
                f"z_threshold and min_spread must be > 0 and reference_frames >= 1, got {self.z_threshold}, "
                f"{self.min_spread}, {self.reference_frames}."
            )
        if self.collapse_ratio is not None and not 0 < self.collapse_ratio < 1:
            raise ShiftConfigError(f"collapse_ratio must be in (0, 1) or None, got {self.collapse_ratio}.")


def frame_features(images: np.ndarray) -> np.ndarray:
    """Per-frame features ``[N, 3]`` (see :data:`FEATURES`) of uint8 RGB images ``[N, H, W, 3]``, in [0, 1] units."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ShiftConfigError(f"Expected uint8 images [N, H, W, 3], got {images.dtype}{list(images.shape)}.")
    stride = max(1, math.ceil(max(images.shape[1:3]) / _FEATURE_SIDE))
    x = images[:, ::stride, ::stride].astype(np.float32) * np.float32(1.0 / 255.0)
    lum = x @ np.asarray([0.299, 0.587, 0.114], np.float32)  # [N, h, w]
    flat = lum.reshape(len(lum), -1)
    grad = np.abs(np.diff(lum, axis=1)).mean(axis=(1, 2)) if lum.shape[1] > 1 else np.zeros(len(lum), np.float32)
    if lum.shape[2] > 1:
        grad = grad + np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2))
    return np.stack([flat.mean(1), flat.std(1), grad], axis=1).astype(np.float64)


def effective_classes(probs: np.ndarray) -> float:
    """``exp(H(mean_i p_i))``: how many classes a batch's predictions spread over (1: all on one class)."""
    return math.exp(entropy_of_mean(probs))


class ShiftDetector:
    """Stateful detector over a stream of batches (not thread-safe: one stream, one detector)."""

    def __init__(self, config: ShiftConfig | None = None) -> None:
        self.config = config or ShiftConfig()
        self.fired = 0
        self.last_z = 0.0
        self.restart()

    def restart(self) -> None:
        """Forget the reference (after a calibration): the next ``reference_frames`` frames form a new one."""
        self._sum = np.zeros(len(FEATURES))
        self._sumsq = np.zeros(len(FEATURES))
        self._n = 0
        self._eff: list[float] = []
        self._ref: tuple[np.ndarray, np.ndarray, float | None] | None = None

    @property
    def ready(self) -> bool:
        """True once the reference is complete (the detector can fire)."""
        return self._ref is not None

    def update(self, images: np.ndarray, probs: np.ndarray | None) -> bool:
        """Judge one batch; True when it departs from the reference (the caller then recalibrates and should call
        :meth:`restart`). ``probs`` (softmax ``[N, C]``) enables the collapse trigger."""
        if len(images) == 0:
            return False
        feats = frame_features(images)
        eff = effective_classes(probs) if probs is not None and len(probs) else None
        if self._ref is None:
            self._sum += feats.sum(0)
            self._sumsq += (feats**2).sum(0)
            self._n += len(feats)
            if eff is not None:
                self._eff.append(eff)
            if self._n >= self.config.reference_frames:
                mean = self._sum / self._n
                spread = np.sqrt(np.maximum(self._sumsq / self._n - mean**2, 0.0))
                self._ref = (
                    mean,
                    np.maximum(spread, self.config.min_spread),
                    float(np.mean(self._eff)) if self._eff else None,
                )
            return False
        mean, spread, ref_eff = self._ref
        z = np.abs(feats.mean(0) - mean) / (spread / math.sqrt(len(feats)))
        self.last_z = float(z.max())
        fired = self.last_z > self.config.z_threshold
        ratio = self.config.collapse_ratio
        if not fired and ratio is not None and eff is not None and ref_eff is not None:
            fired = eff < ratio * ref_eff
        if fired:
            self.fired += 1
        return fired

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (to resume a stream after a restart)."""
        ref = None if self._ref is None else [self._ref[0].tolist(), self._ref[1].tolist(), self._ref[2]]
        return {
            "config": asdict(self.config),
            "sum": self._sum.tolist(),
            "sumsq": self._sumsq.tolist(),
            "n": self._n,
            "eff": list(self._eff),
            "ref": ref,
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = np.asarray(state["sum"], np.float64)
        self._sumsq = np.asarray(state["sumsq"], np.float64)
        self._n = int(state["n"])
        self._eff = [float(v) for v in state["eff"]]
        ref = state["ref"]
        self._ref = None if ref is None else (np.asarray(ref[0]), np.asarray(ref[1]), ref[2])
        self.fired = int(state["fired"])
