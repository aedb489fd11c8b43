"""CEMA's selection rules pinned to hand-computed values on fixed logits (paper Eqn. 3-5, EATA Eqn. 6)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.selection.entropy import softmax_entropy
from cema_deploy.runtime.selection.rules import (
    KEPT,
    LOW_INFO,
    REASONS,
    REDUNDANT,
    UNRELIABLE,
    SampleSelector,
    SelectionConfig,
    SelectionConfigError,
    auto_d_margin,
)


def _h(z: list[float]) -> float:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p if q > 0)


def _logits_with_entropy(targets: list[float], c: int = 10) -> np.ndarray:
    """Rows [a, 0, ..., 0] with a solved (bisection) so that each row's entropy equals its target."""
    return np.array([_row_with_entropy(t, c) for t in targets])


@functools.cache
def _row_with_entropy(t: float, c: int) -> tuple[float, ...]:
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _h([mid] + [0.0] * (c - 1)) > t:
            lo = mid
        else:
            hi = mid
    return (lo,) + (0.0,) * (c - 1)


def _check_counters(sel: SampleSelector) -> None:
    c = sel.counters
    assert c.seen == c.selected + c.unreliable + c.low_info + c.redundant


def test_defaults_follow_the_paper() -> None:
    c = SelectionConfig.for_classes(1000)
    assert c.e0 == pytest.approx(0.4 * math.log(1000)) and c.e_min == pytest.approx(0.02 * math.log(1000))
    assert c.lam == 1.0 and c.dynamic and c.warmup == 1000 and c.d_margin == pytest.approx(0.05)
    assert auto_d_margin(10) == pytest.approx(0.05 * 10) and auto_d_margin(2) == 1.0
    assert SelectionConfig.for_classes(10, d_margin=None).d_margin is None
    assert SelectionConfig.for_classes(10, d_margin=0.3, e_min_ratio=None).e_min is None


def test_bad_thresholds_are_cema_errors() -> None:
    with pytest.raises(SelectionConfigError, match="E_min must be in"):
        SelectionConfig(num_classes=10, e0=0.5, e_min=0.5)
    with pytest.raises(CemaError, match="d_margin"):
        SelectionConfig(num_classes=10, e0=0.5, d_margin=1.5)
    with pytest.raises(ValueError, match="num_classes"):  # also a ValueError, for callers that catch that
        SelectionConfig(num_classes=1, e0=0.5)


def test_dynamic_e_max_before_and_after_warmup() -> None:
    ln = math.log(10)
    cfg = SelectionConfig(num_classes=10, e0=0.4 * ln, lam=1.0, warmup=4, e_min=0.02 * ln, d_margin=None)
    sel = SampleSelector(cfg)
    # batch 1 (3 samples, still in warm-up): E_max = E0 = 0.921
    b1 = [0.2, 0.5, 1.2]
    r1 = sel.select(_logits_with_entropy(b1))
    assert r1.e_max == pytest.approx(cfg.e0) and sel.e_max == pytest.approx(cfg.e0)
    assert list(r1.reason) == [KEPT, KEPT, UNRELIABLE]  # 1.2 >= 0.921
    # batch 2 completes the warm-up at 5 samples: warm-up mean = mean of all 5 (the batch is counted first)
    b2 = [0.04, 0.9]
    r2 = sel.select(_logits_with_entropy(b2))
    warm = sum(b1 + b2) / 5  # 0.568
    assert r2.e_max == pytest.approx(cfg.e0 * 1.0 * (warm / warm))
    assert list(r2.reason) == [LOW_INFO, KEPT]  # 0.04 <= E_min = 0.046; 0.9 < 0.921
    # batch 3: running mean includes it; E_max = E0 * lambda * mean_all / mean_warm = 0.921 * 0.48 / 0.568
    b3 = [0.1, 0.1, 0.8]
    r3 = sel.select(_logits_with_entropy(b3))
    mean_all = sum(b1 + b2 + b3) / 8
    assert r3.e_max == pytest.approx(cfg.e0 * mean_all / warm, rel=1e-9)
    assert r3.e_max == pytest.approx(0.7783, abs=1e-4)
    assert list(r3.reason) == [KEPT, KEPT, UNRELIABLE]  # 0.8 >= 0.778 although 0.8 < E0: the threshold moved
    c = sel.counters
    assert (c.seen, c.selected, c.unreliable, c.low_info, c.redundant) == (8, 5, 2, 1, 0)
    assert c.mean_entropy == pytest.approx(mean_all)
    _check_counters(sel)


