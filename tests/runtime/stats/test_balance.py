"""The label-concentration guard of the statistics adapter: the label window's measure on constructed labels, and the
prior it gives a probe (real ONNX Runtime sessions, the probe's own batch statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
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


def test_effective_classes_and_concentration_on_constructed_labels() -> None:
    w = LabelWindow(frames=8, num_classes=4)
    assert (len(w), w.effective_classes(), w.concentration()) == (0, 1.0, 1.0)  # nothing known: no guard
    w.add(np.array([2, 2, 2]))
    assert w.effective_classes() == pytest.approx(1.0) and w.concentration() == pytest.approx(4.0)
    w.add(np.array([0, 1, 2, 3, 0, 1, 2, 3]))  # the window keeps the last 8: two of each class
    assert len(w) == 8 and w.effective_classes() == pytest.approx(4.0) and w.concentration() == pytest.approx(1.0)
    w.add(np.array([1, 1, 1, 1]))  # last 8: 0, 1, 2, 3, 1, 1, 1, 1
    p = np.array([1, 5, 1, 1]) / 8
    assert w.effective_classes() == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert w.concentration() == pytest.approx(4 / np.exp(-(p * np.log(p)).sum()))
    w.clear()
    assert w.concentration() == 1.0
    with pytest.raises(StatsConfigError):
        StatsConfig(mode="ema", balance_window=-1)


@needs_torch
@pytest.mark.parametrize("labels", ["one", "spread"])
def test_concentrated_predictions_raise_the_prior_of_the_next_probe(exported, labels: str) -> None:
    """One served label over the window: the next batch enters with the prior x K^power; labels spread over every
    class: the plain prior. The update is the moment mix of the probe's statistics with that weight."""
    from cema_deploy.contract.manifest import manifest_from_dir

    out, _ = exported("bn")
    be = get_backend("ort-cpu", out)
    cfg = StatsConfig(
        mode="ema", every=1, prior_frames=8, balance_window=20, balance_power=2, reset_on_shift=False,
        prior_mix="moment", balance_after=0,
    )  # fmt: skip
    ad, why = stats_adapter_from_dir(be, out, cfg)
    assert ad is not None, why
    k = be.manifest.num_classes
    pre = manifest_from_dir(out).preprocess
    with be:
        ad.observe(normalize(images(4, 0, size=64), pre))  # empty window: the plain prior
        assert ad.last_concentration == 1.0
        served = np.zeros(20, np.int64) if labels == "one" else np.arange(20) % k
        p = np.bincount(served) / 20
        p = p[p > 0]
        conc = max(1.0, k / np.exp(-(p * np.log(p)).sum())) ** 2  # K / effective classes, squared
        ad.served(served)
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
            want = moment_mix(before[ly.name], (batch.mean[ly.name], batch.var[ly.name]), w)
            np.testing.assert_allclose(ad.current[ly.name][0], want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ad.current[ly.name][1], want[1], rtol=1e-5, atol=1e-6)
        ad.reset()  # a detected shift forgets the labels too
        assert len(ad.labels or []) == 0


@needs_torch
def test_the_edge_runtime_reports_its_served_predictions_to_the_adapter(exported) -> None:
    out, _ = exported("bn")
    be = get_backend("ort-cpu", out)
    ad, _ = stats_adapter_from_dir(be, out, StatsConfig(mode="ema", balance_window=16))
    sel = SampleSelector(SelectionConfig.for_classes(10, d_margin=None))
    with EdgeRuntime(be, sel, rollback=RollbackConfig(window=16, min_samples=8), stats=ad) as rt, be:
        steps = [rt.process(images(3, i, size=64)) for i in range(2)]
    assert ad is not None and ad.labels is not None
    assert list(ad.labels._labels) == [int(p) for s in steps for p in s.predictions]
