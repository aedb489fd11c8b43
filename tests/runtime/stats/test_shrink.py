"""The ``ema`` adapter's ``shrink`` prior (issue 21, second round): the frames' pooled estimate served as alpha-BN's
mix with the source statistics; the guard that reads labels only after ``balance_after`` frames. Formulas on
constructed statistics, then the update on real ONNX Runtime sessions against the probe's own batch statistics."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.stats.adapter import (
    StatsConfig,
    StatsConfigError,
    alpha_mix,
    moment_mix,
    shrink_probe_prior,
    shrink_weight,
    stats_adapter_from_dir,
)
from tests.conftest import needs_torch
from tests.runtime.conftest import images


def test_shrink_weight_counts_the_source_as_prior_frames() -> None:
    assert shrink_weight(0, 8) == 0.0  # nothing seen: the source statistics
    assert shrink_weight(8, 8) == pytest.approx(0.5)
    assert shrink_weight(64, 8) == pytest.approx(64 / 72)
    assert shrink_weight(0, 0) == 1.0  # no prior, nothing seen: the batch alone
    with pytest.raises(StatsConfigError, match="prior mix"):
        StatsConfig(mode="ema", prior_mix="bayes")
    with pytest.raises(StatsConfigError):
        StatsConfig(mode="ema", balance_after=-1)


def test_the_probe_prior_reproduces_what_is_served_after_the_batch() -> None:
    """``(1 - mix) * prior + mix * batch`` is ``(1 - a) * source + a * ((1 - w) * data + w * batch)`` (linear in both
    the mean and the variance), for any batch statistics."""
    source = (np.array([0.0, 2.0]), np.array([1.0, 4.0]))
    data = (np.array([1.0, -1.0]), np.array([2.0, 0.5]))
    batch = (np.array([3.0, 0.5]), np.array([0.25, 9.0]))
    a, w = 0.8, 0.25
    (p_mean, p_var), mix = shrink_probe_prior(source, data, a, w)
    assert mix == pytest.approx(a * w)
    want_mean = (1 - a) * source[0] + a * ((1 - w) * data[0] + w * batch[0])
    want_var = (1 - a) * source[1] + a * ((1 - w) * data[1] + w * batch[1])
    np.testing.assert_allclose((1 - mix) * p_mean + mix * batch[0], want_mean)
    np.testing.assert_allclose((1 - mix) * p_var + mix * batch[1], want_var)
    prior, mix = shrink_probe_prior(source, data, 1.0, 1.0)  # no prior, first batch: the batch alone
    assert mix == 1.0 and prior is source


def test_shrink_serves_no_variance_from_the_distance_to_the_source() -> None:
    """The moment prior treats the source as frames of a mixture: a batch far from the source mean inflates the
    served variance by ``w (1 - w) (batch_mean - source_mean)^2``; the shrink prior mixes the variances linearly."""
    source = (np.array([0.0]), np.array([1.0]))
    batch = (np.array([10.0]), np.array([1.0]))
    a = shrink_weight(64, 8)
    _, var_moment = moment_mix(source, batch, a)
    _, var_shrink = alpha_mix(source, moment_mix(source, batch, 1.0), a)
    assert var_moment[0] == pytest.approx(1.0 + a * (1 - a) * 100)
    assert var_shrink[0] == pytest.approx(1.0)


def _stats(out, **cfg):  # type: ignore[no-untyped-def]
    be = get_backend("ort-cpu", out)
    ad, why = stats_adapter_from_dir(
        be,
        out,
        StatsConfig(
            **{"mode": "ema", "every": 1, "reset_on_shift": False, "prior_mix": "shrink", "balance_after": 32, **cfg}
        ),
    )
    assert ad is not None, why
    return be, ad


@needs_torch
@pytest.mark.parametrize("batch", [1, 8])
def test_a_shrink_update_is_alpha_bn_over_the_pooled_frames(exported, batch: int) -> None:
    """Two probes: the frames' estimate pools them (running average), the engine serves its alpha-BN mix with the
    source at ``a = frames / (frames + prior_frames)``; the probe's batch statistics are taken under the
    normalization served after the batch."""
    out, _ = exported("bn")
    be, ad = _stats(out, prior_frames=8, balance_window=0)
    pre = be.manifest.preprocess
    with be:
        data = dict(ad.source)
        for step in range(2):
            x = normalize(images(batch, step, size=64), pre)
            w = 1.0 if step == 0 else 0.5
            a = shrink_weight((step + 1) * batch, 8)
            priors = {ly.name: shrink_probe_prior(ad.source[ly.name], data[ly.name], a, w) for ly in ad.layers}
            feeds = {
                n: v.astype(np.float32)
                for ly in ad.layers
                for n, v in zip((ly.mean, ly.var), priors[ly.name][0], strict=True)
            }
            st = ad.probe.run(x, be.tensors, mix=a * w, prior=feeds)
            assert ad.observe(x)
            for ly in ad.layers:
                b = (st.mean[ly.name].astype(np.float64), st.var[ly.name].astype(np.float64))
                data[ly.name] = moment_mix(data[ly.name], b, w)
                want = alpha_mix(ad.source[ly.name], data[ly.name], a)
                np.testing.assert_allclose(ad.data[ly.name][0], data[ly.name][0], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(ad.data[ly.name][1], data[ly.name][1], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(be.tensors[ly.mean], want[0].astype(np.float32), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(be.tensors[ly.var], want[1].astype(np.float32), rtol=1e-5, atol=1e-6)
        assert ad.evidence == 2 * batch and ad.seen == 2 * batch


@needs_torch
def test_the_guard_reads_labels_only_after_balance_after_frames(exported) -> None:
    """Right after a reset the served labels come from the stale statistics (a corruption can collapse them onto one
    class): the guard ignores them for ``balance_after`` frames, then a window of one label makes a batch count as
    ``n / K^power`` frames."""
    out, _ = exported("bn")
    be, ad = _stats(out, prior_frames=8, balance_window=20, balance_power=2, balance_after=8)
    k, pre = be.manifest.num_classes, be.manifest.preprocess
    with be:
        for step in range(2):  # 0 and 4 frames seen: below balance_after
            ad.observe(normalize(images(4, step, size=64), pre))
            ad.served(np.zeros(4, np.int64))
            assert ad.last_concentration == 1.0
        assert ad.evidence == 8
        ad.observe(normalize(images(4, 2, size=64), pre))  # 8 frames seen: one label over the window
        assert ad.last_concentration == pytest.approx(float(k) ** 2)
        assert ad.evidence == pytest.approx(8 + 4 / k**2)
        ad.reset()
        assert (ad.seen, ad.evidence) == (0, 0.0)
        ad.served(np.zeros(20, np.int64))
        ad.observe(normalize(images(4, 3, size=64), pre))
        assert ad.last_concentration == 1.0


@needs_torch
def test_state_round_trip_keeps_the_frames_estimate(exported, tmp_path) -> None:
    """``--state`` keeps the frames' estimate and its count: a restarted edge goes on pooling where it stopped (the
    next probe gets the weight it would have got without the restart); a state of the other prior mix is not read."""
    out, _ = exported("bn")
    be, ad = _stats(out, prior_frames=8, balance_window=0)
    with be:
        for i in range(3):
            ad.observe(normalize(images(4, i, size=64), be.manifest.preprocess))
        ad.save(tmp_path)
        data, evidence = dict(ad.data), ad.evidence
    be2, ad2 = _stats(out, prior_frames=8, balance_window=0)
    with be2:
        assert ad2.load(tmp_path) and ad2.evidence == evidence == 12
        for ly in ad2.layers:
            np.testing.assert_allclose(ad2.data[ly.name][0], data[ly.name][0], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ad2.data[ly.name][1], data[ly.name][1], rtol=1e-6, atol=1e-7)
    be3, ad3 = _stats(out, prior_frames=8, balance_window=0, prior_mix="moment")
    with be3:
        assert not ad3.load(tmp_path)


@needs_torch
def test_edge_run_takes_the_prior_mix_and_balance_after_options(exported, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", images(6, 0, size=64))
    args = ["edge", "run", str(out), "--source", str(tmp_path / "s.npy"), "--batch", "2", "--quiet", "--adapt-stats"]
    r = CliRunner().invoke(
        app,
        [
            *args,
            "ema",
            "--stats-prior-mix",
            "shrink",
            "--stats-balance-after",
            "32",
            "--json",
            str(tmp_path / "m.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["stats"]["probes"] == 3  # dense: every batch
    r = CliRunner().invoke(app, [*args, "ema", "--stats-prior-mix", "bayes"])
    assert r.exit_code != 0 and "prior mix" in str(r.exception)
