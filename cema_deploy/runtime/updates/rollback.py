"""Automatic rollback judged on identical inputs: after a refit, the new and the previous parameters are run on
the same ring of recent inputs and compared by a label-free score; a drop beyond a margin rolls the refit back.

The score is the **mutual information between input and prediction** over the ring,
``I = H(mean_x p(y|x)) - mean_x H(p(y|x))`` (entropy of the mean prediction minus the mean entropy), the
objective of information-maximisation test-time methods. It is high when predictions are confident *and* spread
over classes, and it falls both for a broken blob (near-uniform or noisy outputs: the mean entropy rises) and for a
collapse (every input mapped to one class: the entropy of the mean falls). Mean entropy alone would roll back the
update that fixes confidently wrong predictions; the entropy of the mean catches that case.

Why identical inputs: comparing statistics of *different* inputs before and after a refit mistakes every change
of the stream (a corruption boundary) for a bad blob (the rule this module replaces rolled back 18 times in four
healthy demo runs). Here both parameter sets see the same frames, so the difference is the parameters' alone.

The previous engine stays resident in the backend (``Backend.infer_previous``); evaluation runs on the monitor's
own thread, never on the serving path. Logits the serving path already computed with the previous version are
reused, so a refit usually costs one pass of the new engine over the ring. Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.backends.base import Backend
from cema_deploy.runtime.selection.entropy import entropy_of_mean, softmax

log = logging.getLogger("cema_deploy.edge")

__all__ = [
    "InputRing",
    "Judgement",
    "RollbackConfig",
    "RollbackMonitor",
    "information",
    "information_drop_se",
    "judge",
    "previous_logits",
]

#: Rollback reasons (metrics label values).
REASON_INFORMATION, REASON_NONFINITE = "information_drop", "nonfinite"


class RollbackConfigError(CemaError, ValueError):
    """A rollback option out of range."""


@dataclass(frozen=True, kw_only=True)
class RollbackConfig:
    """Rollback of a refit whose parameters carry less information about the inputs than the previous ones.

    ``window``: recent frames kept (the ring both engines are run on). ``margin_ratio``: the allowed drop of the
    mutual information, as a fraction of ``ln C`` (its largest possible value). ``min_samples``: frames the ring
    must hold before a refit is judged (fewer: the judgement waits for more frames).

    Why these defaults: 128 frames are two official edge batches, one pass of the new engine per refit.
    ``margin_ratio = 0.05`` (0.12 nats at C = 10, 0.35 nats at C = 1000) is the smallest margin without false
    rollbacks in ``benchmarks/rollback_faults.py`` on the demo's real blobs: healthy consecutive blobs lowered the
    score by up to 0.036 ln C on the same frames (40 trials; 10 % false rollbacks at 0.02, 3 % at 0.03), while every
    one-layer variance x100 fault that cost the window >= 5 accuracy points dropped it by more (README, rollback).
    """

    window: int = 128
    margin_ratio: float = 0.05
    min_samples: int = 32
    enabled: bool = True
    #: After a rollback, later blobs of the same episode (frames since the last calibration) are declined unjudged
    #: until a calibration starts a new episode or this many frames were served; then the next blob is judged
    #: against the serving parameters again (re-based). 0: no hold, every blob is applied and judged (the rule
    #: before issue 22: one bad trajectory became a chain of rollbacks). Beyond the paper. Default: 8 windows.
    hold_frames: int = 1024
    #: Which way the score fell (beyond the paper, issue 22 item 6): a drop beyond the margin rolls back only when
    #: the predictions *collapse* (the entropy of the mean prediction falls by more than ``collapse_ratio * ln C``)
    #: or *flatten* (the mean entropy rises by more than ``flatten_ratio * ln C``). A blob that keeps its
    #: predictions as spread as before and is only somewhat less confident is kept: after a calibration the next
    #: blob is often less confident *and* more accurate. 0 and 0: any drop beyond the margin (the rule before).
    #: Why 0.02 and 0.08 (0.05 and 0.18 nats at C = 10): replayed on the judged frames of the verdict audit's
    #: continual runs (quick models, seed 0), the severity-3 misfires (+1.6, +3.1, +1.6 points) lost 0.08, 0.08 and
    #: 0.18 ln C of confidence while the entropy of the mean fell by at most 0.01 ln C; every blob that lost >= 5
    #: points and was caught before collapsed by more than 0.02 ln C. 0.08 spares the first two; 0.25 spared all
    #: three but missed injected faults of ``benchmarks/rollback_faults.py`` that flatten the outputs by
    #: 0.1-0.2 ln C and cost 20-50 points (README, rollback).
    collapse_ratio: float = 0.02
    flatten_ratio: float = 0.08

    def __post_init__(self) -> None:
        if (
            self.window < 1
            or not self.margin_ratio >= 0
            or not 1 <= self.min_samples <= self.window
            or self.hold_frames < 0
            or not self.collapse_ratio >= 0
            or not self.flatten_ratio >= 0
        ):
            raise RollbackConfigError(
                f"Rollback window must be >= 1, margin_ratio >= 0, 1 <= min_samples <= window, hold_frames >= 0, "
                f"collapse_ratio >= 0 and flatten_ratio >= 0, got {self.window}, {self.margin_ratio}, "
                f"{self.min_samples}, {self.hold_frames}, {self.collapse_ratio}, {self.flatten_ratio}."
            )


def information(logits: np.ndarray) -> float:
    """Mutual information between input and prediction over the rows of ``logits`` ``[N, C]``, in nats:
    ``H(mean p) - mean H(p)``. Rows with non-finite logits are left out; NaN when none is finite."""
    finite = np.isfinite(logits).all(axis=1)
    if not finite.any():
        return math.nan
    p = softmax(logits[finite].astype(np.float64))
    logp = np.log(np.clip(p, 1e-300, None))
    mean_entropy = float(-(p * logp).sum(axis=1).mean())
    return entropy_of_mean(p) - mean_entropy


def _information_terms(logits: np.ndarray) -> np.ndarray:
    """Per-frame terms ``psi_i = -sum_c p_ic ln pbar_c - H(p_i)`` whose mean is :func:`information` exactly
    (``sum_c pbar_c ln pbar_c`` is the mean of ``sum_c p_ic ln pbar_c``), and whose deviations from it are the
    first-order influence of each frame on the score (delta method)."""
    p = softmax(logits.astype(np.float64))
    logp = np.log(np.clip(p, 1e-300, None))
    log_mean = np.log(np.clip(p.mean(axis=0), 1e-300, None))
    return np.asarray(-(p * log_mean).sum(axis=1) + (p * logp).sum(axis=1))


def information_drop_se(old_logits: np.ndarray, new_logits: np.ndarray) -> float:
    """Standard error (nats) of ``information(new) - information(old)`` on the same frames: the sample standard
    deviation of the paired per-frame terms' difference over ``sqrt(n)`` (delta method). Only frames finite under
    both are used; 0.0 with fewer than two. Paired frames make it small when the two parameter sets agree frame
    by frame, and large when a few frames carry the difference (a small ring after a calibration)."""
    ok = np.isfinite(old_logits).all(axis=1) & np.isfinite(new_logits).all(axis=1)
    n = int(ok.sum())
    if n < 2:
        return 0.0
    d = _information_terms(new_logits[ok]) - _information_terms(old_logits[ok])
    return float(d.std(ddof=1) / math.sqrt(n))


@dataclass(frozen=True)
class Judgement:
    """The comparison of ``version`` with ``previous_version`` on ``n`` identical frames."""

    version: int
    previous_version: int
    n: int
    score_previous: float  # mutual information, nats
    score_new: float
    allowed_drop: float  # nats
    rollback: bool
    reason: str  # "" (kept), REASON_INFORMATION or REASON_NONFINITE
    #: How the score moved (nats): ``collapse`` the fall of the entropy of the mean prediction, ``flatten`` the
    #: rise of the mean entropy (score change = flatten's opposite minus collapse); ``drop_se`` the standard error
    #: of the score change (:func:`information_drop_se`: whether a drop is more than the frames' noise).
    collapse: float = 0.0
    flatten: float = 0.0
    drop_se: float = 0.0
    #: Beyond the margin, but the predictions neither collapsed nor flattened by the configured ratios: kept.
    confidence_only: bool = False

    def describe(self) -> str:
        what = "rolled back" if self.rollback else "kept"
        if self.reason == REASON_NONFINITE:
            return (f"v{self.version} {what}: its outputs are not finite on {self.n} recent frames where "
                    f"v{self.previous_version}'s are")  # fmt: skip
        why = " (a loss of confidence only: the predictions neither collapsed nor flattened)"
        return (
            f"v{self.version} {what}: mutual information between input and prediction on the same {self.n} recent "
            f"frames {self.score_previous:.4f} -> {self.score_new:.4f} nats (v{self.previous_version} -> "
            f"v{self.version}; allowed drop {self.allowed_drop:.4f}; entropy of the mean fell {self.collapse:.4f}, "
            f"mean entropy rose {self.flatten:.4f}; standard error {self.drop_se:.4f})"
            + (why if self.confidence_only else "")
        )


def _entropies(logits: np.ndarray) -> tuple[float, float]:
    """(entropy of the mean prediction, mean entropy) over the finite rows of ``logits``; NaNs when none is."""
    finite = np.isfinite(logits).all(axis=1)
    if not finite.any():
        return math.nan, math.nan
    p = softmax(logits[finite].astype(np.float64))
    return entropy_of_mean(p), float(-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1).mean())


def judge(
    old_logits: np.ndarray,
    new_logits: np.ndarray,
    *,
    num_classes: int,
    margin_ratio: float,
    collapse_ratio: float = 0.0,
    flatten_ratio: float = 0.0,
    version: int = 0,
    previous_version: int = 0,
) -> Judgement:
    """Decide on logits of the previous and the new parameters for the *same* frames (the rule the runtime
    applies; :mod:`benchmarks.rollback_faults` calls it too). A drop of the score beyond ``margin_ratio * ln C``
    rolls back when the entropy of the mean prediction fell by more than ``collapse_ratio * ln C`` (a collapse)
    or the mean entropy rose by more than ``flatten_ratio * ln C`` (outputs flatten); with both ratios 0, any
    drop beyond the margin does (both parts are then 0 at most, and one of them is above 0)."""
    ln_c = math.log(num_classes)
    allowed = margin_ratio * ln_c
    old_ok, new_ok = np.isfinite(old_logits).all(axis=1), np.isfinite(new_logits).all(axis=1)
    s_old, s_new = information(old_logits), information(new_logits)
    n = len(new_logits)
    if (new_ok < old_ok).any():
        return Judgement(version, previous_version, n, s_old, s_new, allowed, True, REASON_NONFINITE)
    (hm_old, mh_old), (hm_new, mh_new) = _entropies(old_logits), _entropies(new_logits)
    collapse, flatten = hm_old - hm_new, mh_new - mh_old
    se = information_drop_se(old_logits, new_logits)
    beyond = not math.isnan(s_old) and (math.isnan(s_new) or s_new < s_old - allowed)
    shaped = not (collapse <= collapse_ratio * ln_c and flatten <= flatten_ratio * ln_c)  # NaN: counts as shaped
    drop = beyond and shaped
    return Judgement(version, previous_version, n, s_old, s_new, allowed, drop, REASON_INFORMATION if drop else "",
                     collapse, flatten, se, beyond and not shaped)  # fmt: skip


def previous_logits(backend: Backend, x: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Logits of the parameters that served before the last refit, and their version; None when the backend
    holds no previous engine (none yet, or rolled back). Uses ``Backend.infer_previous``/``previous_version``."""
    v = backend.previous_version
    if v is None:
        return None
    out = backend.infer_previous(x)
    if out is None or backend.previous_version != v:
        return None
    return np.asarray(out), v


