"""The ONNX Runtime backend: parity, hot refit under concurrent load (prepared and plain refit paths), bad
blobs, rollback, the warm swap and the previous engine kept for comparison."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, blob_from_bytes, blob_from_path, blob_to_bytes, manifest_from_dir
from cema_deploy.exceptions import (
    BackendError,
    BackendUnavailableError,
    BlobSchemaError,
    BlobValueError,
    FingerprintMismatchError,
    RefitError,
    StaleBlobError,
)
from cema_deploy.runtime import get_backend, list_backends
from tests.conftest import needs_torch

pytestmark = needs_torch


def _perturbed(model, manifest, seed):
    """A deep copy of ``model`` with every refittable tensor changed, and the blob tensors for it."""
    import torch

    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    sd = m.state_dict()
    new = {}
    with torch.no_grad():
        for p in manifest.refittable:
            t = sd[p.name]
            if p.name.endswith("running_var"):
                t.mul_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)
            new[p.name] = t.numpy().copy()
    return m, new


def _ref(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture
def setup(exported):
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = np.random.default_rng(0).standard_normal((4, *manifest.input.shape[1:])).astype(np.float32)
    return out, model, manifest, x


def test_registry_and_errors(setup):
    out, *_ = setup
    assert set(list_backends()) == {"ort-cpu", "ort-cuda", "ort-trt", "trt"}
    with pytest.raises(BackendUnavailableError, match="Unknown backend 'nope'; expected one of: ort-cpu"):
        get_backend("nope", out)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"pip install 'cema-deploy\[gpu\]'"):
            get_backend("ort-cuda", out)


def test_parity_and_refit_and_rollback(setup):
    out, model, manifest, x = setup
    with get_backend("ort-cpu", out) as be:
        assert be.version == 0 and be.providers == ["CPUExecutionProvider"]
        old = _ref(model, x)
        np.testing.assert_allclose(be.infer(x), old, atol=1e-4, rtol=0)
        new_model, tensors = _perturbed(model, manifest, 1)
        new = _ref(new_model, x)
        report = be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert report.new_version == 1 and be.version == 1
        np.testing.assert_allclose(be.infer(x), new, atol=1e-4, rtol=0)
        assert np.abs(new - old).max() > 1e-2
        assert be.rollback() == 0
        np.testing.assert_allclose(be.infer(x), old, atol=1e-4, rtol=0)
        with pytest.raises(RefitError, match="Nothing to roll back"):
            be.rollback()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda t, fp: RefitBlob(tensors=t, fingerprint="0" * 64, version=5), FingerprintMismatchError),
        (lambda t, fp: RefitBlob(tensors=t, fingerprint=fp, version=0), StaleBlobError),
        (lambda t, fp: RefitBlob(tensors=dict(list(t.items())[1:]), fingerprint=fp, version=5), BlobSchemaError),
        (
            lambda t, fp: RefitBlob(
                tensors={k: v[..., :1] if i == 0 else v for i, (k, v) in enumerate(t.items())},
                fingerprint=fp,
                version=5,
            ),
            BlobSchemaError,
        ),
        (
            lambda t, fp: RefitBlob(tensors={k: v * np.nan for k, v in t.items()}, fingerprint=fp, version=5),
            BlobValueError,
        ),
    ],
)
def test_bad_blob_leaves_old_outputs(setup, change, error):
    out, model, manifest, x = setup
    _, tensors = _perturbed(model, manifest, 2)
    with get_backend("ort-cpu", out) as be:
        before = be.infer(x)
        with pytest.raises(error):
            be.refit(change(tensors, manifest.fingerprint))
        assert be.version == 0
        np.testing.assert_array_equal(be.infer(x), before)


def test_build_failure_is_refit_error_and_changes_nothing(setup, tmp_path):
    """A blob that validates but cannot be built (engine file gone) raises RefitError; old params serve."""
    import shutil

    out, model, manifest, x = setup
    copy_dir = tmp_path / "m"
    shutil.copytree(out, copy_dir)
    _, tensors = _perturbed(model, manifest, 3)
    with get_backend("ort-cpu", copy_dir, refit_path="plain") as be:
        assert be.refit_path == "plain"
        before = be.infer(x)
        (copy_dir / "model.onnx").write_bytes(b"not an onnx file")
        with pytest.raises(RefitError, match=r"previous parameters keep serving|failed"):
            be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert be.version == 0
        np.testing.assert_array_equal(be.infer(x), before)


@pytest.mark.parametrize("kind", ["bn", "gn", "ln"])
def test_prepared_refits_match_plain_sessions(exported, kind):
    """The prepared path (ORT's optimised graph saved once, fused initializers computed in numpy) gives the
    logits of a plain session built with the same tensors, at every batch size, for BN, GN and LN models."""
    out, model = exported(kind)
    manifest = manifest_from_dir(out)
    x = np.random.default_rng(1).standard_normal((3, *manifest.input.shape[1:])).astype(np.float32)
    _, tensors = _perturbed(model, manifest, 4)
    new_model, _ = _perturbed(model, manifest, 4)
    with (
        get_backend("ort-cpu", out, refit_path="prepared") as fast,
        get_backend("ort-cpu", out, refit_path="inplace") as inplace,
        get_backend("ort-cpu", out, refit_path="plain") as plain,
    ):
        assert (fast.refit_path, fast.prepare_error, plain.refit_path) == ("prepared", None, "plain")
        assert (inplace.refit_path, inplace.inplace_error) == ("inplace", None)
        for be in (fast, inplace, plain):
            be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        for be in (fast, inplace):
            np.testing.assert_allclose(be.infer(x), plain.infer(x), atol=1e-5, rtol=0)
            np.testing.assert_allclose(be.infer(x[:1]), _ref(new_model, x[:1]), atol=1e-4, rtol=0)


def test_prepared_refits_do_not_read_the_model_file_again(setup, tmp_path):
    """The prepared graph is held in memory: a refit still works when model.onnx is gone."""
    import shutil

    out, model, manifest, x = setup
    copy_dir = tmp_path / "m"
    shutil.copytree(out, copy_dir)
    new_model, tensors = _perturbed(model, manifest, 5)
    with get_backend("ort-cpu", copy_dir, refit_path="prepared") as be:
        assert be.refit_path == "prepared"
        (copy_dir / "model.onnx").unlink()
        be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        np.testing.assert_allclose(be.infer(x), _ref(new_model, x), atol=1e-4, rtol=0)


def test_unknown_refit_path_is_a_clean_error(setup):
    out, *_ = setup
    with pytest.raises(BackendError, match="Unknown refit path 'fast'; expected one of"):
        get_backend("ort-cpu", out, refit_path="fast")


def test_previous_engine_stays_resident_for_comparison(setup):
    """infer_previous gives the logits of the parameters that served before the last refit; after a
    rollback (or before any refit) there is none."""
    out, model, manifest, x = setup
    with get_backend("ort-cpu", out) as be:
        assert be.previous_version is None and be.infer_previous(x) is None
        m1, t1 = _perturbed(model, manifest, 6)
        m2, t2 = _perturbed(m1, manifest, 7)
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1))
        assert be.previous_version == 0
        np.testing.assert_allclose(be.infer_previous(x), _ref(model, x), atol=1e-4, rtol=0)
        be.refit(RefitBlob(tensors=t2, fingerprint=manifest.fingerprint, version=2))
        assert (be.version, be.previous_version) == (2, 1)  # version 0's engine has left: two resident
        np.testing.assert_allclose(be.infer_previous(x), _ref(m1, x), atol=1e-4, rtol=0)
        np.testing.assert_allclose(be.infer(x), _ref(m2, x), atol=1e-4, rtol=0)
        # version 3 is built into the arrays version 0's engine left behind (prepared path): the two
        # resident engines must still compute exactly their own parameters
        m3, t3 = _perturbed(m2, manifest, 9)
        be.refit(RefitBlob(tensors=t3, fingerprint=manifest.fingerprint, version=3))
        np.testing.assert_allclose(be.infer_previous(x), _ref(m2, x), atol=1e-4, rtol=0)
        np.testing.assert_allclose(be.infer(x), _ref(m3, x), atol=1e-4, rtol=0)
        assert be.rollback() == 2
        assert be.previous_version is None and be.infer_previous(x) is None


def test_refit_warms_the_new_engine_up_at_the_serving_shape(setup):
    """The report times the warm-up inference, run at the batch shape served last, before the swap."""
    out, model, manifest, x = setup
    _, tensors = _perturbed(model, manifest, 8)
    with get_backend("ort-cpu", out) as be:
        be.infer(x[:2])
        report = be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert report.warmup_s > 0 and report.build_s > 0
        assert be.serving_shape == (2, *manifest.input.shape[1:])


@pytest.mark.parametrize("mode", ["hybrid", "inplace", "prepared", "plain"])
def test_refit_under_concurrent_load(setup, mode):
    """Four threads infer while refits swap parameters: every response equals either the old or the new
    reference (never a mix), none fails, and the new parameters serve once the refit returns."""
    out, model, manifest, x = setup
    models = [model]
    blobs = []
    for v in (1, 2, 3):
        m, t = _perturbed(models[-1], manifest, 10 + v)
        models.append(m)
        blobs.append(RefitBlob(tensors=t, fingerprint=manifest.fingerprint, version=v))
    refs = {v: _ref(m, x) for v, m in enumerate(models)}
    errors: list[BaseException] = []
    seen: dict[int, int] = {}
    stop = threading.Event()
    with get_backend("ort-cpu", out, refit_path=mode) as be:
        assert be.refit_path == mode

        def worker() -> None:
            try:
                while not stop.is_set():
                    logits, version = be.infer_versioned(x)
                    np.testing.assert_allclose(logits, refs[version], atol=1e-4, rtol=0)
                    others = [v for v in refs if v != version]
                    assert all(np.abs(logits - refs[o]).max() > 1e-3 for o in others)
                    seen[version] = seen.get(version, 0) + 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for b in blobs:
            blob = blob_from_bytes(blob_to_bytes(b))  # as received over the wire
            be.refit_async(blob).result(timeout=30)
            assert be.version == b.version
            np.testing.assert_allclose(be.infer(x), refs[b.version], atol=1e-4, rtol=0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    assert seen.get(0, 0) > 0 and sum(seen.values()) > 8


def test_version_zero_comes_from_params_file(setup):
    out, *_ = setup
    assert blob_from_path(out / "params.safetensors").version == 0


def test_trt_backend_missing_names_the_extra(setup):
    import importlib.util

    from cema_deploy.exceptions import MissingExtraError

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out, *_ = setup
    with pytest.raises(MissingExtraError, match=r"pip install 'cema-deploy\[trt\]'"):
        get_backend("trt", out)