def test_lambda_scales_e_max_from_the_warmup_batch_on() -> None:
    cfg = SelectionConfig(num_classes=10, e0=1.0, lam=0.5, warmup=4, e_min=None, d_margin=None)
    sel = SampleSelector(cfg)
    assert sel.select(_logits_with_entropy([0.6, 0.6, 0.6])).e_max == pytest.approx(1.0)
    r = sel.select(_logits_with_entropy([0.6, 0.6]))  # warm-up complete: E_max = 1.0 * 0.5 * 1
    assert r.e_max == pytest.approx(0.5) and list(r.reason) == [UNRELIABLE, UNRELIABLE]
    r = sel.select(_logits_with_entropy([1.6]))  # mean = (3.0 + 1.6) / 6 = 0.7667; E_max = 0.5 * 0.7667 / 0.6
    assert r.e_max == pytest.approx(0.5 * (4.6 / 6) / 0.6)


def test_thresholds_are_inclusive_as_in_the_official_code() -> None:
    """Kept only when E < E_max (``ents < ent_high_margin``) and E > E_min (``remain_ent > ent_low_margin``)."""
    z = np.array([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    e = softmax_entropy(z)
    cfg = SelectionConfig(num_classes=3, e0=float(e[0]), warmup=10**9, e_min=float(e[1]), d_margin=None)
    r = SampleSelector(cfg).select(z)
    assert list(r.reason) == [UNRELIABLE, LOW_INFO, UNRELIABLE]  # e[2] > e[0] > e[1]
    r = SampleSelector(cfg).select(np.array([[3.0, 0.0, 0.0]]))
    assert list(r.reason) == [KEPT] and r.e_max == float(e[0])


def test_a_sample_is_charged_to_the_first_rule_that_excludes_it() -> None:
    # E_min >= the entropy of a sample that also has E >= E_max is impossible (E_min < E_0), so check the
    # redundancy rule is never charged for samples the entropy rules removed.
    cfg = SelectionConfig(num_classes=3, e0=0.9, warmup=10**9, e_min=0.05, d_margin=0.01)
    sel = SampleSelector(cfg)
    sel.select(np.log(np.array([[0.8, 0.15, 0.05]])))  # starts m
    r = sel.select(np.log(np.array([[0.34, 0.33, 0.33], [0.999, 0.0005, 0.0005], [0.8, 0.15, 0.05]])))
    assert [REASONS[c] for c in r.reason] == ["unreliable", "low_info", "redundant"]
    _check_counters(sel)


def test_redundancy_rule_and_moving_average_by_hand() -> None:
    cfg = SelectionConfig(num_classes=3, e0=10.0, warmup=10**9, e_min=None, d_margin=0.9)
    sel = SampleSelector(cfg)
    z1 = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
    r1 = sel.select(z1)
    assert r1.mask.all()  # no history: the first non-empty batch is kept whole
    m = np.array([0.65, 0.25, 0.10])  # mean of the two probability vectors
    assert np.allclose(sel.state_dict()["m"], m)
    z2 = np.log(np.array([[0.65, 0.25, 0.10], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]]))
    # cos(m, p) by hand: |m| = sqrt(.4225 + .0625 + .01) = 0.70356
    #   p1 = m                     -> 1.0       >= 0.9: redundant
    #   p2 = (.1, .1, .8)  |p2| = 0.81240, m.p2 = .065 + .025 + .08 = .17   -> 0.29743  kept
    #   p3 = (.2, .7, .1)  |p3| = 0.73485, m.p3 = .13 + .175 + .01 = .315   -> 0.60927  kept
    r2 = sel.select(z2)
    assert list(r2.reason) == [REDUNDANT, KEPT, KEPT]
    # m <- 0.9 m + 0.1 mean(p2, p3) = 0.9 (.65, .25, .10) + 0.1 (.15, .40, .45) = (.600, .265, .135)
    assert np.allclose(sel.state_dict()["m"], [0.600, 0.265, 0.135])
    # a batch with nothing kept leaves m unchanged
    r3 = sel.select(np.log(np.array([[0.600, 0.265, 0.135]])))
    assert list(r3.reason) == [REDUNDANT]
    assert np.allclose(sel.state_dict()["m"], [0.600, 0.265, 0.135])
    c = sel.counters
    assert (c.seen, c.selected, c.redundant) == (6, 4, 2)
    _check_counters(sel)


def test_first_non_empty_batch_is_kept_whole_after_empty_ones() -> None:
    cfg = SelectionConfig(num_classes=3, e0=0.5, warmup=10**9, e_min=None, d_margin=0.05)
    sel = SampleSelector(cfg)
    assert sel.select(np.zeros((0, 3))).mask.shape == (0,)
    r = sel.select(np.zeros((4, 3)))  # all uniform: unreliable, so nothing passed and m stays unset
    assert list(r.reason) == [UNRELIABLE] * 4 and sel.state_dict()["m"] is None
    confident = np.log(np.array([[0.9, 0.05, 0.05], [0.92, 0.04, 0.04], [0.05, 0.9, 0.05]]))
    r = sel.select(confident)  # cosines among these are far above 0.05, yet all are kept: no history yet
    assert r.mask.all()
    assert not sel.select(confident).mask.any()  # the same batch again: every one is redundant now
    _check_counters(sel)


def test_non_finite_logits_are_unreliable_and_do_not_poison_the_running_mean() -> None:
    cfg = SelectionConfig(num_classes=3, e0=1.0, warmup=2, e_min=None, d_margin=None)
    sel = SampleSelector(cfg)
    z = np.array([[2.0, 0.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [1.0, 0.0, 0.0]])
    r = sel.select(z)
    assert list(r.reason) == [KEPT, UNRELIABLE, UNRELIABLE, KEPT]
    c = sel.counters
    assert c.nonfinite == 2 and c.mean_entropy == pytest.approx((_h([2, 0, 0]) + _h([1, 0, 0])) / 2)
    assert math.isfinite(sel.e_max)
    _check_counters(sel)


def test_counters_add_up_on_a_random_stream() -> None:
    rng = np.random.default_rng(0)
    sel = SampleSelector(SelectionConfig.for_classes(10, warmup=50))
    for n in (0, 1, 7, 32, 64, 3):
        r = sel.select(rng.normal(size=(n, 10)) * rng.uniform(0.1, 6))
        assert r.mask.shape == r.reason.shape == r.entropy.shape == (n,)
        assert np.array_equal(r.mask, r.reason == KEPT)
        _check_counters(sel)
    assert sel.counters.seen == 107


def test_eata_style_has_no_dynamic_threshold_and_no_e_min() -> None:
    cfg = SelectionConfig.eata_style(10, d_margin=None)
    assert not cfg.dynamic and cfg.e_min is None and cfg.e0 == pytest.approx(0.4 * math.log(10))
    sel = SampleSelector(cfg)
    r = sel.select(_logits_with_entropy([0.001, 0.5, 0.95] * 400))  # well past any warm-up
    assert r.e_max == pytest.approx(0.4 * math.log(10))
    assert list(r.reason[:3]) == [KEPT, KEPT, UNRELIABLE]  # 0.001 is kept: no E_min
    r = sel.select(_logits_with_entropy([0.1] * 500))  # running mean drops; E_max must not follow
    assert r.e_max == pytest.approx(0.4 * math.log(10)) and r.mask.all()
    assert sel.counters.low_info == 0
    assert SelectionConfig.eata_style(10).d_margin == pytest.approx(auto_d_margin(10))


def test_state_dict_round_trip_through_json() -> None:
    rng = np.random.default_rng(1)
    cfg = SelectionConfig.for_classes(10, warmup=40, d_margin=0.6)
    sel = SampleSelector(cfg)
    for _ in range(3):
        sel.select(rng.normal(size=(32, 10)) * 3)
    state = json.loads(json.dumps(sel.state_dict()))
    assert state["config"] == cfg.describe() and state["warmup_mean"] is not None
    restored = SampleSelector(cfg)
    restored.load_state_dict(state)
    assert restored.counters == sel.counters and restored.e_max == sel.e_max
    for _ in range(3):
        z = rng.normal(size=(32, 10)) * 3
        a, b = sel.select(z), restored.select(z)
        assert np.array_equal(a.reason, b.reason) and a.e_max == b.e_max
    assert restored.state_dict() == sel.state_dict()
