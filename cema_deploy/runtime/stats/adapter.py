"""The edge's statistics adapter: forward-only BatchNorm statistics, estimated on the edge and refitted into its engine.

Modes (``edge run --adapt-stats``):

* ``off``: the engine serves the statistics of the export or of the last cloud blob.
* ``alpha``: alpha-BN (You et al. 2021, "Test-time batch statistics calibration for covariate shift"): each probed
  batch sets ``mean = (1 - a) * source_mean + a * batch_mean`` and ``var = (1 - a) * source_var + a * batch_var``;
  the source statistics are a prior that keeps batch 1 sane (mariodoebler/test-time-adaptation ships a = 0.1 at
  batch size 1). Inside the probe each layer normalizes with the same mix, as alpha-BN does in its forward pass.
* ``ema``: statistics that accumulate across batches (RoTTA's RBN, DUA): a probed batch of ``n`` frames enters with
  weight ``w = max(1 - (1 - momentum)^n, n / (n + seen + prior_frames))`` where ``seen`` counts frames since the
  last reset: a running average over the frames since the reset, in which the source statistics count as
  ``prior_frames`` frames, until it becomes an EMA of per-frame momentum ``momentum``. Beyond RBN, the mix is one of
  distributions (means and second moments mix with weight ``w``; ``var = E[x^2] - mean^2``), so frames probed one
  at a time still add up to the variance across frames, not just the average variance within one.
  A label-concentration guard (beyond RBN; runtime/stats/labels.py) scales the prior: a probe enters with
  ``prior_frames * c ** balance_power`` where ``c = K / exp(H)`` of the last ``balance_window`` served predictions
  (1 when they spread over all ``K`` classes, ``K`` when they are all one class), or with ``balance_measure="runs"``
  ``c = K * (share of consecutive predictions that repeat their label)`` (labels.py). On a label-correlated stream
  (a camera watching one class for a while) the frames of one class then barely move the statistics; on a mixed one
  the prior stays small. Chosen over a larger fixed prior and a depth-graded one on the quick demo's sorted and
  shuffled streams (README, "The edge's own statistics").
  ``prior_mix`` (default ``moment``; ``shrink`` from issue 21's second round is an option) says how the source
  prior enters. ``moment``: as
  above, the source counts as ``prior_frames`` frames of the mixture, so a shifted batch's distance from the
  source mean, ``w (1 - w) (batch_mean - source_mean)^2``, inflates the served variance. ``shrink``: the frames'
  own estimate (the moment mix above over the frames since the reset, without the source: a running average, then
  an EMA) is served as alpha-BN's mix with the source, ``(1 - a) * source + a * frames`` for the mean and the
  variance alike, with ``a = evidence / (evidence + prior_frames)`` (alpha-BN with an ``a`` that grows with the
  frames seen, where You et al. fix it; beyond the paper). The guard then makes a batch of ``n`` frames count as
  ``n / c ** balance_power`` frames, and reads the served labels only once ``balance_after`` frames entered since
  the last reset: the labels served under the stale statistics right after a reset tell how the corruption
  collapsed the model, not how the stream is ordered (batch 1, severity 3: the guard read a defocus collapse onto
  one class as a class run and slowed the start, 71.0 % vs 75.3 % without it, seed 0).

Probe rate: every batch until ``dense_frames`` frames entered the statistics since the last reset (the start or a
detected shift, when the estimate needs data fast; ``edge run`` default 512 frames), then one batch in ``every`` (the
other batches cost nothing: a steady edge pays little, a shifted one pays for a short while). On a shift detected by the
existing detector (:mod:`cema_deploy.runtime.selection.shift`, on the adapter's own instance) the statistics go back to
the source ones before the batch is probed. After a change of the cloud version (a blob applied, a rollback) the
statistics are merged into the new parameters at the next batch: the edge owns the running statistics, the cloud the
affine parameters.

Each change is refitted with :meth:`~cema_deploy.runtime.backends.base.Backend.refit_local` (build, warm-up and one
atomic swap, like a cloud blob) under the *same* cloud version; ``local_generation`` counts these refits and is
never sent to, nor compared with, the cloud's versions. Rollback judges cloud blobs only; local refits bypass it.
Never imports torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._atomic import write_atomic
from cema_deploy.contract.blob import blob_from_path
from cema_deploy.contract.safetensors_io import tensors_from_bytes, tensors_to_bytes
from cema_deploy.exceptions import CemaError, ContractError
from cema_deploy.runtime.backends.base import Backend
from cema_deploy.runtime.selection.shift import ShiftConfig, ShiftDetector
from cema_deploy.runtime.stats.labels import LabelWindow
from cema_deploy.runtime.stats.probe import BatchStats, StatsProbe

__all__ = ["BALANCE_MEASURES", "STATS_MODES", "StatsAdapter", "StatsConfig", "StatsConfigError"]

log = logging.getLogger("cema_deploy.edge.stats")

STATS_MODES = ("off", "ema", "alpha")
#: The guard's measure of the served labels: ``histogram`` (``K / exp(H)``, LabelWindow.concentration) or ``runs``
#: (how often a label repeats from frame to frame, LabelWindow.run_concentration).
BALANCE_MEASURES = ("histogram", "runs")
#: How ``ema`` combines the source statistics with the frames' estimate: ``moment`` (the source counts as
#: ``prior_frames`` frames of a mixture of distributions) or ``shrink`` (alpha-BN's linear mix of the source with the
#: frames' pooled estimate, ``a = seen / (seen + prior_frames)``; see :func:`shrink_weight`).
PRIOR_MIXES = ("moment", "shrink")
#: Default steady-state probe rate, one batch in 128: a probe plus its refit cost 5.9 served batches at batch 1 and
#: 3.4 at batch 16 (ResNet-50, ORT CPU, 2 threads), so 128 keeps 0.96x / 0.97x of the adapter-off throughput
#: (derived from median latencies; 64 gave 0.92x / 0.95x): benchmarks/results/2026-12-03-edge-stats/.
DEFAULT_EVERY = 128
#: The adapter's statistics in ``edge run --state DIR`` (written atomically beside the edge state).
STATS_STATE_FILE = "edge-stats.safetensors"
#: Name prefix of the frames' estimate (``prior_mix="shrink"``) in the state file.
DATA_PREFIX = "data/"


class StatsConfigError(CemaError, ValueError):
    """A statistics-adapter option out of range."""


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    """Settings of the statistics adapter (defaults: see the README's "The edge's own statistics")."""

    mode: str = "off"
    alpha: float = 0.1  # a of alpha-BN (You et al. 2021); 0.1 at batch 1 in mariodoebler/test-time-adaptation
    momentum: float = 0.002  # ema: per-frame weight floor (memory ~ 1 / momentum frames)
    prior_frames: float = 8.0  # ema: the source statistics count as this many frames after a reset ...
    every: int = DEFAULT_EVERY  # probe one batch in `every` ...
    dense_frames: int = 0  # ... once this many frames entered since the last reset (every batch before)
    balance_window: int = 32  # ... times concentration ** balance_power of the last `balance_window` served
    balance_power: float = 2.0  # predictions (runtime/stats/labels.py; window 0: off)
    balance_measure: str = "histogram"  # ... concentration measured as in BALANCE_MEASURES
    balance_after: int = 0  # ... read only once this many frames entered since the last reset (1 before)
    prior_mix: str = "moment"  # ema: how the source prior combines with the frames (PRIOR_MIXES)
    reset_on_shift: bool = True
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    def __post_init__(self) -> None:
        if self.mode not in STATS_MODES:
            raise StatsConfigError(f"Unknown statistics mode {self.mode!r}; expected one of {list(STATS_MODES)}.")
        if self.balance_measure not in BALANCE_MEASURES:
            raise StatsConfigError(
                f"Unknown balance measure {self.balance_measure!r}; expected one of {list(BALANCE_MEASURES)}."
            )
        if self.prior_mix not in PRIOR_MIXES:
            raise StatsConfigError(f"Unknown prior mix {self.prior_mix!r}; expected one of {list(PRIOR_MIXES)}.")
        if not (
            0 < self.alpha <= 1
            and 0 < self.momentum <= 1
            and self.prior_frames >= 0
            and self.every >= 1
            and self.dense_frames >= 0
            and self.balance_window >= 0
            and self.balance_power >= 0
            and self.balance_after >= 0
        ):
            raise StatsConfigError(
                f"Need 0 < alpha <= 1, 0 < momentum <= 1, prior_frames >= 0, every >= 1, dense_frames >= 0; got "
                f"alpha={self.alpha}, momentum={self.momentum}, prior_frames={self.prior_frames}, every={self.every}, "
                f"dense_frames={self.dense_frames}."
            )


def alpha_mix(
    source: tuple[np.ndarray, np.ndarray], batch: tuple[np.ndarray, np.ndarray], a: float
) -> tuple[np.ndarray, np.ndarray]:
    """alpha-BN: ``((1 - a) * source_mean + a * batch_mean, (1 - a) * source_var + a * batch_var)``."""
    return (1 - a) * source[0] + a * batch[0], (1 - a) * source[1] + a * batch[1]


def moment_mix(
    old: tuple[np.ndarray, np.ndarray], batch: tuple[np.ndarray, np.ndarray], w: float
) -> tuple[np.ndarray, np.ndarray]:
    """The mixture ``(1 - w) * old + w * batch`` of two distributions: its mean and (law of total variance) variance."""
    mean = (1 - w) * old[0] + w * batch[0]
    second = (1 - w) * (old[1] + old[0] ** 2) + w * (batch[1] + batch[0] ** 2)
    return mean, np.maximum(second - mean**2, 0.0)


def ema_weight(n: int, seen: int, cfg: StatsConfig, prior_frames: float | None = None) -> float:
    """Weight of a probed batch of ``n`` frames when ``seen`` frames entered since the last reset (see module doc);
    ``prior_frames`` overrides ``cfg.prior_frames`` (a layer's or a concentrated stream's prior)."""
    prior = cfg.prior_frames if prior_frames is None else prior_frames
    return max(1.0 - (1.0 - cfg.momentum) ** n, n / (n + seen + prior))


def shrink_weight(evidence: float, prior_frames: float) -> float:
    """alpha-BN's ``a`` for ``evidence`` frames against a source prior of ``prior_frames`` frames:
    ``evidence / (evidence + prior_frames)`` (1 when both are 0)."""
    total = evidence + prior_frames
    return evidence / total if total > 0 else 1.0


def shrink_probe_prior(
    source: tuple[np.ndarray, np.ndarray], data: tuple[np.ndarray, np.ndarray], a: float, w: float
) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """The probe's ``(prior, mix)`` for ``prior_mix="shrink"``: ``(1 - mix) * prior + mix * batch`` equals
    ``(1 - a) * source + a * ((1 - w) * data + w * batch)``, the statistics served once the batch entered the frames'
    estimate with weight ``w`` (exact for the mean; the variance's between-batch term is left out, as the probe
    mixes linearly)."""
    mix = a * w
    if mix >= 1.0:
        return source, 1.0
    mean = ((1 - a) * source[0] + a * (1 - w) * data[0]) / (1 - mix)
    var = ((1 - a) * source[1] + a * (1 - w) * data[1]) / (1 - mix)
    return (mean, var), mix


class StatsAdapter:
    """Keeps the edge's BatchNorm statistics and refits them into ``backend`` (one stream, the serving thread).

    Example:
        >>> probe = probe_from_dir(model_dir, manifest)  # doctest: +SKIP
        >>> adapter = StatsAdapter(backend, probe, StatsConfig(mode="alpha"))  # doctest: +SKIP
        >>> adapter.observe(x, images_at_size)  # before each batch is served  # doctest: +SKIP
    """

    def __init__(self, backend: Backend, probe: StatsProbe, config: StatsConfig) -> None:
        self.backend, self.probe, self.config = backend, probe, config
        self.layers = probe.spec.layers
        source = blob_from_path(backend.model_dir / backend.manifest.params_file).tensors  # the export's own
        self.source = {
            ly.name: (np.asarray(source[ly.mean], np.float64), np.asarray(source[ly.var], np.float64))
            for ly in self.layers
        }
        self.current = dict(self.source)
        self.data = dict(self.source)  # prior_mix="shrink": the frames' pooled estimate since the last reset ...
        self.evidence = 0.0  # ... and how many frames it counts (the guard counts concentrated frames as fewer)
        self.detector = ShiftDetector(config.shift) if config.reset_on_shift else None
        self.local_generation = 0  # refits of the edge's own statistics (never a cloud version)
        self.batches = self.probes = self.frames_probed = self.resets = self.refit_errors = 0
        self.seen = 0  # frames in the statistics since the last reset
        self._since_probe = config.every - 1  # batches since the last probe: the first batch is probed
        self.cloud_version: int | None = None  # the cloud version the statistics were last merged into
        self.last_refit_s = 0.0
        self.labels = (
            LabelWindow(frames=config.balance_window, num_classes=backend.manifest.num_classes)
            if config.balance_window
            else None
        )
        self.last_concentration = 1.0

    # ---- the stream -----------------------------------------------------------------------------------
    def observe(self, x: np.ndarray, images: np.ndarray | None = None, probs: np.ndarray | None = None) -> bool:
        """One batch about to be served (``x``: the normalized NCHW float32 input; ``images``: uint8 frames at model
        size and ``probs``: softmax if known, for the shift detector). Probes when due and refits; True when the
        engine changed."""
        cfg = self.config
        if cfg.mode == "off" or len(x) == 0:
            return False
        changed = False
        if self.detector is not None and images is not None and self.detector.update(images, probs):
            self.reset()
            changed = True
        if self.seen < cfg.dense_frames or self._since_probe >= cfg.every - 1:
            self._update(x)
            self._since_probe = 0
            changed = True
        else:
            self._since_probe += 1
        self.batches += 1
        if changed or self.cloud_version != self.backend.version:
            return self.refit()
        return False

    def served(self, predictions: np.ndarray) -> None:
        """The labels the engine predicted for the batch just served (the label-concentration guard watches them)."""
        if self.labels is not None:
            self.labels.add(predictions)

    def reset(self) -> None:
        """Back to the source statistics (a detected shift): the next probes start a fresh estimate."""
        self.current, self.data, self.seen, self.evidence = dict(self.source), dict(self.source), 0, 0.0
        if self.labels is not None:
            self.labels.clear()
        self._since_probe = self.config.every - 1  # probe the batch that showed the shift
        self.resets += 1
        if self.detector is not None:
            self.detector.restart()
        log.info("statistics reset to the source ones (reset %d)", self.resets)

    def _update(self, x: np.ndarray) -> None:
        cfg, n = self.config, len(x)
        if cfg.mode == "ema" and cfg.prior_mix == "shrink":
            self._update_shrink(x)
            return
        if cfg.mode == "alpha":
            prior = self.source
            mix = cfg.alpha
        else:
            prior = self.current
            self.last_concentration = self._concentration() ** cfg.balance_power
            mix = ema_weight(n, self.seen, cfg, cfg.prior_frames * self.last_concentration)
        feeds = {
            name: arr.astype(np.float32)
            for ly in self.layers
            for name, arr in zip((ly.mean, ly.var), prior[ly.name], strict=True)
        }
        st: BatchStats = self.probe.run(x, self.backend.tensors, mix=mix, prior=feeds)
        for ly in self.layers:
            batch = (st.mean[ly.name].astype(np.float64), st.var[ly.name].astype(np.float64))
            if cfg.mode == "alpha":
                self.current[ly.name] = alpha_mix(self.source[ly.name], batch, mix)
            else:
                self.current[ly.name] = moment_mix(self.current[ly.name], batch, mix)
        self.seen += n
        self.probes += 1
        self.frames_probed += n

    def _update_shrink(self, x: np.ndarray) -> None:
        """``prior_mix="shrink"``: the batch enters the frames' estimate (moment mix, running average then EMA), which
        is served as alpha-BN's mix with the source, ``a = evidence / (evidence + prior_frames)``. The guard's
        concentration ``c`` makes the batch count as ``n / c`` frames (in the estimate and in ``a``)."""
        cfg, n = self.config, len(x)
        self.last_concentration = self._concentration() ** cfg.balance_power
        frames = n / self.last_concentration
        w = max(1.0 - (1.0 - cfg.momentum) ** frames, frames / (frames + self.evidence))
        a = shrink_weight(self.evidence + frames, cfg.prior_frames)
        priors = {ly.name: shrink_probe_prior(self.source[ly.name], self.data[ly.name], a, w) for ly in self.layers}
        mix = next(iter(priors.values()))[1] if priors else 1.0
        feeds = {
            name: arr.astype(np.float32)
            for ly in self.layers
            for name, arr in zip((ly.mean, ly.var), priors[ly.name][0], strict=True)
        }
        st: BatchStats = self.probe.run(x, self.backend.tensors, mix=mix, prior=feeds)
        for ly in self.layers:
            batch = (st.mean[ly.name].astype(np.float64), st.var[ly.name].astype(np.float64))
            self.data[ly.name] = moment_mix(self.data[ly.name], batch, w)
            self.current[ly.name] = alpha_mix(self.source[ly.name], self.data[ly.name], a)
        self.evidence += frames
        self.seen += n
        self.probes += 1
        self.frames_probed += n

    def _concentration(self) -> float:
        """The guard's concentration of the served labels (1 when the guard is off)."""
        if self.labels is None or self.seen < self.config.balance_after:
            return 1.0
        if self.config.balance_measure == "runs":
            return self.labels.run_concentration()
        return self.labels.concentration()

    def tensors(self) -> dict[str, np.ndarray]:
        """The running mean/var tensors the edge serves now (float32, by refittable name)."""
        out: dict[str, np.ndarray] = {}
        for ly in self.layers:
            mean, var = self.current[ly.name]
            out[ly.mean], out[ly.var] = mean.astype(np.float32), var.astype(np.float32)
        return out

    def refit(self) -> bool:
        """Refit the statistics into the engine (merged with the serving cloud parameters); False when it failed
        (logged and counted; the engine keeps serving what it served)."""
        try:
            report = self.backend.refit_local(self.tensors())
        except CemaError as exc:
            self.refit_errors += 1
            log.warning("refitting the edge's statistics failed, serving what served before: %s", exc)
            return False
        self.local_generation += 1
        self.cloud_version = report.new_version
        self.last_refit_s = report.build_s + report.warmup_s
        return True

    # ---- durable state and metrics --------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the statistics and counters to ``directory/edge-stats.safetensors`` (atomic); with
        ``prior_mix="shrink"`` the frames' estimate too (``data/``-prefixed names) and its frame count."""
        meta = {"mode": self.config.mode, "local_generation": str(self.local_generation), "seen": str(self.seen),
                "resets": str(self.resets), "prior_mix": self.config.prior_mix,
                "evidence": repr(self.evidence)}  # fmt: skip
        tensors = self.tensors()
        if self._shrinks:
            for ly in self.layers:
                mean, var = self.data[ly.name]
                tensors[DATA_PREFIX + ly.mean] = mean.astype(np.float32)
                tensors[DATA_PREFIX + ly.var] = var.astype(np.float32)
        write_atomic(Path(directory) / STATS_STATE_FILE, tensors_to_bytes(tensors, meta))

    @property
    def _shrinks(self) -> bool:
        return self.config.mode == "ema" and self.config.prior_mix == "shrink"

    def load(self, directory: str | os.PathLike[str]) -> bool:
        """Restore what :meth:`save` wrote (same mode, prior mix and tensors); False when there is nothing usable
        (logged)."""
        path = Path(directory) / STATS_STATE_FILE
        if not path.exists():
            return False
        try:
            tensors, meta = tensors_from_bytes(path.read_bytes(), source=str(path))
        except (OSError, ContractError) as exc:
            log.warning("not restoring the edge's statistics from %s: %s", path, exc)
            return False
        want = {name for ly in self.layers for name in (ly.mean, ly.var)}
        if self._shrinks:
            want |= {DATA_PREFIX + name for name in set(want)}
        saved_mix = meta.get("prior_mix", "moment")  # files written before prior mixes existed: moment
        if (
            meta.get("mode") != self.config.mode
            or set(tensors) != want
            or (self.config.mode == "ema" and saved_mix != self.config.prior_mix)
        ):
            log.info(
                "not restoring the edge's statistics from %s: saved for mode %r (prior mix %r)",
                path, meta.get("mode"), saved_mix,
            )  # fmt: skip
            return False
        for ly in self.layers:
            self.current[ly.name] = (tensors[ly.mean].astype(np.float64), tensors[ly.var].astype(np.float64))
            if self._shrinks:
                self.data[ly.name] = (
                    tensors[DATA_PREFIX + ly.mean].astype(np.float64),
                    tensors[DATA_PREFIX + ly.var].astype(np.float64),
                )
        self.local_generation = int(meta.get("local_generation", "0"))
        self.seen, self.resets = int(meta.get("seen", "0")), int(meta.get("resets", "0"))
        self.evidence = float(meta.get("evidence", "0"))
        self.cloud_version = None  # merge into whatever serves at the next batch
        return True

    def metrics(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "local_generation": self.local_generation,
            "cloud_version": self.cloud_version,
            "batches": self.batches,
            "probes": self.probes,
            "frames_probed": self.frames_probed,
            "resets": self.resets,
            "refit_errors": self.refit_errors,
            "frames_since_reset": self.seen,
            "last_refit_s": self.last_refit_s,
        }


def stats_adapter_from_dir(
    backend: Backend, model_dir: str | os.PathLike[str], config: StatsConfig
) -> tuple[StatsAdapter | None, str]:
    """The adapter for ``backend``'s export, or (None, why) when it stays off (mode off, or no probe: a model
    without BatchNorm running statistics, e.g. GroupNorm or LayerNorm)."""
    from cema_deploy.runtime.stats.probe import probe_from_dir

    if config.mode == "off":
        return None, "off"
    probe = probe_from_dir(model_dir, backend.manifest, backend=backend)
    if probe is None:
        return None, (
            f"{Path(model_dir)} has no statistics probe: the model has no BatchNorm running statistics (GroupNorm or "
            "LayerNorm models have none to adapt), or was exported before probes existed (export it again)"
        )
    return StatsAdapter(backend, probe, config), config.mode
