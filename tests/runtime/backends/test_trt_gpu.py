"""TensorRT and ONNX Runtime TensorRT EP on a real GPU: parity with ORT CPU after a refit, plan cache, fp16,
batch range, individual refit. Skipped cleanly without TensorRT, cuda-python or a CUDA device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, blob_from_path, manifest_from_dir
from cema_deploy.exceptions import BackendError
from cema_deploy.runtime import get_backend
from tests.conftest import needs_torch


def _gpu_present() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        from cema_deploy.runtime.backends.trt import _cudart

        cudart = _cudart()
        err, n = cudart.cudaGetDeviceCount()
        return int(err) == 0 and n > 0
    except Exception:
        return False


pytestmark = [
    needs_torch,
    pytest.mark.trt,
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_present(), reason="needs TensorRT, cuda-python and a CUDA GPU"),
]


@pytest.fixture
def setup(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CEMA_DEPLOY_CACHE", str(tmp_path / "cache"))
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    blob = blob_from_path(Path(out) / manifest.params_file)
    rng = np.random.default_rng(7)
    new = {k: (v * np.float32(1.2) + np.float32(0.05) if "running_var" not in k else v * np.float32(1.5))
           for k, v in blob.tensors.items()}  # fmt: skip
    x = rng.standard_normal((16, *manifest.input.shape[1:])).astype(np.float32)
    return Path(out), manifest, RefitBlob(tensors=new, fingerprint=manifest.fingerprint, version=1), x


def _ref(out: Path, blob: RefitBlob, x: np.ndarray) -> np.ndarray:
    with get_backend("ort-cpu", out) as cpu:
        cpu.refit(blob)
        return cpu.infer(x)


def test_fp32_matches_ort_cpu_after_a_refit_and_the_plan_is_cached(setup) -> None:  # type: ignore[no-untyped-def]
    out, _, blob, x = setup
    ref = _ref(out, blob, x)
    with get_backend("trt", out, max_batch=16, precision="fp32") as be:
        assert be.describe()["plan"] == {"refit": "built"}
        be.refit(blob)
        got = be.infer(x)
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3
        assert be.rollback() == 0
        with pytest.raises(BackendError, match="--max-batch 17"):
            be.infer(np.concatenate([x, x[:1]]))
    with get_backend("trt", out, max_batch=16, precision="fp32") as be:
        assert be.describe()["plan"] == {"refit": "cache"}
        be.refit(blob)
        np.testing.assert_allclose(be.infer(x), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("refit_mode", ["full", "individual"])
def test_fp16_and_individual_refit_agree_with_ort_cpu(setup, refit_mode: str) -> None:  # type: ignore[no-untyped-def]
    out, _, blob, x = setup
    ref = _ref(out, blob, x)
    with get_backend("trt", out, max_batch=16, precision="fp16", refit_mode=refit_mode) as be:
        be.refit(blob)
        assert (be.infer(x).argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_ort_trt_refit_rebuilds_into_a_new_engine_folder(setup) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the TensorRT EP is not installed")
    out, _, blob, x = setup
    ref = _ref(out, blob, x)
    with get_backend("ort-trt", out, max_batch=16) as be:
        be.refit(blob)
        assert len(set(be.engine_dirs)) == 2
        assert np.abs(be.infer(x) - ref).max() / np.abs(ref).max() <= 1e-2


def test_the_statistics_probe_on_tensorrt_matches_onnx_runtime_and_rollback_survives_a_local_refit(setup) -> None:  # type: ignore[no-untyped-def]
    """Issue 21 item 6 on hardware: the probe as a second engine (plan kind "probe", cached), its statistics equal
    the ONNX Runtime probe's, and a cloud blob's rollback after a local statistics refit."""
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir
    from cema_deploy.runtime.stats.probe import OrtProbeEngine, StatsProbe

    out, manifest, blob, x = setup
    with get_backend("trt", out, max_batch=16, precision="fp32") as be:
        adapter, why = stats_adapter_from_dir(be, out, StatsConfig(mode="alpha", every=1))
        assert adapter is not None and adapter.probe.kind == "tensorrt", why
        assert be.describe()["plan"]["probe"] == "built"
        on_cpu = StatsProbe(adapter.probe.spec, OrtProbeEngine(out, adapter.probe.spec))
        for mix in (0.0, 1.0):
            got, want = adapter.probe.run(x, be.tensors, mix=mix), on_cpu.run(x, be.tensors, mix=mix)
            for layer in adapter.probe.layers:
                np.testing.assert_allclose(got.mean[layer], want.mean[layer], rtol=1e-3, atol=1e-4)
                np.testing.assert_allclose(got.var[layer], want.var[layer], rtol=1e-3, atol=1e-4)
        export = dict(be.tensors)
        be.refit(blob)
        assert adapter.observe(x)
        local = adapter.tensors()
        assert be.rollback() == 0
        ref = _ref(out, RefitBlob(tensors={**export, **local}, fingerprint=manifest.fingerprint, version=1), x)
        assert np.abs(be.infer(x) - ref).max() / np.abs(ref).max() <= 1e-3