class InputRing:
    """The last ``size`` frames served: uint8 image at model size, its logits and the version that made them.

    Images are kept as uint8 (a quarter of the normalised tensor's bytes) and normalised when judged.
    """

    def __init__(self, size: int) -> None:
        self._d: collections.deque[tuple[np.ndarray, np.ndarray, int]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        #: Largest batch the serving path ran: judgements never run larger ones (an engine's batch limit).
        self.largest_batch = 1

    def add(self, images: np.ndarray, logits: np.ndarray, version: int) -> None:
        with self._lock:
            self.largest_batch = max(self.largest_batch, len(images))
            for im, lg in zip(images, logits, strict=True):
                self._d.append((im, lg, version))

    def rebase(self) -> None:
        """Forget every frame held: a calibration batch begins a new episode, and a refit is judged only on the
        frames served since (frames of the previous domain say nothing about parameters calibrated for this one)."""
        with self._lock:
            self._d.clear()

    def snapshot(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        with self._lock:
            return list(self._d)

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)


class RollbackMonitor:
    """Judges every applied refit on the ring, on its own thread, and calls ``on_judged`` with the result.

    ``applied(version)`` after a refit swapped in; ``frames_added()`` after the serving path added frames;
    :meth:`wait_judged` blocks until the serving version was judged (``--sync`` runs take the decision before
    the next batch). A judgement is dropped when a newer refit replaced the version meanwhile.
    """

    def __init__(
        self,
        backend: Backend,
        config: RollbackConfig,
        *,
        num_classes: int,
        normalize: Callable[[np.ndarray], np.ndarray],
        on_judged: Callable[[Judgement], None],
        chunk: int = 64,
        unjudgeable: Callable[[int, int], str] | None = None,
    ) -> None:
        self.backend, self.config, self.num_classes = backend, config, num_classes
        self.normalize, self.on_judged, self.chunk = normalize, on_judged, chunk
        #: ``unjudgeable(version, previous_version)``: a reason why the two cannot be compared (e.g. a reset
        #: between them: a blob of a new generation is a new start, not a refit to roll back), or "".
        self.unjudgeable = unjudgeable
        #: Refits accepted without a judgement because ``unjudgeable`` gave a reason.
        self.unjudged = 0
        self.ring = InputRing(config.window)
        #: ``audit(judgement, frames, old_logits, new_logits)``, called on this thread after each judgement with
        #: the frames judged (uint8 at model size) and both parameter sets' logits on them: for label-aware audits
        #: of the verdicts (the demo's frontier); None: nothing is called.
        self.audit: Callable[[Judgement, np.ndarray, np.ndarray, np.ndarray], None] | None = None
        self.judged = 0
        self.last: Judgement | None = None
        self._pending: int | None = None
        self._judging = False  # a judgement (and the action on it) is under way
        self._judged_upto = backend.version
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if config.enabled:
            self._thread = threading.Thread(target=self._loop, name="cema-rollback", daemon=True)
            self._thread.start()

    def applied(self, version: int) -> None:
        with self._cond:
            if self.config.enabled:
                self._pending = version
            else:
                self._judged_upto = max(self._judged_upto, version)
            self._cond.notify_all()

    def accept(self, version: int) -> None:
        """Mark ``version`` as judged without judging it (a blob restored from the edge's state)."""
        with self._cond:
            self._judged_upto = max(self._judged_upto, version)
            if self._pending is not None and self._pending <= version:
                self._pending = None
            self._cond.notify_all()

    def frames_added(self) -> None:
        with self._cond:
            if self._pending is not None:
                self._cond.notify_all()

    def wait_judged(self, timeout: float) -> bool:
        """True once the serving version is judged, or its judgement waits for frames (the ring holds fewer
        than ``min_samples``: it is taken after a later batch); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stop:
                serving = self.backend.version
                busy = self._judging or (self._pending is not None and len(self.ring) >= self.config.min_samples)
                # done: nothing being judged, and the serving version judged (or its judgement deferred until a
                # later batch fills the ring)
                if not busy and (self._judged_upto >= serving or self._pending == serving):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._pending is None or len(self.ring) < self.config.min_samples):
                    self._cond.wait(0.1)
                if self._stop:
                    return
                version = self._pending
                self._judging = True
            assert version is not None
            try:
                j = self._judge(version)
            except Exception as exc:  # never let the monitor die; keep the refit
                log.error("judging v%d failed: %r; keeping it", version, exc)
                j = None
            if j is not None:
                self.judged += 1
                self.last = j
                try:
                    self.on_judged(j)
                except Exception as exc:
                    log.error("acting on the judgement of v%d failed: %r", version, exc)
            with self._cond:
                if self._pending == version:
                    self._pending = None
                self._judged_upto = max(self._judged_upto, version)
                self._judging = False
                self._cond.notify_all()

    def _batches(self, images: np.ndarray, chunk: int) -> list[tuple[np.ndarray, int]]:
        """Normalised batches of exactly ``chunk`` frames (the last padded by repeating its final frame), with the
        count of real frames in each: the engine only ever sees the batch shape the serving path runs, which is
        also the shape a refit warms the next engine up at."""
        out = []
        for i in range(0, len(images), chunk):
            part = images[i : i + chunk]
            n = len(part)
            if n < chunk:
                part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
            out.append((self.normalize(part), n))
        return out

    def _judge(self, version: int) -> Judgement | None:
        entries = self.ring.snapshot()
        if self.backend.version != version or not entries:
            return None  # replaced by a newer refit (or rolled back) meanwhile
        prev_version = self.backend.previous_version
        if prev_version is None:
            return None
        if self.unjudgeable is not None and (why := self.unjudgeable(version, prev_version)):
            self.unjudged += 1
            log.warning("v%d accepted without a rollback judgement: %s", version, why)
            return None
        images = np.stack([im for im, _, _ in entries])
        chunk = max(1, min(self.chunk, self.ring.largest_batch))
        new_parts: list[np.ndarray] = []
        for x, n in self._batches(images, chunk):
            logits, v = self.backend.infer_versioned(x)
            if v != version:
                return None
            new_parts.append(logits[:n])
        new = np.concatenate(new_parts)
        # Logits of the previous version: reuse what the serving path computed, run the previous engine for the rest.
        old = np.empty_like(new)
        missing = np.asarray([i for i, (_, _, v) in enumerate(entries) if v != prev_version], np.int64)
        for i, (_, lg, v) in enumerate(entries):
            if v == prev_version:
                old[i] = lg
        done = 0
        for x, n in self._batches(images[missing], chunk) if len(missing) else []:
            got = previous_logits(self.backend, x)
            if got is None or got[1] != prev_version:
                return None
            old[missing[done : done + n]] = got[0][:n]
            done += n
        j = judge(old, new, num_classes=self.num_classes, margin_ratio=self.config.margin_ratio,
                  collapse_ratio=self.config.collapse_ratio, flatten_ratio=self.config.flatten_ratio,
                  version=version, previous_version=prev_version)  # fmt: skip
        if self.audit is not None:
            self.audit(j, images, old, new)
        return j
