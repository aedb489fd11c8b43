"""CEMA's sample selection at the edge: which samples are worth uploading (paper Sec. 3.2, arXiv 2402.17316).

Three rules, applied in this order; a sample is charged to the first rule that excludes it:

1. **Dynamic unreliable-sample exclusion** (Eqn. 3-4): drop ``x`` when ``E(x) >= E_max(t)`` with
   ``E_max(t) = E_0 * lambda * (mean entropy of all samples seen so far / mean entropy after the warm-up)``;
   before ``W`` samples have been seen ``E_max = E_0``. As in the official code (``EntropyCriterion``), the
   running mean includes the current batch before the threshold is computed.
2. **Low-informative-sample exclusion** (Eqn. 5): drop ``x`` when ``E(x) <= E_min``.
3. **Redundancy exclusion** (EATA Eqn. 6, kept in CEMA's official code): ``m`` is a moving average of the
   probability vectors of kept samples (``m <- 0.9 m + 0.1 mean(p)``); drop ``x`` when ``|cos(m, p(x))| >=
   d_margin``. Before any sample has passed, ``m`` does not exist and the whole first non-empty batch is kept.

Defaults follow the official ImageNet-C configuration, scaled by the class count ``C``: ``E_0 = 0.4 ln C``,
``lambda = 1``, ``E_min = 0.02 ln C``, ``d_margin = 0.05`` at ``C = 1000``. ``d_margin`` was tuned for 1,000
classes; with few classes nearly every softmax vector lies close to ``m``. ``d_margin="auto"`` therefore keeps
the ratio of ``d_margin`` to ``1/sqrt(C)`` (the cosine between a one-hot and a uniform vector) at its
1,000-class value: ``0.05 * sqrt(1000 / C)``, capped at 1. ``None`` switches the rule off.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.entropy import softmax, softmax_entropy

__all__ = [
    "KEPT",
    "LOW_INFO",
    "REASONS",
    "REDUNDANT",
    "UNRELIABLE",
    "SampleSelector",
    "SelectionConfig",
    "SelectionConfigError",
    "SelectionCounters",
    "SelectionResult",
    "auto_d_margin",
]

#: Reason codes of :attr:`SelectionResult.reason`.
KEPT, UNRELIABLE, LOW_INFO, REDUNDANT = 0, 1, 2, 3
REASONS = ("kept", "unreliable", "low_info", "redundant")

#: Defaults, as fractions of ln C where the paper scales by the class count.
E0_RATIO = 0.4  # E_0 = 0.4 ln C (Eqn. 3; official config ent_high_margin=0.4)
EMIN_RATIO = 0.02  # E_min = 0.02 ln C (Eqn. 5; official config ent_low_margin=0.02)
D_MARGIN_1000 = 0.05  # d_margin at C = 1000 (EATA Eqn. 6)
MOMENTUM = 0.9  # m <- 0.9 m + 0.1 mean(p) (EATA update_model_probs)
DEFAULT_WARMUP = 1000  # W, samples before E_max starts to move


class SelectionConfigError(CemaError, ValueError):
    """A selection threshold out of range."""


def auto_d_margin(num_classes: int) -> float:
    """``0.05 * sqrt(1000 / C)`` capped at 1: the 1,000-class margin rescaled to ``C`` classes."""
    return min(1.0, D_MARGIN_1000 * math.sqrt(1000.0 / num_classes))


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """Thresholds of the selection rules. Build it with :meth:`for_classes` or :meth:`eata_style`.

    Example:
        >>> cfg = SelectionConfig.for_classes(1000)
        >>> round(cfg.e0, 3), round(cfg.e_min or 0, 4), cfg.d_margin
        (2.763, 0.1382, 0.05)
    """

    num_classes: int
    e0: float  # E_0, reliability threshold before and at the end of the warm-up (Eqn. 3)
    lam: float = 1.0  # lambda, scale of the dynamic threshold (Eqn. 4)
    warmup: int = DEFAULT_WARMUP  # W, samples seen before E_max adapts (Eqn. 4)
    dynamic: bool = True  # False: E_max stays E_0 (EATA)
    e_min: float | None = None  # E_min, low-information threshold (Eqn. 5); None = rule off
    d_margin: float | None = None  # redundancy margin (EATA Eqn. 6); None = rule off

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise SelectionConfigError(f"num_classes must be >= 2, got {self.num_classes}.")
        if not (self.e0 > 0 and self.lam > 0 and self.warmup >= 1):
            raise SelectionConfigError(
                f"E_0 and lambda must be > 0 and the warm-up W >= 1, got {self.e0}, {self.lam}, {self.warmup}."
            )
        if self.e_min is not None and not 0 <= self.e_min < self.e0:
            raise SelectionConfigError(
                f"E_min must be in [0, E_0={self.e0:.4g}), got {self.e_min}; lower --e-min-ratio or raise --e0-ratio."
            )
        if self.d_margin is not None and not 0 < self.d_margin <= 1:
            raise SelectionConfigError(f"d_margin must be in (0, 1] or off, got {self.d_margin}.")

    @classmethod
    def for_classes(
        cls,
        num_classes: int,
        *,
        e0_ratio: float = E0_RATIO,
        lam: float = 1.0,
        warmup: int = DEFAULT_WARMUP,
        e_min_ratio: float | None = EMIN_RATIO,
        d_margin: float | Literal["auto"] | None = "auto",
    ) -> SelectionConfig:
        """CEMA's rules with the official defaults for ``num_classes`` classes."""
        ln_c = math.log(num_classes)
        return cls(
            num_classes=num_classes,
            e0=e0_ratio * ln_c,
            lam=lam,
            warmup=warmup,
            dynamic=True,
            e_min=None if e_min_ratio is None else e_min_ratio * ln_c,
            d_margin=auto_d_margin(num_classes) if d_margin == "auto" else d_margin,
        )

    @classmethod
    def eata_style(
        cls, num_classes: int, *, e0_ratio: float = E0_RATIO, d_margin: float | Literal["auto"] | None = "auto"
    ) -> SelectionConfig:
        """EATA's selection as the paper compares against it: fixed ``E_0``, no ``E_min``, same redundancy rule."""
        return cls(
            num_classes=num_classes,
            e0=e0_ratio * math.log(num_classes),
            dynamic=False,
            e_min=None,
            d_margin=auto_d_margin(num_classes) if d_margin == "auto" else d_margin,
        )

    def describe(self) -> dict[str, Any]:
        """The thresholds as plain numbers, for logs and JSON output."""
        return asdict(self)


