"""CEMA's selection rules pinned to hand-computed values on fixed logits (paper Eqn. 3-5, EATA Eqn. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cema_deploy.runtime.entropy import softmax_entropy
from cema_deploy.runtime.selection import (
    KEPT,
    LOW_INFO,
    REDUNDANT,
    UNRELIABLE,
    SampleSelector,
    SelectionConfig,
    auto_d_margin,
)


def _h(z: list[float]) -> float:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p if q > 0)


def test_entropy_matches_the_formula_and_is_stable() -> None:
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1e4, 0.0, -1e4], [-5.0, 7.5, 0.25]])
    want = [_h(list(r)) for r in z]
    assert np.allclose(softmax_entropy(z), want, atol=1e-12)
    assert softmax_entropy(z)[1] == pytest.approx(math.log(3))
    assert softmax_entropy(np.zeros((0, 5))).shape == (0,)
    big = np.random.default_rng(0).normal(size=(1000, 1000)) * 50
    e = softmax_entropy(big)
    assert e.shape == (1000,) and np.isfinite(e).all() and (e >= 0).all() and (e <= math.log(1000) + 1e-9).all()


def test_defaults_follow_the_paper() -> None:
    c = SelectionConfig.for_classes(1000)
    assert c.e0 == pytest.approx(0.4 * math.log(1000)) and c.e_min == pytest.approx(0.02 * math.log(1000))
    assert c.lam == 1.0 and c.dynamic and c.d_margin == pytest.approx(0.05)
    assert auto_d_margin(10) == pytest.approx(0.05 * 10)
    e = SelectionConfig.eata_style(10)
    assert not e.dynamic and e.e_min is None and e.e0 == pytest.approx(0.4 * math.log(10))


def _logits_with_entropy(targets: list[float], c: int = 10) -> np.ndarray:
    """Rows [a, 0, ..., 0] with a solved so that the entropy equals each target."""
    rows = []
    for t in targets:
        lo, hi = 0.0, 50.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if _h([mid] + [0.0] * (c - 1)) > t:
                lo = mid
            else:
                hi = mid
        rows.append([lo] + [0.0] * (c - 1))
    return np.array(rows)


def test_dynamic_e_max_before_and_after_warmup() -> None:
    ln = math.log(10)
    cfg = SelectionConfig(num_classes=10, e0=0.4 * ln, lam=1.0, warmup=4, e_min=0.02 * ln, d_margin=None)
    sel = SampleSelector(cfg)
    # batch 1 (3 samples, still in warm-up): E_max = E0
    b1 = [0.2, 0.5, 1.2]
    r1 = sel.select(_logits_with_entropy(b1))
    assert r1.e_max == pytest.approx(cfg.e0)
    assert list(r1.reason) == [KEPT, KEPT, UNRELIABLE]  # 1.2 >= 0.921
    # batch 2 completes the warm-up at 5 samples: warm-up mean = mean of all 5 (the batch is counted first)
    b2 = [0.04, 0.9]
    r2 = sel.select(_logits_with_entropy(b2))
    warm = sum(b1 + b2) / 5
    assert r2.e_max == pytest.approx(cfg.e0 * 1.0 * (warm / warm))
    assert list(r2.reason) == [LOW_INFO, KEPT]  # 0.04 <= E_min = 0.046; 0.9 < 0.921
    # batch 3: running mean includes it; E_max = E0 * lambda * mean_all / mean_warm
    b3 = [0.3, 0.3, 0.3]
    r3 = sel.select(_logits_with_entropy(b3))
    mean_all = sum(b1 + b2 + b3) / 8
    assert r3.e_max == pytest.approx(cfg.e0 * mean_all / warm, rel=1e-6)
    c = sel.counters
    assert (c.seen, c.selected, c.unreliable, c.low_info, c.redundant) == (8, 6, 1, 1, 0)
    assert c.seen == c.selected + c.unreliable + c.low_info + c.redundant


def test_redundancy_rule_and_moving_average_by_hand() -> None:
    cfg = SelectionConfig(num_classes=3, e0=10.0, warmup=10**9, e_min=None, d_margin=0.9)
    sel = SampleSelector(cfg)
    z1 = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
    r1 = sel.select(z1)
    assert r1.mask.all()  # no history: the first non-empty batch is kept whole
    m = np.exp(z1).mean(0)
    z2 = np.log(np.array([[0.65, 0.25, 0.10], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]]))
    p2 = np.exp(z2)
    cos = p2 @ m / (np.linalg.norm(p2, axis=1) * np.linalg.norm(m))
    r2 = sel.select(z2)
    assert list(r2.reason) == [REDUNDANT if abs(c) >= 0.9 else KEPT for c in cos] == [REDUNDANT, KEPT, KEPT]
    m = 0.9 * m + 0.1 * p2[1:].mean(0)
    assert np.allclose(sel.state_dict()["m"], m)
    restored = SampleSelector(cfg)
    restored.load_state_dict(sel.state_dict())
    z3 = np.log(np.array([[0.3, 0.4, 0.3]]))
    assert np.array_equal(restored.select(z3).mask, sel.select(z3).mask)


def test_eata_style_has_no_dynamic_threshold_and_no_e_min() -> None:
    sel = SampleSelector(SelectionConfig.eata_style(10, d_margin=None))
    r = sel.select(_logits_with_entropy([0.001, 0.5, 0.95] * 400))
    assert r.e_max == pytest.approx(0.4 * math.log(10))
    assert list(r.reason[:3]) == [KEPT, KEPT, UNRELIABLE]
