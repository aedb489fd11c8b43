"""The statistics probe on the ``trt`` backend (issue 21 item 6), without TensorRT or a GPU.

What is checked here is everything around the TensorRT calls: the probe's build options and plan-cache key, the
engine's I/O check against the real probe graph's inputs and outputs, the backend-agnostic probe running on the
engine a backend offers (fed the serving parameters, so it follows every refit), and the adapter's local refits on
the two-slot discipline of the ``trt`` backend with a cloud blob's rollback after them.

The stand-ins are not TensorRT: :class:`OrtSlotEngine` is a real ONNX Runtime session of the export, rebuilt with
new tensors where TensorRT refits in place (so its outputs are the model's, exactly), and :class:`OrtTableEngine`
runs the real probe graph on ONNX Runtime behind the I/O table a TensorRT engine reports, checked by the same
``check_probe_io``. The TensorRT engines themselves are tested on a GPU only (``test_trt_gpu.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, manifest_from_dir
from cema_deploy.contract.stats_probe import ProbeSpec, probe_spec_from_dir
from cema_deploy.exceptions import BackendError
from cema_deploy.runtime.backends import trt_build as tb
from cema_deploy.runtime.backends.onnxrt import OrtSession, session_from_onnx
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.backends.trt_probe import IoTensor, check_probe_io, probe_options
from cema_deploy.runtime.backends.trt_slots import READY, DoubleBufferedBackend
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir
from cema_deploy.runtime.stats.probe import OrtProbeEngine, StatsProbe, probe_from_dir
from tests.conftest import needs_torch
from tests.runtime.conftest import images

pytestmark = needs_torch

MAX_BATCH = 8


class OrtSlotEngine:
    """A slot engine computing the export's real outputs: an ORT session rebuilt with the new tensors at refit."""

    def __init__(self, model_dir: Path, tensors: Mapping[str, np.ndarray]) -> None:
        self.path = model_dir / manifest_from_dir(model_dir).model_file
        self.session: OrtSession = session_from_onnx(self.path, tensors=tensors)
        self.refits = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(x)

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.refits += 1
        self.session = session_from_onnx(self.path, tensors=tensors)

    def close(self) -> None:
        return None


class OrtTableEngine:
    """The probe graph on ORT behind the I/O table a TensorRT engine reports (shapes at the largest batch),
    checked as ``TrtProbeEngine`` checks it; records what it was fed."""

    kind = "stand-in"

    def __init__(self, model_dir: Path, spec: ProbeSpec) -> None:
        self.inner = OrtProbeEngine(model_dir, spec)
        session = self.inner._session
        self.io = [
            IoTensor(t.name, is_input, tuple(d if isinstance(d, int) else MAX_BATCH for d in t.shape))
            for is_input, group in ((True, session.get_inputs()), (False, session.get_outputs()))
            for t in group
        ]
        check_probe_io(self.io, spec)
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.inner.run(feed, outputs)

    def close(self) -> None:
        return None


class StandInTrtBackend(DoubleBufferedBackend):
    """The ``trt`` backend's two-slot discipline and probe hook over the stand-in engines."""

    name = "trt-stand-in"

    def __init__(self, model_dir: Path) -> None:
        self.engines: list[OrtSlotEngine] = []
        self.probe_engines: list[OrtTableEngine] = []
        super().__init__(model_dir)

    def _new_engine(self, tensors: Mapping[str, np.ndarray]) -> OrtSlotEngine:
        self.engines.append(OrtSlotEngine(self.model_dir, tensors))
        return self.engines[-1]

    def stats_probe_engine(self, spec: ProbeSpec) -> OrtTableEngine:
        self.probe_engines.append(OrtTableEngine(self.model_dir, spec))
        return self.probe_engines[-1]


@pytest.fixture
def model_dir(exported) -> Path:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    return Path(out)


