"""``ort-trt`` provider options: the TensorRT EP's engine cache is keyed by the weights, so a refit never loads an
engine built with old ones; ORT's weight-stripped engines (REFIT_IDENTICAL) stay off. Runs without a GPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract import blob_from_path, manifest_from_dir
from cema_deploy.exceptions import BackendError, BackendUnavailableError
from cema_deploy.runtime import get_backend
from cema_deploy.runtime.backends.ort_trt import prune_engine_dirs, trt_provider_options, weights_digest
from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture
def export(exported):  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    return Path(out), manifest, dict(blob_from_path(Path(out) / manifest.params_file).tensors)


def _opts(manifest, tensors, tmp_path: Path, **kw: object) -> dict[str, str]:  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"max_batch": 32, "precision": "fp32", "cache_root": tmp_path, "ort_version": "1.22.0"}
    args.update(kw)
    return trt_provider_options(manifest, tensors, **args)  # type: ignore[arg-type]


def test_new_weights_get_a_new_engine_cache_folder_same_weights_the_same(export, tmp_path: Path) -> None:
    _, manifest, tensors = export
    a = _opts(manifest, tensors, tmp_path)
    assert _opts(manifest, {k: v.copy() for k, v in tensors.items()}, tmp_path) == a
    changed = dict(tensors)
    name = manifest.refittable[0].name
    changed[name] = changed[name] + np.float32(1e-3)
    b = _opts(manifest, changed, tmp_path)
    assert a["trt_engine_cache_path"] != b["trt_engine_cache_path"]
    assert a["trt_timing_cache_path"] == b["trt_timing_cache_path"]  # timings do not depend on weight values
    assert weights_digest(manifest, tensors) != weights_digest(manifest, changed)
    assert _opts(manifest, tensors, tmp_path, precision="fp16")["trt_engine_cache_path"] != a["trt_engine_cache_path"]
    assert _opts(manifest, tensors, tmp_path, max_batch=64)["trt_engine_cache_path"] != a["trt_engine_cache_path"]


def test_options_are_strings_with_an_explicit_profile_and_no_weight_stripping(export, tmp_path: Path) -> None:
    _, manifest, tensors = export
    opts = _opts(manifest, tensors, tmp_path, precision="fp16", max_batch=64)
    assert all(isinstance(v, str) for v in opts.values())
    chw = "x".join(str(d) for d in manifest.input.shape[1:])
    assert opts["trt_profile_min_shapes"] == f"{manifest.input.name}:1x{chw}"
    assert opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == f"{manifest.input.name}:64x{chw}"
    assert opts["trt_fp16_enable"] == "True" and opts["trt_weight_stripped_engine_enable"] == "False"
    assert opts["trt_engine_cache_enable"] == "True"
    assert _opts(manifest, tensors, tmp_path, ort_version="1.14.1") == {}  # an old EP: no cache at all
    with pytest.raises(BackendError, match="NVIDIA_TF32_OVERRIDE"):
        _opts(manifest, tensors, tmp_path, precision="tf32")


def test_engine_folders_beyond_serving_and_rollback_are_pruned(tmp_path: Path) -> None:
    dirs = []
    for i in range(4):
        d = tmp_path / f"w-{i}"
        d.mkdir()
        t = time.time() - 100 + i
        os.utime(d, (t, t))
        dirs.append(d)
    removed = prune_engine_dirs(dirs[3])
    assert sorted(removed) == dirs[:2]
    assert [d.exists() for d in dirs] == [False, False, True, True]


def test_without_the_tensorrt_ep_the_backend_says_what_to_install(export, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the TensorRT EP")
    out, _, _ = export
    with pytest.raises(BackendUnavailableError, match="TensorrtExecutionProvider is not available"):
        get_backend("ort-trt", out, max_batch=8, precision="fp16", intra_op_threads=1, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # no engine folders for an EP that is not here


def test_engine_dirs_stay_bounded_over_many_refits(export, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    from cema_deploy.runtime.backends.onnxrt import PROVIDERS
    from cema_deploy.runtime.backends.ort_trt import KEEP_ENGINE_DIRS, OrtTrtBackend

    _, manifest, tensors = export
    # the provider options a refit asks for, as on a machine with the TensorRT EP (no session is built here)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDERS["ort-trt"]))
    be = OrtTrtBackend.__new__(OrtTrtBackend)
    be.manifest, be.max_batch, be.precision, be.cache_root, be.engine_dirs = manifest, 8, "fp32", tmp_path, []
    name = manifest.refittable[0].name
    for i in range(6):  # six refits, each with new weights
        be._provider_options({**tensors, name: tensors[name] + np.float32(i)})
    assert len(be.engine_dirs) == KEEP_ENGINE_DIRS and all(d.is_dir() for d in be.engine_dirs)
    on_disk = sorted(d for d in be.engine_dirs[-1].parent.iterdir() if d.is_dir())
    assert on_disk == sorted(be.engine_dirs)  # the list names exactly the folders kept
    d4, d5 = be.engine_dirs
    be._provider_options({**tensors, name: tensors[name] + np.float32(4)})  # the rollback target's weights again
    assert be.engine_dirs == [d5, d4]  # listed once, most recent last