@dataclass(frozen=True)
class SelectionResult:
    """Decision for one batch: ``mask[i]`` is True when sample ``i`` goes up for adaptation; ``reason`` holds the
    rule codes. ``stats_mask[i]`` (disjoint from ``mask``; None: no statistics sampling) marks frames drawn to go
    up as statistics samples; ``shift`` is True when the shift detector fired on this batch (the runtime then
    sends a recalibration batch)."""

    mask: np.ndarray  # bool [N]
    entropy: np.ndarray  # float64 [N]
    reason: np.ndarray  # int8 [N], one of KEPT / UNRELIABLE / LOW_INFO / REDUNDANT
    e_max: float  # the threshold this batch was judged against
    stats_mask: np.ndarray | None = None  # bool [N], statistics samples (beyond the paper)
    shift: bool = False  # a distribution shift was detected on this batch (beyond the paper)

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


@dataclass
class SelectionCounters:
    """Running totals; ``seen == selected + unreliable + low_info + redundant`` always holds.

    ``nonfinite`` counts samples whose logits gave no finite entropy (NaN/Inf logits): they are charged to
    ``unreliable`` and left out of ``entropy_sum`` and ``mean_entropy``, so one bad output cannot poison E_max(t).
    """

    seen: int = 0
    selected: int = 0
    unreliable: int = 0
    low_info: int = 0
    redundant: int = 0
    entropy_sum: float = 0.0
    nonfinite: int = 0

    @property
    def mean_entropy(self) -> float:
        n = self.seen - self.nonfinite
        return self.entropy_sum / n if n > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "mean_entropy": self.mean_entropy}