def _x(model_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    manifest = manifest_from_dir(model_dir)
    return normalize(images(n, seed, size=int(manifest.input.shape[-1])), manifest.preprocess)


def _cloud_blob(tensors: Mapping[str, np.ndarray], fingerprint: str, version: int) -> RefitBlob:
    """New affine parameters (the cloud's share); running statistics as they were."""
    new = {k: (v * np.float32(1.3) + np.float32(0.02) if "running" not in k else v) for k, v in tensors.items()}
    return RefitBlob(tensors=new, fingerprint=fingerprint, version=version)


def _reference(model_dir: Path, tensors: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What ONNX Runtime computes with exactly ``tensors`` (a fresh backend refitted with them)."""
    manifest = manifest_from_dir(model_dir)
    with get_backend("ort-cpu", model_dir) as cpu:
        cpu.refit(RefitBlob(tensors=dict(tensors), fingerprint=manifest.fingerprint, version=99))
        return cpu.infer(x)


# ---- build options, cache key, I/O check (plain Python) ------------------------------------------------------------
@pytest.mark.parametrize(("serving", "probe"), [("fp32", "fp32"), ("tf32", "tf32"), ("fp16", "tf32")])
def test_the_probe_is_never_built_in_fp16_and_keeps_the_serving_batch_range(serving: str, probe: str) -> None:
    opts = probe_options(tb.TrtOptions(max_batch=48, precision=serving, refit_mode="individual"))
    assert (opts.precision, opts.max_batch) == (probe, 48)


def test_probe_plans_have_their_own_cache_key_without_a_refit_mode(model_dir: Path) -> None:
    manifest = manifest_from_dir(model_dir)
    device = tb.DeviceInfo(name="Orin", compute_capability="8.7")
    common = {"fingerprint": manifest.fingerprint, "tensorrt_version": "10.3.0", "device": device}
    keys = {kind: tb.plan_key(**common, options=tb.TrtOptions(), kind=kind) for kind in ("refit", "plain", "probe")}
    assert keys["probe"]["refit_mode"] == "none"
    assert len({tb.key_digest(k) for k in keys.values()}) == 3
    with pytest.raises(BackendError, match="plan kind"):
        tb.plan_key(fingerprint="f", tensorrt_version="10.3.0", device=device, options=tb.TrtOptions(), kind="x")


def test_the_engine_check_accepts_the_real_probe_graph_and_refuses_what_it_cannot_feed_or_read(
    model_dir: Path,
) -> None:
    spec = probe_spec_from_dir(model_dir, manifest_from_dir(model_dir).fingerprint)
    assert spec is not None
    good = OrtTableEngine(model_dir, spec).io  # the check ran in the constructor
    assert {t.name for t in good if t.is_input} == {spec.input_name, spec.mix_input, *spec.feeds}
    first = spec.layers[0]
    broken = {
        "an output missing": [t for t in good if t.name != first.batch_var],
        "an output of the wrong shape": [
            IoTensor(t.name, t.is_input, (first.channels + 1,)) if t.name == first.batch_mean else t for t in good
        ],
        "an input nobody feeds": [*good, IoTensor("extra", True, (3,))],
        "no image input": [t for t in good if t.name != spec.input_name],
    }
    for what, io in broken.items():
        with pytest.raises(BackendError, match="does not match"):
            check_probe_io(io, spec)
            pytest.fail(f"accepted {what}")


# ---- the probe on the backend's engine ----------------------------------------------------------------------------
def test_the_probe_runs_on_the_engine_the_backend_offers_and_gives_what_onnx_runtime_gives(model_dir: Path) -> None:
    manifest = manifest_from_dir(model_dir)
    with StandInTrtBackend(model_dir) as be:
        probe = probe_from_dir(model_dir, manifest, backend=be)
        assert probe is not None and probe.kind == "stand-in" and len(be.probe_engines) == 1
        spec = probe_spec_from_dir(model_dir, manifest.fingerprint)
        assert spec is not None
        on_cpu = StatsProbe(spec, OrtProbeEngine(model_dir, spec))
        assert on_cpu.kind == "onnxruntime-cpu"
        x = _x(model_dir, 4)
        for mix in (0.0, 0.1, 1.0):
            got, want = probe.run(x, be.tensors, mix=mix), on_cpu.run(x, be.tensors, mix=mix)
            for layer in probe.layers:
                np.testing.assert_allclose(got.mean[layer], want.mean[layer], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got.var[layer], want.var[layer], rtol=1e-5, atol=1e-6)
    with get_backend("ort-cpu", model_dir) as cpu:  # a backend without a probe engine: ONNX Runtime on the CPU
        fallback = probe_from_dir(model_dir, manifest, backend=cpu)
        assert fallback is not None and fallback.kind == "onnxruntime-cpu"


def test_the_probe_is_fed_the_serving_affine_parameters_and_the_adapters_prior(model_dir: Path) -> None:
    with StandInTrtBackend(model_dir) as be:
        adapter, why = stats_adapter_from_dir(be, model_dir, StatsConfig(mode="alpha", every=1))
        assert adapter is not None, why
        engine = be.probe_engines[0]
        source = dict(be.tensors)
        blob = _cloud_blob(source, be.manifest.fingerprint, 1)
        be.refit(blob)
        adapter.observe(_x(model_dir, 2))  # probes, then refits the statistics locally
        adapter.observe(_x(model_dir, 2, seed=1))
        fed = engine.feeds[-1]
        for ly in adapter.layers:
            weight, bias = f"{ly.name}.weight", f"{ly.name}.bias"
            np.testing.assert_array_equal(fed[weight], blob.tensors[weight])  # the cloud's, serving now
            np.testing.assert_array_equal(fed[bias], blob.tensors[bias])
            np.testing.assert_array_equal(fed[ly.mean], source[ly.mean])  # alpha-BN's prior: the source statistics
            np.testing.assert_array_equal(fed[ly.var], source[ly.var])
            assert not np.array_equal(be.tensors[ly.mean], source[ly.mean])  # the engine serves the edge's own
        assert float(fed[adapter.probe.spec.mix_input]) == pytest.approx(0.1)


# ---- local refits and a cloud blob's rollback on the two-slot discipline ------------------------------------------
def test_cloud_blob_then_local_statistics_then_rollback_serves_the_previous_cloud_parameters_with_the_local_ones(
    model_dir: Path,
) -> None:
    x = _x(model_dir, 4, seed=3)
    with StandInTrtBackend(model_dir) as be:
        adapter, why = stats_adapter_from_dir(be, model_dir, StatsConfig(mode="ema", every=1, reset_on_shift=False))
        assert adapter is not None, why
        export = dict(be.tensors)
        be.refit(_cloud_blob(export, be.manifest.fingerprint, 1))
        assert adapter.observe(_x(model_dir, 8)) and adapter.local_generation == 1
        local = adapter.tensors()
        assert be.version == 1 and be.previous_version == 0 and be.slot_states == [READY, READY]
        previous = be.infer_previous(x)
        assert previous is not None
        np.testing.assert_allclose(previous, _reference(model_dir, {**export, **local}, x), rtol=1e-4, atol=1e-5)

        assert be.rollback() == 0  # no error
        np.testing.assert_allclose(be.infer(x), _reference(model_dir, {**export, **local}, x), rtol=1e-4, atol=1e-5)
        for name, value in local.items():
            np.testing.assert_array_equal(be.tensors[name], value)

        assert adapter.observe(_x(model_dir, 8, seed=5))  # the adapter goes on under the rolled-back version
        assert be.version == 0 and adapter.cloud_version == 0 and adapter.refit_errors == 0
        np.testing.assert_allclose(
            be.infer(x), _reference(model_dir, {**export, **adapter.tensors()}, x), rtol=1e-4, atol=1e-5
        )
