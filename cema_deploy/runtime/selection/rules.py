"""Which samples an edge uploads (paper Sec. 3.2, arXiv 2402.17316), and the rules we compare CEMA's with.

Presets (:meth:`SelectionConfig.preset`; ``edge run --selection``):

* ``cema``: the paper's rules with the setting of the authors' results log: E_min = 0.02 ln C and a dynamic
  E_max with lambda = 1 after a warm-up of W samples (redundancy rule: ``d_margin``). Three rules, in this order;
  a sample is charged to the first that excludes it:

  1. **Dynamic unreliable-sample exclusion** (Eqn. 3-4): drop ``x`` when ``E(x) >= E_max(t)`` with
     ``E_max(t) = E_0 * lambda * (mean entropy of all samples seen so far / mean entropy after the warm-up)``;
     before ``W`` samples have been seen ``E_max = E_0``. As in the official code (``EntropyCriterion``), the
     running mean includes the current batch before the threshold is computed.
  2. **Low-informative-sample exclusion** (Eqn. 5): drop ``x`` when ``E(x) <= E_min``.
  3. **Redundancy exclusion** (EATA Eqn. 6, kept in CEMA's official code): ``m`` is a moving average of the
     probability vectors of kept samples (``m <- 0.9 m + 0.1 mean(p)``); drop ``x`` when ``|cos(m, p(x))| >=
     d_margin``. Before any sample has passed, ``m`` does not exist and the whole first non-empty batch is kept.

* ``eata``: EATA's selection as the paper compares against it: a fixed E_0, no E_min, the same redundancy rule.
  This is also what the official release config (chenyaofo/CEMA ``conf/cema.conf``) runs: it sets
  ``ent_low_margin: null`` and ``warm_up_batch_size: null``, which switch E_min and the dynamic E_max off.
* ``random``: a uniform random share of frames (the official code's commented-out random-upload ablation in
  ``CEMA.infer``); ``entropy-top``: the highest-entropy frames first, a share of each batch (uncertainty
  sampling, as in active learning); ``all``: every frame. Frames a share rule did not draw are ``not_drawn``.
* ``lead`` (beyond the paper; issue 22 item 4): a share of frames drawn where the cloud's teacher disagrees with the
  replica. Each cloud blob may carry per-class *lead weights* (:mod:`cema_deploy.contract.lead`); the runtime passes
  the serving blob's to :meth:`SampleSelector.select`, and frame ``i`` is kept with probability
  ``min(1, s * w[pred_i])``, ``s`` set so that the expected share over the recently served predictions is the
  configured share (:mod:`cema_deploy.runtime.selection.lead`). Without weights (before the first blob that carries
  them, or a cloud that sends none) it is ``random`` at the same share.

Beyond the paper, for every preset: ``stats_share`` sends a uniform random share of the other frames as
*statistics samples* (the cloud estimates BatchNorm statistics from them without the bias of a selective rule);
``budget`` holds the share of frames uploaded, of all kinds, at a target (:mod:`cema_deploy.runtime.selection.budget`);
``shift`` fires a recalibration when the input distribution changes (:mod:`cema_deploy.runtime.selection.shift`).

Defaults scale with the class count ``C``: ``E_0 = 0.4 ln C``, ``E_min = 0.02 ln C``, ``d_margin = 0.05`` at
``C = 1000``. ``d_margin`` was tuned for 1,000 classes; with few classes nearly every softmax vector lies close
to ``m``. ``d_margin="auto"`` keeps the ratio of ``d_margin`` to ``1/sqrt(C)`` (the cosine between a one-hot
and a uniform vector) at its 1,000-class value: ``0.05 * sqrt(1000 / C)``, capped at 1. ``None`` switches it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.selection.budget import BudgetController
from cema_deploy.runtime.selection.entropy import softmax, softmax_entropy
from cema_deploy.runtime.selection.lead import lead_probabilities, update_histogram
from cema_deploy.runtime.selection.shift import ShiftConfig, ShiftDetector

__all__ = [
    "KEPT",
    "LOW_INFO",
    "NOT_DRAWN",
    "PRESETS",
    "REASONS",
    "REDUNDANT",
    "RULES",
    "SHARE_RULES",
    "UNRELIABLE",
    "SampleSelector",
    "SelectionConfig",
    "SelectionConfigError",
    "SelectionCounters",
    "SelectionResult",
    "auto_d_margin",
]

#: Reason codes of :attr:`SelectionResult.reason`.
KEPT, UNRELIABLE, LOW_INFO, REDUNDANT, NOT_DRAWN = 0, 1, 2, 3, 4
REASONS = ("kept", "unreliable", "low_info", "redundant", "not_drawn")
#: ``entropy``: the threshold rules (cema, eata); the others pick a share of each batch.
RULES = ("entropy", "random", "entropy-top", "all", "lead")
PRESETS = ("cema", "eata", "random", "entropy-top", "all", "lead")
#: The rules that draw a share of each batch (they need ``share`` or ``budget``).
SHARE_RULES = ("random", "entropy-top", "lead")
#: The toolkit's default rule (``edge run`` without ``--selection``; the demo's ``random``): the rule that won the
#: accuracy-uplink frontier (``cema-deploy demo --frontier``; README "Which selection rule is the default"). On
#: the demo's streams a uniform share matched or beat CEMA's and EATA's selective rules at every share measured;
#: the paper's rule stays the ``cema`` preset. ``DEFAULT_SHARE``: the share it uploads when none is given (with
#: the calibration batches about 12 % of frames on the demo's 899-frame corruptions).
DEFAULT_PRESET = "random"
DEFAULT_SHARE = 0.1

#: Defaults, as fractions of ln C where the paper scales by the class count.
E0_RATIO = 0.4  # E_0 = 0.4 ln C (Eqn. 3; official config ent_high_margin=0.4)
EMIN_RATIO = 0.02  # E_min = 0.02 ln C (Eqn. 5; the authors' results log, ent_low_margin=0.02)
D_MARGIN_1000 = 0.05  # d_margin at C = 1000 (EATA Eqn. 6)
MOMENTUM = 0.9  # m <- 0.9 m + 0.1 mean(p) (EATA update_model_probs)
DEFAULT_WARMUP = 1000  # W, samples before E_max starts to move


class SelectionConfigError(CemaError, ValueError):
    """A selection threshold out of range."""


def auto_d_margin(num_classes: int) -> float:
    """``0.05 * sqrt(1000 / C)`` capped at 1: the 1,000-class margin rescaled to ``C`` classes."""
    return min(1.0, D_MARGIN_1000 * math.sqrt(1000.0 / num_classes))


def _margin(num_classes: int, d_margin: float | Literal["auto"] | None) -> float | None:
    return auto_d_margin(num_classes) if d_margin == "auto" else d_margin


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """The selection rule and its thresholds. Build it with :meth:`preset` (or :meth:`for_classes`,
    :meth:`eata_style`).

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
    rule: str = "entropy"  # one of RULES
    share: float | None = None  # random / entropy-top / lead: share of each batch's frames drawn
    stats_share: float = 0.0  # beyond the paper: share of the other frames sent as statistics samples
    budget: float | None = None  # beyond the paper: target share of frames uploaded, all kinds
    shift: ShiftConfig | None = None  # beyond the paper: recalibrate on a detected shift; None = off
    seed: int = 0  # seeds the share rules' and the statistics sampling's draws

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
        if self.rule not in RULES:
            raise SelectionConfigError(f"rule must be one of {RULES}, got {self.rule!r}.")
        if self.rule in SHARE_RULES and self.share is None and self.budget is None:
            raise SelectionConfigError(f"The {self.rule} rule needs a share (--upload-share) or a budget.")
        for name in ("share", "budget"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise SelectionConfigError(f"{name} must be a share in (0, 1], got {v}.")
        if not 0 <= self.stats_share < 1:
            raise SelectionConfigError(f"stats_share must be in [0, 1), got {self.stats_share}.")

    @classmethod
    def preset(
        cls,
        name: str,
        num_classes: int,
        *,
        e0_ratio: float = E0_RATIO,
        e_min_ratio: float | None = EMIN_RATIO,
        lam: float = 1.0,
        warmup: int = DEFAULT_WARMUP,
        d_margin: float | Literal["auto"] | None = "auto",
        share: float | None = None,
        stats_share: float = 0.0,
        budget: float | None = None,
        shift: ShiftConfig | None = None,
        seed: int = 0,
    ) -> SelectionConfig:
        """A preset of :data:`PRESETS` (see the module docstring) with the options that apply to it."""
        extra: dict[str, Any] = {"stats_share": stats_share, "budget": budget, "shift": shift, "seed": seed}
        e0 = e0_ratio * math.log(num_classes)
        if name == "cema":
            base = cls.for_classes(
                num_classes, e0_ratio=e0_ratio, lam=lam, warmup=warmup, e_min_ratio=e_min_ratio, d_margin=d_margin
            )
            return replace(base, **extra)
        if name == "eata":
            return replace(cls.eata_style(num_classes, e0_ratio=e0_ratio, d_margin=d_margin), **extra)
        if name in (*SHARE_RULES, "all"):
            return cls(num_classes=num_classes, e0=e0, dynamic=False, rule=name, share=share, **extra)
        raise SelectionConfigError(f"Unknown selection preset {name!r}; expected one of {', '.join(PRESETS)}.")

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
        """CEMA's rules (the ``cema`` preset) for ``num_classes`` classes."""
        ln_c = math.log(num_classes)
        return cls(
            num_classes=num_classes,
            e0=e0_ratio * ln_c,
            lam=lam,
            warmup=warmup,
            dynamic=True,
            e_min=None if e_min_ratio is None else e_min_ratio * ln_c,
            d_margin=_margin(num_classes, d_margin),
        )

    @classmethod
    def eata_style(
        cls, num_classes: int, *, e0_ratio: float = E0_RATIO, d_margin: float | Literal["auto"] | None = "auto"
    ) -> SelectionConfig:
        """EATA's selection (the ``eata`` preset): fixed ``E_0``, no ``E_min``, the same redundancy rule."""
        return cls(
            num_classes=num_classes,
            e0=e0_ratio * math.log(num_classes),
            dynamic=False,
            e_min=None,
            d_margin=_margin(num_classes, d_margin),
        )

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, for logs and JSON output."""
        return asdict(self)


@dataclass(frozen=True)
class SelectionResult:
    """Decision for one batch: ``mask[i]`` is True when sample ``i`` goes up for adaptation; ``reason`` holds the
    rule codes. ``stats_mask[i]`` (disjoint from ``mask``; None: no statistics sampling) marks frames drawn to go
    up as statistics samples; ``shift`` is True when the shift detector fired on this batch (the runtime then
    sends the batch whole as a recalibration batch)."""

    mask: np.ndarray  # bool [N]
    entropy: np.ndarray  # float64 [N]
    reason: np.ndarray  # int8 [N], one of KEPT / UNRELIABLE / LOW_INFO / REDUNDANT / NOT_DRAWN
    e_max: float  # the threshold this batch was judged against (inf for the share rules)
    stats_mask: np.ndarray | None = None  # bool [N], statistics samples (beyond the paper)
    shift: bool = False  # a distribution shift was detected on this batch (beyond the paper)

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


@dataclass
class SelectionCounters:
    """Running totals; ``seen == selected + unreliable + low_info + redundant + not_drawn`` always holds.

    ``nonfinite`` counts samples whose logits gave no finite entropy (NaN/Inf logits): they are charged to
    ``unreliable`` and left out of ``entropy_sum`` and ``mean_entropy``, so one bad output cannot poison E_max(t).
    ``uploaded`` counts every frame the edge sends (selected, statistics, whole calibration batches);
    ``statistics`` and ``calibration`` the frames sent as those kinds; ``shifts`` the detector's firings.
    ``lead_weighted`` counts the frames the ``lead`` rule judged with the cloud's weights (not uniformly).
    """

    seen: int = 0
    selected: int = 0
    unreliable: int = 0
    low_info: int = 0
    redundant: int = 0
    entropy_sum: float = 0.0
    nonfinite: int = 0
    not_drawn: int = 0
    statistics: int = 0
    calibration: int = 0
    uploaded: int = 0
    shifts: int = 0
    lead_weighted: int = 0

    @property
    def mean_entropy(self) -> float:
        n = self.seen - self.nonfinite
        return self.entropy_sum / n if n > 0 else 0.0

    @property
    def uploaded_share(self) -> float:
        return self.uploaded / self.seen if self.seen else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "mean_entropy": self.mean_entropy, "uploaded_share": self.uploaded_share}


@dataclass
class _State:
    counters: SelectionCounters = field(default_factory=SelectionCounters)
    warmup_mean: float | None = None  # mean entropy once W samples were seen
    m: np.ndarray | None = None  # moving average of kept samples' probabilities
    carry: float = 0.0  # fractional frames owed to a share rule
    stats_carry: float = 0.0  # fractional frames owed to statistics sampling
    scale: float = 1.0  # E_max scale set by the budget controller
    lead_hist: np.ndarray | None = None  # lead rule: decayed histogram of the served predictions


class SampleSelector:
    """Stateful gate over a stream of logits batches (not thread-safe: one stream, one selector).

    Example:
        >>> sel = SampleSelector(SelectionConfig.for_classes(10, d_margin=None))
        >>> r = sel.select(np.array([[0.0] * 10, [12.0] + [0.0] * 9, [5.0] + [0.0] * 9]))
        >>> [REASONS[c] for c in r.reason]
        ['unreliable', 'low_info', 'kept']
    """

    def __init__(self, config: SelectionConfig) -> None:
        self.config = config
        self._s = _State()
        self._rng = np.random.default_rng(config.seed)
        self.budget = BudgetController(config.budget) if config.budget is not None else None
        self.shift = ShiftDetector(config.shift) if config.shift is not None else None

    @property
    def counters(self) -> SelectionCounters:
        return replace(self._s.counters)

    @property
    def e_max(self) -> float:
        """E_max(t) (Eqn. 4) given the samples seen so far, times the budget's scale when a budget steers it."""
        cfg, c = self.config, self._s.counters
        if not cfg.dynamic or self._s.warmup_mean is None or self._s.warmup_mean <= 0:
            return cfg.e0 * self._s.scale
        return cfg.e0 * cfg.lam * (c.mean_entropy / self._s.warmup_mean) * self._s.scale

    def select(
        self,
        logits: np.ndarray,
        *,
        images: np.ndarray | None = None,
        calibration: bool = False,
        lead: Sequence[float] | None = None,
    ) -> SelectionResult:
        """Judge one batch of logits ``[N, C]`` and update the running state.

        ``images`` (the uint8 frames at model size) feed the shift detector. ``calibration=True`` says the runtime
        sends this batch whole as a calibration batch: the mask still says which frames the rule chose (they are
        adapted on), all ``N`` frames count as uploaded, and the shift detector takes a new reference from here.
        ``lead``: the lead weights of the blob whose parameters produced ``logits`` (``C`` values, validated with
        the blob), used by the ``lead`` rule and ignored by the others; None: that rule draws uniformly.
        """
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf logits: handled below, not warned about
            ent = softmax_entropy(logits)
        n = ent.shape[0]
        finite = np.isfinite(ent)
        c, cfg = self._s.counters, self.config
        want = self.budget.request() if self.budget is not None else None
        # Running mean first, then the threshold (official EntropyCriterion.filter_out).
        c.seen += n
        c.nonfinite += int(n - finite.sum())
        c.entropy_sum += float(ent[finite].sum())
        if self._s.warmup_mean is None and c.seen >= cfg.warmup:
            self._s.warmup_mean = c.mean_entropy
        if cfg.rule == "entropy":
            if self.budget is not None and want is not None:
                self.budget.observe(ent)
                self._s.scale = 1.0
                self._s.scale = self.budget.e_max_scale(self.e_max, cfg.e_min, want)
            reason, e_max = self._entropy_rules(logits, ent, finite)
        else:
            reason, e_max = self._share_rule(logits, ent, finite, want, lead), math.inf
        mask = reason == KEPT
        shift = False
        if self.shift is not None and images is not None and not calibration:
            with np.errstate(invalid="ignore", over="ignore"):
                probs = softmax(logits) if n else None
            shift = self.shift.update(images, probs)
        if (calibration or shift) and self.shift is not None:
            self.shift.restart()
            if images is not None:
                self.shift.update(images, softmax(logits) if n else None)  # first frames of the new reference
        stats = self._statistics(mask) if cfg.stats_share > 0 and not (calibration or shift) else None
        for code, name in (
            (KEPT, "selected"),
            (UNRELIABLE, "unreliable"),
            (LOW_INFO, "low_info"),
            (REDUNDANT, "redundant"),
            (NOT_DRAWN, "not_drawn"),
        ):
            setattr(c, name, getattr(c, name) + int((reason == code).sum()))
        whole = calibration or shift
        sent = n if whole else int(mask.sum()) + (int(stats.sum()) if stats is not None else 0)
        c.uploaded += sent
        c.calibration += n if whole else 0
        c.statistics += int(stats.sum()) if stats is not None else 0
        c.shifts += int(shift)
        if self.budget is not None:
            self.budget.record(n, sent)
        return SelectionResult(mask=mask, entropy=ent, reason=reason, e_max=e_max, stats_mask=stats, shift=shift)

    def _entropy_rules(self, logits: np.ndarray, ent: np.ndarray, finite: np.ndarray) -> tuple[np.ndarray, float]:
        cfg = self.config
        e_max = self.e_max
        reason = np.zeros(ent.shape[0], dtype=np.int8)
        reason[(ent >= e_max) | ~finite] = UNRELIABLE
        if cfg.e_min is not None:
            reason[(reason == KEPT) & (ent <= cfg.e_min)] = LOW_INFO
        passed = np.flatnonzero(reason == KEPT)
        if cfg.d_margin is not None and passed.size:
            probs = softmax(logits[passed])
            if self._s.m is None:
                kept = passed  # no history yet: keep the whole first non-empty batch
            else:
                redundant = np.abs(_cosine(self._s.m, probs)) >= cfg.d_margin
                reason[passed[redundant]] = REDUNDANT
                kept = passed[~redundant]
                probs = probs[~redundant]
            if kept.size:
                mean_p = probs.mean(axis=0)
                self._s.m = mean_p if self._s.m is None else MOMENTUM * self._s.m + (1 - MOMENTUM) * mean_p
        return reason, e_max

    def _share_rule(
        self,
        logits: np.ndarray,
        ent: np.ndarray,
        finite: np.ndarray,
        want: float | None,
        lead: Sequence[float] | None,
    ) -> np.ndarray:
        """random / entropy-top / all: draw ``share x N`` frames (fractions carried to the next batch); lead: keep
        each frame with its lead probability (random without weights)."""
        cfg, n = self.config, ent.shape[0]
        reason = np.full(n, NOT_DRAWN, dtype=np.int8)
        reason[~finite] = UNRELIABLE
        ok = np.flatnonzero(finite)
        if cfg.rule == "all":
            reason[ok] = KEPT
            return reason
        share = want if want is not None else cfg.share
        assert share is not None  # checked in SelectionConfig
        if cfg.rule == "lead" and ok.size:
            pred = np.asarray(logits)[ok].argmax(axis=1)
            self._s.lead_hist = update_histogram(self._s.lead_hist, pred, cfg.num_classes)
            p = None if lead is None else lead_probabilities(np.asarray(lead, np.float64), self._s.lead_hist, pred,
                                                              share)  # fmt: skip
            if p is not None:
                self._s.counters.lead_weighted += int(ok.size)
                reason[ok[self._rng.random(ok.size) < p]] = KEPT
                return reason
        self._s.carry += share * n
        k = min(int(self._s.carry), ok.size)
        self._s.carry -= int(self._s.carry)
        if cfg.rule in ("random", "lead"):
            picked = self._rng.choice(ok, size=k, replace=False) if k else ok[:0]
        else:  # entropy-top: highest entropy first
            picked = ok[np.argsort(-ent[ok], kind="stable")[:k]]
        reason[picked] = KEPT
        return reason

    def _statistics(self, mask: np.ndarray) -> np.ndarray:
        """A uniform random ``stats_share`` of the frames not selected (fractions carried)."""
        free = np.flatnonzero(~mask)
        self._s.stats_carry += self.config.stats_share * mask.shape[0]
        k = min(int(self._s.stats_carry), free.size)
        self._s.stats_carry -= int(self._s.stats_carry)
        out = np.zeros(mask.shape[0], bool)
        if k:
            out[self._rng.choice(free, size=k, replace=False)] = True
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the stream's selection after a restart (JSON-serialisable)."""
        cfg = self.config.describe()
        return {
            "config": cfg,
            "counters": asdict(self._s.counters),
            "warmup_mean": self._s.warmup_mean,
            "m": None if self._s.m is None else self._s.m.tolist(),
            "carry": self._s.carry,
            "stats_carry": self._s.stats_carry,
            "scale": self._s.scale,
            "lead_hist": None if self._s.lead_hist is None else self._s.lead_hist.tolist(),
            "rng": self._rng.bit_generator.state,
            "budget": None if self.budget is None else self.budget.state_dict(),
            "shift": None if self.shift is None else self.shift.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._s = _State(
            counters=SelectionCounters(**state["counters"]),
            warmup_mean=state["warmup_mean"],
            m=None if state["m"] is None else np.asarray(state["m"], dtype=np.float64),
            carry=float(state.get("carry", 0.0)),
            stats_carry=float(state.get("stats_carry", 0.0)),
            scale=float(state.get("scale", 1.0)),
            lead_hist=None if state.get("lead_hist") is None else np.asarray(state["lead_hist"], dtype=np.float64),
        )
        if state.get("rng") is not None:
            self._rng.bit_generator.state = state["rng"]
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        if self.shift is not None and state.get("shift") is not None:
            self.shift.load_state_dict(state["shift"])


def _cosine(m: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``m`` [C] with each row of ``probs`` [N, C] (torch's eps=1e-8 convention)."""
    num = probs @ m
    den = np.maximum(np.linalg.norm(probs, axis=1) * np.linalg.norm(m), 1e-8)
    return np.asarray(num / den)