@dataclass
class _State:
    counters: SelectionCounters = field(default_factory=SelectionCounters)
    warmup_mean: float | None = None  # mean entropy once W samples were seen
    m: np.ndarray | None = None  # moving average of kept samples' probabilities


class SampleSelector:
    """Stateful CEMA gate over a stream of logits batches (not thread-safe: one stream, one selector).

    Example:
        >>> sel = SampleSelector(SelectionConfig.for_classes(10, d_margin=None))
        >>> r = sel.select(np.array([[0.0] * 10, [12.0] + [0.0] * 9, [5.0] + [0.0] * 9]))
        >>> [REASONS[c] for c in r.reason]
        ['unreliable', 'low_info', 'kept']
    """

    def __init__(self, config: SelectionConfig) -> None:
        self.config = config
        self._s = _State()

    @property
    def counters(self) -> SelectionCounters:
        return replace(self._s.counters)

    @property
    def e_max(self) -> float:
        """E_max(t) (Eqn. 4) given the samples seen so far."""
        cfg, c = self.config, self._s.counters
        if not cfg.dynamic or self._s.warmup_mean is None or self._s.warmup_mean <= 0:
            return cfg.e0
        return cfg.e0 * cfg.lam * (c.mean_entropy / self._s.warmup_mean)

    def select(self, logits: np.ndarray) -> SelectionResult:
        """Judge one batch of logits ``[N, C]`` and update the running state."""
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf logits: handled below, not warned about
            ent = softmax_entropy(logits)
        n = ent.shape[0]
        finite = np.isfinite(ent)
        c = self._s.counters
        # Running mean first, then the threshold (official EntropyCriterion.filter_out).
        c.seen += n
        c.nonfinite += int(n - finite.sum())
        c.entropy_sum += float(ent[finite].sum())
        if self._s.warmup_mean is None and c.seen >= self.config.warmup:
            self._s.warmup_mean = c.mean_entropy
        e_max = self.e_max
        reason = np.zeros(n, dtype=np.int8)
        reason[(ent >= e_max) | ~finite] = UNRELIABLE
        if self.config.e_min is not None:
            reason[(reason == KEPT) & (ent <= self.config.e_min)] = LOW_INFO
        passed = np.flatnonzero(reason == KEPT)
        if self.config.d_margin is not None and passed.size:
            probs = softmax(logits[passed])
            if self._s.m is None:
                kept = passed  # no history yet: keep the whole first non-empty batch
            else:
                cos = _cosine(self._s.m, probs)
                redundant = np.abs(cos) >= self.config.d_margin
                reason[passed[redundant]] = REDUNDANT
                kept = passed[~redundant]
                probs = probs[~redundant]
            if kept.size:
                mean_p = probs.mean(axis=0)
                self._s.m = mean_p if self._s.m is None else MOMENTUM * self._s.m + (1 - MOMENTUM) * mean_p
        mask = reason == KEPT
        c.selected += int(mask.sum())
        c.unreliable += int((reason == UNRELIABLE).sum())
        c.low_info += int((reason == LOW_INFO).sum())
        c.redundant += int((reason == REDUNDANT).sum())
        return SelectionResult(mask=mask, entropy=ent, reason=reason, e_max=e_max)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the stream's selection after a restart (JSON-serialisable)."""
        return {
            "config": self.config.describe(),
            "counters": asdict(self._s.counters),
            "warmup_mean": self._s.warmup_mean,
            "m": None if self._s.m is None else self._s.m.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._s = _State(
            counters=SelectionCounters(**state["counters"]),
            warmup_mean=state["warmup_mean"],
            m=None if state["m"] is None else np.asarray(state["m"], dtype=np.float64),
        )


def _cosine(m: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``m`` [C] with each row of ``probs`` [N, C] (torch's eps=1e-8 convention)."""
    num = probs @ m
    den = np.maximum(np.linalg.norm(probs, axis=1) * np.linalg.norm(m), 1e-8)
    return np.asarray(num / den)
