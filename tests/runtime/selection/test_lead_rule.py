"""The ``lead`` upload rule (beyond the paper; issue 22 item 4): frames kept in proportion to the cloud's per-class
lead weights of the class the edge predicts, at the configured share; uniform before any weights arrive."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cema_deploy.runtime.selection.lead import LEAD_MEMORY, lead_scale
from cema_deploy.runtime.selection.rules import KEPT, SampleSelector, SelectionConfig, SelectionConfigError

C = 5
#: Class mix of the constructed predictions and the cloud's weights (mean 1 over the classes). Class 4's weight is
#: far above the mean: share * w / mean exceeds 1 there at share 0.25, so the clipping correction is exercised.
MIX = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
WEIGHTS = (0.2, 0.5, 0.8, 0.5, 3.0)


def _logits(pred: np.ndarray) -> np.ndarray:
    """Logits whose argmax is ``pred`` (confident, so only the predicted class matters)."""
    z = np.zeros((len(pred), C))
    z[np.arange(len(pred)), pred] = 6.0
    return z


def _stream(batches: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(C, size=64, p=MIX) for _ in range(batches)]


def _lead(share: float, seed: int = 0) -> SampleSelector:
    return SampleSelector(SelectionConfig.preset("lead", C, share=share, seed=seed))


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_the_expected_share_is_the_configured_share_within_the_binomial_tolerance(share: float) -> None:
    sel = _lead(share, seed=3)
    stream = _stream(400, seed=11)  # 25,600 frames
    kept, seen = np.zeros(C), np.zeros(C)
    for pred in stream:
        r = sel.select(_logits(pred), lead=WEIGHTS)
        kept += np.bincount(pred[r.mask], minlength=C)
        seen += np.bincount(pred, minlength=C)
    n = int(seen.sum())
    assert sel.counters.lead_weighted == n
    # Bernoulli draws with probabilities p_i whose mean is the share: the count's standard deviation is at most
    # sqrt(n * share * (1 - share)); 4 of them (a 1-in-15,000 false alarm for a fixed seed that never changes).
    tolerance = 4 * math.sqrt(n * share * (1 - share))
    assert abs(kept.sum() - share * n) <= tolerance, (kept.sum(), share * n, tolerance)
    # and the probabilities follow the weights: per class, kept / seen = min(1, s * w_c) for one s
    s = lead_scale(np.asarray(WEIGHTS), MIX, share)
    assert s is not None
    for c in range(C):
        p = min(1.0, s * WEIGHTS[c])
        sd = math.sqrt(seen[c] * p * (1 - p))
        assert abs(kept[c] - p * seen[c]) <= 4 * sd + 1, (c, kept[c], p * seen[c])
    assert kept[4] / seen[4] > 3 * kept[0] / seen[0]  # the high-weight class goes up far more often


def test_clipping_at_one_does_not_lower_the_share() -> None:
    w, hist = np.array([0.1, 0.1, 10.0]), np.array([10.0, 10.0, 1.0])
    s = lead_scale(w, hist, 0.2)
    assert s is not None
    assert float((hist * np.minimum(1.0, s * w)).sum() / hist.sum()) == pytest.approx(0.2)
    assert s > 0.2 / float((hist * w).sum() / hist.sum())  # above the unclipped scale: class 2 is clipped at 1
    # every frame of a positive-weight class kept and still below the share: all of them, nothing else
    assert lead_scale(np.array([0.0, 0.0, 1.0]), hist, 0.5) == math.inf
    assert lead_scale(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0]), 0.5) is None  # nothing to steer by


def test_without_weights_it_is_random_at_the_share() -> None:
    lead, rand = _lead(0.25, seed=5), SampleSelector(SelectionConfig.preset("random", C, share=0.25, seed=5))
    for pred in _stream(20, seed=2):
        a, b = lead.select(_logits(pred)), rand.select(_logits(pred))
        assert np.array_equal(a.mask, b.mask) and a.mask.sum() == 16  # exactly share x 64, as random draws
    assert lead.counters.lead_weighted == 0 and lead.counters.selected == 20 * 16


def test_weights_no_served_prediction_has_fall_back_to_random() -> None:
    sel = _lead(0.25, seed=1)
    pred = np.zeros(64, dtype=np.int64)  # every frame predicted as class 0, whose weight is 0
    r = sel.select(_logits(pred), lead=(0.0, 1.0, 1.0, 1.0, 2.0))
    assert int(r.mask.sum()) == 16 and sel.counters.lead_weighted == 0


def test_other_rules_ignore_the_weights() -> None:
    a = SampleSelector(SelectionConfig.preset("random", C, share=0.25, seed=4))
    b = SampleSelector(SelectionConfig.preset("random", C, share=0.25, seed=4))
    pred = _stream(1, seed=0)[0]
    assert np.array_equal(a.select(_logits(pred), lead=WEIGHTS).mask, b.select(_logits(pred)).mask)


def test_the_histogram_survives_a_restart_and_the_rule_needs_a_share() -> None:
    sel = _lead(0.1, seed=0)
    for pred in _stream(3, seed=1):
        sel.select(_logits(pred), lead=WEIGHTS)
    again = _lead(0.1, seed=0)
    again.load_state_dict(sel.state_dict())
    pred = _stream(1, seed=9)[0]
    assert np.array_equal(sel.select(_logits(pred), lead=WEIGHTS).mask, again.select(_logits(pred), lead=WEIGHTS).mask)
    assert sel.state_dict()["lead_hist"] is not None and LEAD_MEMORY > 64
    with pytest.raises(SelectionConfigError, match="lead rule needs a share"):
        SelectionConfig(num_classes=C, e0=1.0, rule="lead")
    r = _lead(0.5).select(np.array([[np.nan] * C, [6.0, 0, 0, 0, 0]]), lead=WEIGHTS)
    assert r.reason[0] != KEPT  # a non-finite output is never drawn
