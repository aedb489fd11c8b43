"""The edge's statistics adapter on real ONNX Runtime sessions: the formulas, batch 1, reset on a shift, the refit
into the serving engine (local generation, cloud version untouched, no rollback judgement), state and `edge run`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.exceptions import BlobError
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.selection.shift import ShiftConfig
from cema_deploy.runtime.stats.adapter import (
    StatsAdapter,
    StatsConfig,
    StatsConfigError,
    alpha_mix,
    ema_weight,
    moment_mix,
    stats_adapter_from_dir,
)
from tests.conftest import needs_torch
from tests.runtime.conftest import images

pytestmark = needs_torch


def _adapter(out, **cfg):  # type: ignore[no-untyped-def]
    be = get_backend("ort-cpu", out)
    adapter, why = stats_adapter_from_dir(be, out, StatsConfig(**cfg))
    assert adapter is not None, why
    return be, adapter


def _x(out, n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from cema_deploy.contract.manifest import manifest_from_dir

    return normalize(images(n, seed, size=64), manifest_from_dir(out).preprocess)


def _runtime(out, stats_cfg: StatsConfig, **kw):  # type: ignore[no-untyped-def]
    be = get_backend("ort-cpu", out)
    adapter, _ = stats_adapter_from_dir(be, out, stats_cfg)
    sel = SampleSelector(SelectionConfig.for_classes(10, d_margin=None))
    return EdgeRuntime(be, sel, rollback=RollbackConfig(window=16, min_samples=8), stats=adapter, **kw), be


# ---- the formulas -----------------------------------------------------------------------------------------------
def test_alpha_and_moment_mix_on_constructed_statistics() -> None:
    src = (np.array([0.0, 1.0]), np.array([1.0, 4.0]))
    bat = (np.array([2.0, -1.0]), np.array([3.0, 0.0]))
    mean, var = alpha_mix(src, bat, 0.25)
    np.testing.assert_array_equal(mean, [0.5, 0.5])
    np.testing.assert_array_equal(var, [1.5, 3.0])
    # the mixture of two distributions: mean 0.5/0.5, E[x^2] = 0.75*(1+0) + 0.25*(3+4) for channel 0
    mean, var = moment_mix(src, bat, 0.25)
    np.testing.assert_allclose(mean, [0.5, 0.5])
    np.testing.assert_allclose(var, [0.75 * 1 + 0.25 * 7 - 0.25, 0.75 * 5 + 0.25 * 1 - 0.25])


def test_frames_probed_one_at_a_time_add_up_to_the_pooled_statistics() -> None:
    """With no prior and the running-average weights, single frames give the variance across all frames (the
    between-frame variance of the means included), what a batch of all of them gives."""
    rng = np.random.default_rng(0)
    frames = rng.normal(rng.normal(0, 3, (20, 1, 1)), 1.0, (20, 2, 50))  # 20 frames, 2 channels, 50 positions
    cfg = StatsConfig(mode="ema", prior_frames=0, momentum=1e-9)
    cur = (np.zeros(2), np.ones(2))
    for i, f in enumerate(frames):
        w = ema_weight(1, i, cfg)
        assert w == pytest.approx(1 / (i + 1))
        cur = moment_mix(cur, (f.mean(1), f.var(1)), w)
    pooled = frames.transpose(1, 0, 2).reshape(2, -1)
    np.testing.assert_allclose(cur[0], pooled.mean(1), rtol=1e-9)
    np.testing.assert_allclose(cur[1], pooled.var(1), rtol=1e-9)


def test_ema_weight_starts_as_an_average_with_a_prior_and_ends_as_an_ema() -> None:
    cfg = StatsConfig(mode="ema", prior_frames=16, momentum=0.01)
    assert ema_weight(64, 0, cfg) == pytest.approx(64 / 80)
    assert ema_weight(1, 0, cfg) == pytest.approx(1 / 17)
    assert ema_weight(64, 10**6, cfg) == pytest.approx(1 - 0.99**64)
    with pytest.raises(StatsConfigError, match="expected one of"):
        StatsConfig(mode="bn")
    with pytest.raises(StatsConfigError, match="0 < alpha <= 1"):
        StatsConfig(mode="alpha", alpha=0)


@pytest.mark.parametrize("mode", ["alpha", "ema"])
@pytest.mark.parametrize("batch", [1, 8])
def test_an_update_is_the_formula_over_the_probes_batch_statistics(exported, mode: str, batch: int) -> None:
    out, _ = exported("bn")
    be, ad = _adapter(out, mode=mode, alpha=0.3, reset_on_shift=False, prior_mix="moment")
    with be:
        x = _x(out, batch)
        source = {k: (m.copy(), v.copy()) for k, (m, v) in ad.source.items()}
        mix = 0.3 if mode == "alpha" else ema_weight(batch, 0, ad.config)
        prior = {
            n: a.astype(np.float32) for ly in ad.layers for n, a in zip((ly.mean, ly.var), source[ly.name], strict=True)
        }
        want_batch = ad.probe.run(x, be.tensors, mix=mix, prior=prior)
        assert ad.observe(x)
        for ly in ad.layers:
            b = (want_batch.mean[ly.name].astype(np.float64), want_batch.var[ly.name].astype(np.float64))
            want = alpha_mix(source[ly.name], b, mix) if mode == "alpha" else moment_mix(source[ly.name], b, mix)
            np.testing.assert_allclose(ad.current[ly.name][0], want[0], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ad.current[ly.name][1], want[1], rtol=1e-6, atol=1e-7)
            # ... and that is what the engine serves now
            np.testing.assert_allclose(be.tensors[ly.mean], want[0].astype(np.float32), rtol=1e-6)
            np.testing.assert_allclose(be.tensors[ly.var], want[1].astype(np.float32), rtol=1e-6)
        assert (ad.local_generation, be.version, ad.seen) == (1, 0, batch)


# ---- in the edge runtime ----------------------------------------------------------------------------------------
def test_batch_one_changes_what_the_engine_serves_and_keeps_the_cloud_version(exported) -> None:
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    rt, be = _runtime(out, StatsConfig(mode="ema", every=2))
    with rt, be:
        plain = be.infer(_x(out, 1, seed=5))
        for i in range(6):
            step = rt.process(images(1, i, size=64))
            assert step.version == 0 and np.isfinite(step.logits).all()
        m = rt.metrics()["stats"]
        assert m["mode"] == "ema" and m["probes"] == 3 and m["local_generation"] == 3 and m["frames_probed"] == 3
        assert rt.version == 0 and be.previous_version is None  # local refits never make a cloud version
        name = ad_name = rt.stats.layers[-1].mean  # type: ignore[union-attr]
        assert not np.allclose(be.tensors[name], v0.tensors[ad_name])
        assert not np.allclose(be.infer(_x(out, 1, seed=5)), plain)
        for k in v0.tensors:  # the affine parameters are the export's still
            if not k.endswith(("running_mean", "running_var")):
                np.testing.assert_array_equal(be.tensors[k], v0.tensors[k])


def test_probe_rate_dense_after_a_reset_then_one_batch_in_every(exported) -> None:
    out, _ = exported("bn")
    be, ad = _adapter(out, mode="ema", every=4, dense_frames=6, reset_on_shift=False)
    with be:
        x = _x(out, 2)
        probed = []
        for i in range(11):
            before = ad.probes
            ad.observe(x)
            if ad.probes > before:
                probed.append(i)
        assert probed == [0, 1, 2, 6, 10]  # seen 0, 2, 4 < 6 frames: dense; then one batch in 4
        assert ad.local_generation == 5 and ad.batches == 11
        ad.reset()  # a shift: dense again
        for _ in range(3):
            ad.observe(x)
        assert ad.probes == 8


def test_a_detected_shift_resets_to_the_source_statistics(exported) -> None:
    out, _ = exported("bn")
    be, ad = _adapter(out, mode="ema", every=1, shift=ShiftConfig(reference_frames=16, collapse_ratio=None))
    with be:
        flat = np.full((8, 64, 64, 3), 120, np.uint8)
        flat[:, ::2] = 125
        xf = normalize(flat, be.manifest.preprocess)
        for _ in range(3):  # 16 frames of reference, then a stationary batch: no reset
            ad.observe(xf, flat)
        assert ad.resets == 0 and ad.seen == 24
        noisy = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3)).astype(np.uint8)
        ad.observe(normalize(noisy, be.manifest.preprocess), noisy)
        assert ad.resets == 1 and ad.seen == 8  # back to the source, then this batch probed on top of it
        w = ema_weight(8, 0, ad.config)
        ly = ad.layers[0]
        prior = {ly.mean: ad.source[ly.name][0].astype(np.float32), ly.var: ad.source[ly.name][1].astype(np.float32)}
        st = ad.probe.run(normalize(noisy, be.manifest.preprocess), be.tensors, mix=w, prior=prior)
        want = moment_mix(ad.source[ly.name], (st.mean[ly.name], st.var[ly.name]), w)
        np.testing.assert_allclose(ad.current[ly.name][0], want[0], rtol=1e-5, atol=1e-6)


def test_a_cloud_blob_keeps_its_affine_parameters_and_gets_the_edges_statistics(exported) -> None:
    """The edge owns the running statistics, the cloud the affine parameters; local refits are never judged by the
    rollback monitor and keep the cloud blob's rollback target."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    rt, be = _runtime(out, StatsConfig(mode="alpha", alpha=1.0, every=1))  # the degenerate extreme: batch-1 BN
    with rt, be:
        cloud = {k: (v * 1.1 if k.endswith("weight") else v + 0.05).astype(v.dtype) for k, v in v0.tensors.items()}
        assert rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=cloud, fingerprint=v0.fingerprint, version=1)))
        assert be.version == 1 and be.previous_version == 0
        for i in range(20):
            rt.process(images(1, i, size=64))
        assert rt.monitor.wait_judged(20)
        assert rt.rollbacks == 0 and be.version == 1 and be.previous_version == 0
        assert rt.stats is not None and rt.stats.local_generation == 20 and rt.stats.cloud_version == 1
        for k, v in cloud.items():
            if k.endswith(("running_mean", "running_var")):
                assert not np.allclose(be.tensors[k], v), k
            else:
                np.testing.assert_array_equal(be.tensors[k], v)


