"""softmax entropy in numpy against the formula written out by hand, including huge logits and edge batch sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cema_deploy.runtime.selection.entropy import entropy_of_mean, log_softmax, softmax, softmax_entropy


def _h(z: list[float]) -> float:
    """-sum p ln p with p = softmax(z), in plain Python floats."""
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return -sum((q / s) * math.log(q / s) for q in e if q > 0)


@pytest.mark.parametrize(
    ("row", "want"),
    [
        ([0.0, 0.0, 0.0, 0.0], math.log(4)),  # uniform: ln C
        ([math.log(0.5), math.log(0.25), math.log(0.25)], -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))),
        ([1e4, 0.0, -1e4], 0.0),  # one-hot to double precision: exp(-1e4) underflows to exactly 0
        ([1e4, 1e4, -1e4], math.log(2)),  # two tied huge logits
        ([-1e4, -1e4, -1e4, -1e4, -1e4], math.log(5)),  # shifted uniform
        ([3.0, 1.0], -(p := 1 / (1 + math.exp(-2))) * math.log(p) - (1 - p) * math.log(1 - p)),
    ],
)
def test_entropy_equals_the_direct_formula(row: list[float], want: float) -> None:
    got = softmax_entropy(np.array([row]))
    assert got.dtype == np.float64 and got.shape == (1,)
    assert got[0] == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(_h(row), abs=1e-12)


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_batch_sizes(n: int) -> None:
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, 10)) * 5
    e = softmax_entropy(z)
    assert e.shape == (n,)
    assert np.allclose(e, [_h(list(r)) for r in z], atol=1e-12)
    assert ((e >= 0) & (e <= math.log(10) + 1e-12)).all()
    assert log_softmax(z).shape == softmax(z).shape == (n, 10)


def test_huge_logits_in_float32_stay_finite_and_bounded() -> None:
    z = (np.random.default_rng(0).normal(size=(1000, 1000)) * 1e4).astype(np.float32)
    e = softmax_entropy(z)
    assert np.isfinite(e).all() and (e >= 0).all() and (e <= math.log(1000) + 1e-9).all()
    p = softmax(z)
    assert np.allclose(p.sum(axis=1), 1.0)


def test_entropy_is_shift_invariant_and_needs_2d() -> None:
    z = np.array([[0.3, -1.2, 2.5, 0.0]])
    assert softmax_entropy(z + 1e4)[0] == pytest.approx(softmax_entropy(z)[0], abs=1e-9)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        softmax_entropy(np.zeros(4))


def test_undefined_rows_are_nan_not_confident() -> None:
    z = np.array([[np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [-np.inf] * 3, [-np.inf, 0.0, 0.0]])
    e = softmax_entropy(z)
    assert np.isnan(e[:3]).all()
    assert e[3] == pytest.approx(math.log(2))  # a masked class is fine


def test_entropy_of_the_mean_prediction() -> None:
    C = 10
    assert entropy_of_mean(np.eye(C)) == pytest.approx(math.log(C))  # spread evenly over every class
    assert entropy_of_mean(np.tile(np.eye(C)[3], (8, 1))) == 0.0  # every row on one class: collapse
    half = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert entropy_of_mean(half) == pytest.approx(math.log(2))  # classes never predicted add 0, not NaN
    p = softmax(np.random.default_rng(1).normal(size=(16, C)))
    pm = p.mean(axis=0)
    assert entropy_of_mean(p) == pytest.approx(float(-(pm * np.log(pm)).sum()))
