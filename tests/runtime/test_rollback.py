"""The rollback score and rule on constructed logits (the runtime's use of them is in test_edge.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cema_deploy.runtime.rollback import (
    REASON_INFORMATION,
    REASON_NONFINITE,
    RollbackConfig,
    RollbackConfigError,
    information,
    judge,
)

C = 10


def _onehot(classes: list[int], scale: float = 50.0) -> np.ndarray:
    return np.eye(C)[classes] * scale


def test_information_is_high_for_confident_spread_predictions_and_low_for_broken_or_collapsed() -> None:
    spread = _onehot(list(range(C)) * 3)
    assert information(spread) == pytest.approx(math.log(C), abs=1e-6)  # the most there is
    assert information(np.zeros((30, C))) == pytest.approx(0.0, abs=1e-12)  # uniform outputs: broken
    assert information(_onehot([3] * 30)) == pytest.approx(0.0, abs=1e-6)  # every input one class: collapse
    half = np.concatenate([spread, np.zeros((30, C))])
    assert 0 < information(half) < information(spread)
    assert math.isnan(information(np.full((4, C), np.nan)))
    assert information(np.concatenate([spread, np.full((1, C), np.inf)])) == pytest.approx(math.log(C), abs=1e-6)


def test_judge_rolls_back_a_drop_beyond_the_margin_only() -> None:
    good = _onehot(list(range(C)) * 3)
    slightly_worse = good.copy()
    slightly_worse[0] = 0.0  # one frame of thirty goes uniform
    j = judge(good, slightly_worse, num_classes=C, margin_ratio=0.05, version=2, previous_version=1)
    assert not j.rollback and j.reason == "" and j.score_new < j.score_previous
    assert j.score_previous - j.score_new < j.allowed_drop == pytest.approx(0.05 * math.log(C))
    for bad in (np.zeros_like(good), _onehot([0] * 30)):
        j = judge(good, bad, num_classes=C, margin_ratio=0.05, version=2, previous_version=1)
        assert j.rollback and j.reason == REASON_INFORMATION and "v2 rolled back" in j.describe()
    nan = good.copy()
    nan[5, 2] = np.nan
    j = judge(good, nan, num_classes=C, margin_ratio=0.05)
    assert j.rollback and j.reason == REASON_NONFINITE
    # a previous engine that was itself collapsed: any spread is an improvement
    assert not judge(_onehot([1] * 30), good, num_classes=C, margin_ratio=0.05).rollback


def test_bad_rollback_options() -> None:
    with pytest.raises(RollbackConfigError, match="min_samples <= window"):
        RollbackConfig(window=16, min_samples=32)
    with pytest.raises(RollbackConfigError, match="margin_ratio"):
        RollbackConfig(margin_ratio=-0.1)