def test_state_round_trip(exported, tmp_path) -> None:
    out, _ = exported("bn")
    rt, be = _runtime(out, StatsConfig(mode="ema", every=1), state_dir=tmp_path / "st")
    with be:
        for i in range(3):
            rt.process(images(4, i, size=64))
        rt.close()
        saved = rt.stats.tensors()  # type: ignore[union-attr]
        gen = rt.stats.local_generation  # type: ignore[union-attr]
    rt2, be2 = _runtime(out, StatsConfig(mode="ema", every=1000), state_dir=tmp_path / "st")
    with rt2, be2:
        assert rt2.stats is not None and rt2.stats.local_generation == gen == 3 and rt2.stats.seen == 12
        rt2.process(images(4, 9, size=64))  # the first batch is probed (0 % every) and merged
        np.testing.assert_array_equal(
            rt2.stats.tensors()[rt2.stats.layers[0].mean], be2.tensors[rt2.stats.layers[0].mean]
        )
        assert rt2.stats.seen == 16
    rt3, be3 = _runtime(out, StatsConfig(mode="alpha"), state_dir=tmp_path / "st")  # another mode: starts afresh
    with rt3, be3:
        assert rt3.stats is not None and rt3.stats.local_generation == 0
    assert saved


def test_local_refit_refuses_bad_statistics_and_keeps_serving(exported) -> None:
    out, _ = exported("bn")
    with get_backend("ort-cpu", out) as be:
        name = next(k for k in be.tensors if k.endswith("running_var"))
        before = dict(be.tensors)
        for bad in (-np.ones_like(before[name]), np.full_like(before[name], np.nan), np.ones(3, np.float32)):
            with pytest.raises(BlobError, match="nothing was refitted"):
                be.refit_local({name: bad})
        with pytest.raises(BlobError, match="nothing was refitted"):
            be.refit_local({"no.such.running_var": before[name]})
        assert be.tensors[name] is before[name]


