"""The fp16 ONNX copy that strongly typed TensorRT 11 builds from, checked with ONNX Runtime on CPU: same IO,
fp16 weights, the export's identity kept, and a refit cast from fp32 blobs that matches the fp32 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract import blob_from_path, manifest_from_dir
from cema_deploy.contract.norms_file import NORMS_FILE
from cema_deploy.exceptions import RefitError
from cema_deploy.runtime.backends.onnxrt import session_from_onnx
from cema_deploy.runtime.backends.trt_fp16 import fp16_copy_of_onnx, fp16_norms_layout, write_fp16_norms
from tests.conftest import needs_torch

pytestmark = needs_torch


def _x(manifest, n: int = 16) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.random.default_rng(1).standard_normal((n, *manifest.input.shape[1:])).astype(np.float32)


def _agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    return rel, float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.parametrize("kind", ["bn", "gn", "ln"])
def test_fp16_copy_keeps_float32_io_and_matches_the_fp32_export(exported, tmp_path: Path, kind: str) -> None:
    import onnx

    out, _ = exported(kind)
    manifest = manifest_from_dir(out)
    copy = fp16_copy_of_onnx(out, manifest, tmp_path / "fp16")
    proto = onnx.load(str(copy), load_external_data=False)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [f32]
    inits = {i.name: i for i in proto.graph.initializer}
    assert all(i.data_type != f32 for i in inits.values())
    assert all(inits[p.name].data_type == f16 and inits[p.name].data_location == 1 for p in manifest.refittable)
    onnx.checker.check_model(str(copy))
    x = _x(manifest)
    ref = session_from_onnx(Path(out) / manifest.model_file).run(x)
    half = session_from_onnx(copy).run(x)
    rel, top1 = _agree(ref, half)
    assert rel < 2e-2 and top1 >= 0.9, (rel, top1)
    assert manifest_from_dir(out).fingerprint == manifest.fingerprint  # the export is untouched
    assert fp16_copy_of_onnx(out, manifest, tmp_path / "fp16") == copy  # reused, not rewritten


def test_refit_casts_fp32_blob_tensors_into_the_copy(exported, tmp_path: Path) -> None:
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    copy = fp16_copy_of_onnx(out, manifest, tmp_path / "fp16")
    blob = blob_from_path(Path(out) / manifest.params_file)
    rng = np.random.default_rng(3)
    new = {}
    for k, v in blob.tensors.items():
        noise = rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.05)
        new[k] = v * np.float32(1.7) if "running_var" in k else v * np.float32(1.3) + noise
    write_fp16_norms(manifest, new, copy.parent / NORMS_FILE)
    x = _x(manifest)
    ref = session_from_onnx(Path(out) / manifest.model_file, tensors=new).run(x)
    old = session_from_onnx(Path(out) / manifest.model_file).run(x)
    half = session_from_onnx(copy).run(x)
    rel, top1 = _agree(ref, half)
    assert rel < 2e-2 and top1 >= 0.9, (rel, top1)
    assert _agree(ref, old)[0] > 10 * rel  # the refit did change the outputs


def test_values_beyond_float16_are_refused_not_served_as_inf(exported, tmp_path: Path) -> None:
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    tensors = dict(blob_from_path(Path(out) / manifest.params_file).tensors)
    name = manifest.refittable[0].name
    tensors[name] = tensors[name] + np.float32(1e5)
    with pytest.raises(RefitError, match="float16's range"):
        write_fp16_norms(manifest, tensors, tmp_path / NORMS_FILE)


def test_fp16_layout_is_aligned_and_half_the_size(exported) -> None:
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    layout = fp16_norms_layout(manifest)
    assert [n for n, _, _ in layout] == [p.name for p in manifest.refittable]
    assert all(
        off % 64 == 0 and nbytes == p.numel * 2 for (_, off, nbytes), p in zip(layout, manifest.refittable, strict=True)
    )
