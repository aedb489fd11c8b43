"""The run measure of the label-concentration guard (``balance_measure="runs"``): on constructed labels, and the prior
it gives the next probe (a real ONNX Runtime session, the probe's own batch statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.stats.adapter import (
    StatsConfig,
    StatsConfigError,
    ema_weight,
    moment_mix,
    stats_adapter_from_dir,
)
from cema_deploy.runtime.stats.labels import LabelWindow
from tests.conftest import needs_torch
from tests.runtime.conftest import images


def test_run_concentration_on_constructed_labels() -> None:
    w = LabelWindow(frames=8, num_classes=4)
    assert w.run_concentration() == 1.0  # nothing known
    w.add(np.array([2]))
    assert w.run_concentration() == 1.0 and w.concentration() == pytest.approx(4.0)  # one frame: no pair yet
    w.add(np.array([2, 2]))
    assert w.run_concentration() == pytest.approx(4.0)  # one unbroken run: K
    w.clear()
    w.add(np.array([0, 1, 2]))  # a short window of changing labels is not concentrated under runs
    assert w.run_concentration() == 1.0 and w.concentration() == pytest.approx(4 / 3)
    w.clear()
    w.add(np.array([0, 0, 1, 0, 1, 1, 0, 1]))  # collapsed onto 2 of 4 classes, unordered: 2 of 7 pairs repeat
    assert w.concentration() == pytest.approx(2.0)
    assert w.run_concentration() == pytest.approx(4 * 2 / 7)
    w.add(np.array([3, 3, 3, 3, 3, 3]))  # the window keeps the last 8: 0, 1, then a run of six 3s
    assert w.run_concentration() == pytest.approx(4 * 5 / 7)
    w.add(np.array([0, 1, 0, 1, 0, 1, 0, 1]))  # labels that never repeat: clipped to 1, never below
    assert w.run_concentration() == 1.0


def test_unknown_balance_measure_is_refused() -> None:
    with pytest.raises(StatsConfigError, match="balance measure"):
        StatsConfig(mode="ema", balance_measure="entropy")


@needs_torch
@pytest.mark.parametrize("measure", ["histogram", "runs"])
def test_the_runs_measure_does_not_slow_a_stream_of_changing_labels(exported, measure: str) -> None:
    """Served labels alternating between two classes (a model collapsed onto two classes, without order): the
    histogram measure raises the next probe's prior by (K / 2)^2, the run measure leaves the plain prior; the update
    is the moment mix with that weight. One unbroken run raises it by K^2 under both."""
    out, _ = exported("bn")
    be = get_backend("ort-cpu", out)
    cfg = StatsConfig(
        mode="ema", every=1, prior_frames=8, balance_window=20, balance_power=2, balance_measure=measure,
        reset_on_shift=False, prior_mix="moment", balance_after=0,
    )  # fmt: skip
    ad, why = stats_adapter_from_dir(be, out, cfg)
    assert ad is not None, why
    k = be.manifest.num_classes
    pre = be.manifest.preprocess
    with be:
        ad.observe(normalize(images(4, 0, size=64), pre))
        ad.served(np.arange(20) % 2)
        conc = (k / 2) ** 2 if measure == "histogram" else 1.0
        x = normalize(images(4, 1, size=64), pre)
        before = dict(ad.current)
        w = ema_weight(4, 4, cfg, 8 * conc)
        prior = {
            n: a.astype(np.float32) for ly in ad.layers for n, a in zip((ly.mean, ly.var), before[ly.name], strict=True)
        }
        batch = ad.probe.run(x, be.tensors, mix=w, prior=prior)
        ad.observe(x)
        assert ad.last_concentration == pytest.approx(conc)
        for ly in ad.layers:
            want_mv = moment_mix(before[ly.name], (batch.mean[ly.name], batch.var[ly.name]), w)
            np.testing.assert_allclose(ad.current[ly.name][0], want_mv[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ad.current[ly.name][1], want_mv[1], rtol=1e-5, atol=1e-6)
        ad.served(np.zeros(20, np.int64))  # one unbroken run: both measures give K^2
        ad.observe(normalize(images(4, 2, size=64), pre))
        assert ad.last_concentration == pytest.approx(float(k) ** 2)