@pytest.mark.parametrize("kind", ["gn", "ln"])
def test_models_without_running_statistics_keep_the_adapter_off(exported, kind: str) -> None:
    out, _ = exported(kind)
    with get_backend("ort-cpu", out) as be:
        adapter, why = stats_adapter_from_dir(be, out, StatsConfig(mode="ema"))
    assert adapter is None and "no BatchNorm running statistics" in why


def test_edge_run_adapt_stats_cli(exported, tmp_path) -> None:
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", images(12, 0, size=64))
    args = ["edge", "run", str(out), "--source", str(tmp_path / "s.npy"), "--batch", "1", "--quiet"]
    r = CliRunner().invoke(
        app,
        [
            *args,
            "--adapt-stats",
            "alpha",
            "--stats-every",
            "3",
            "--stats-dense-frames",
            "0",
            "--json",
            str(tmp_path / "m.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["stats"]["mode"] == "alpha" and m["stats"]["probes"] == 4 and m["stats"]["local_generation"] == 4
    assert m["version"] == 0 and m["uploaded_pct"] == 0.0
    gn, _ = exported("gn")
    r = CliRunner().invoke(app, ["edge", "run", str(gn), "--source", str(tmp_path / "s.npy"), "--quiet",
                                 "--adapt-stats", "ema", "--json", str(tmp_path / "g.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["stats"]["mode"] == "off" and "no BatchNorm running statistics" in g["stats"]["off_because"]
    r = CliRunner().invoke(app, [*args, "--adapt-stats", "bn"])
    assert r.exit_code != 0 and "expected one of" in str(r.exception)


def test_metrics_text_has_the_adapters_metrics(exported) -> None:
    from cema_deploy.runtime.metrics import prometheus_text

    out, _ = exported("bn")
    rt, be = _runtime(out, StatsConfig(mode="ema"))
    with rt, be:
        rt.process(images(2, 0, size=64))
        text = prometheus_text(rt.metrics())
    assert 'cema_edge_stats_mode{mode="ema"} 1' in text and "cema_edge_stats_local_generation 1" in text
    assert "cema_edge_stats_probes_total 1" in text and "cema_edge_serving_version 0" in text


def test_adapter_class_is_public() -> None:
    assert StatsAdapter.__name__ == "StatsAdapter"
