"""A head refit on the edge (``export --refit head``, issue 22 item 3): every ONNX Runtime refit path serves what
PyTorch computes with the same new head and norms; blob validation accepts exactly the manifest's refittable set
(a head tensor sent to a norms-only export is refused and changes nothing); TensorRT's refit path names the head
(stand-ins: the refit source's ONNX and the weights marked refittable, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, manifest_from_dir, validate_blob
from cema_deploy.exceptions import BackendError, BlobSchemaError, BlobValueError
from cema_deploy.runtime import get_backend
from tests.conftest import needs_torch
from tests.runtime.backends.test_onnxrt_backend import _perturbed, _ref

pytestmark = needs_torch

PATHS = [("bn", "hybrid"), ("bn", "inplace"), ("bn", "prepared"), ("bn", "plain"), ("gn", "inplace"),
         ("gn", "prepared"), ("ln", "inplace"), ("ln", "plain")]  # fmt: skip


def _x(manifest, n: int = 3) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.random.default_rng(5).standard_normal((n, *manifest.input.shape[1:])).astype(np.float32)


@pytest.mark.parametrize(("kind", "path"), PATHS)
def test_every_ort_refit_path_serves_a_new_head_as_pytorch_does(exported_head, kind: str, path: str) -> None:  # type: ignore[no-untyped-def]
    """The in-place paths hand the head's Gemm weight to a kernel that would prepack (copy) it: without prepacking
    off, their start-up self-test fails (``inplace``/``hybrid`` refuse to start) and ``auto`` falls back."""
    out, model = exported_head(kind)
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    with get_backend("ort-cpu", out, refit_path=path) as be:
        assert be.refit_path == path, (be.prepare_error, be.inplace_error)
        for version, seed in ((1, 11), (2, 12)):  # two refits: the second writes engines the first left behind
            new_model, tensors = _perturbed(model, manifest, seed)
            be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=version))
            want = _ref(new_model, x)
            assert np.abs(be.infer(x) - want).max() <= 1e-4
        assert np.abs(want - _ref(model, x)).max() > 0.1  # the refit changed the logits


def test_auto_keeps_the_in_place_paths_for_a_head_export(exported_head) -> None:  # type: ignore[no-untyped-def]
    for kind, path in (("bn", "hybrid"), ("gn", "inplace"), ("ln", "inplace")):
        with get_backend("ort-cpu", exported_head(kind)[0]) as be:
            assert be.refit_path == path, (kind, be.inplace_error)


def test_a_head_only_change_reaches_the_logits_on_the_hybrid_path(exported_head) -> None:  # type: ignore[no-untyped-def]
    """Norms as exported, only the classifier new: the engine that takes the refit and the fused engine it is
    promoted to both serve the new head."""
    import time

    import torch

    out, model = exported_head("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    with get_backend("ort-cpu", out) as be:
        tensors = dict(be.tensors)
        rng = np.random.default_rng(3)
        for p in manifest.head_refittable:
            tensors[p.name] = (tensors[p.name] + rng.normal(0, 0.5, p.shape)).astype(np.float32)
        with torch.no_grad():
            w, b = torch.from_numpy(tensors["fc.weight"]), torch.from_numpy(tensors["fc.bias"])
            features = model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True)
            want = (features @ w.T + b).numpy()
        assert np.abs(be.infer(x) - want).max() > 0.1
        be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert np.abs(be.infer(x) - want).max() <= 1e-4  # the unfused engine (or the fused one, if promoted already)
        deadline = time.monotonic() + 30
        while not be.serving_fused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert be.serving_fused
        assert np.abs(be.infer(x) - want).max() <= 1e-4


def test_blob_validation_accepts_exactly_the_manifests_refittable_set(exported, exported_head) -> None:  # type: ignore[no-untyped-def]
    norms_dir, model = exported("bn")
    head_dir, _ = exported_head("bn")
    norms, head = manifest_from_dir(norms_dir), manifest_from_dir(head_dir)
    _, with_head = _perturbed(model, head, 21)
    validate_blob(RefitBlob(tensors=with_head, fingerprint=head.fingerprint, version=1), head)
    without_head = {k: v for k, v in with_head.items() if k in norms.refittable_by_name}
    with pytest.raises(BlobSchemaError, match=r"2 missing \['fc.bias', 'fc.weight'\]"):
        validate_blob(RefitBlob(tensors=without_head, fingerprint=head.fingerprint, version=1), head)
    with pytest.raises(BlobSchemaError, match=r"1 unexpected \['fc.weight'\]"):
        extra = dict(without_head, **{"fc.weight": with_head["fc.weight"]})
        validate_blob(RefitBlob(tensors=extra, fingerprint=norms.fingerprint, version=1), norms)
    with pytest.raises(BlobSchemaError, match=r"'fc.weight' is float32\[10, 95\], expected float32\[10, 96\]"):
        bad = dict(with_head, **{"fc.weight": with_head["fc.weight"][:, :95].copy()})
        validate_blob(RefitBlob(tensors=bad, fingerprint=head.fingerprint, version=1), head)
    with pytest.raises(BlobValueError, match=r"'fc\.bias' holds NaN"):
        nan = dict(with_head, **{"fc.bias": np.full(10, np.nan, np.float32)})
        validate_blob(RefitBlob(tensors=nan, fingerprint=head.fingerprint, version=1), head)


def test_a_head_tensor_sent_to_a_norms_only_edge_is_refused_and_changes_nothing(exported) -> None:  # type: ignore[no-untyped-def]
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    _, tensors = _perturbed(model, manifest, 31)
    tensors["fc.weight"] = model.state_dict()["fc.weight"].numpy() * 2
    with get_backend("ort-cpu", out) as be:
        before, version = be.infer(x), be.version
        with pytest.raises(BlobSchemaError, match="unexpected"):
            be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert be.version == version and np.array_equal(be.infer(x), before)


def test_tensorrt_marks_the_head_refittable_and_its_refit_source_carries_it(exported_head, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Stand-ins (no GPU here): ``refit_mode='individual'`` marks the head's weights by name (and refuses a parser
    that does not expose them); the ONNX the refitter reads (fp32, and the fp16 copy of TensorRT 11) holds the new
    head, and ORT on the fp32 one computes PyTorch's logits with it."""
    import onnx
    from onnx import numpy_helper

    from cema_deploy.runtime.backends import trt_build as tb
    from cema_deploy.runtime.backends.onnxrt import session_from_onnx
    from cema_deploy.runtime.backends.trt import _RefitSource
    from cema_deploy.runtime.backends.trt_fp16 import fp16_copy_of_onnx

    out, model = exported_head("bn")
    manifest = manifest_from_dir(out)

    class WeightNames:  # the one INetworkDefinition call marking uses
        def __init__(self, names: set[str]) -> None:
            self.names = names

        def mark_weights_refittable(self, name: str) -> bool:
            return name in self.names

    folded = tb.bn_fold_candidates(len(tb.bn_layers(manifest)))[: 2 * len(tb.bn_layers(manifest))]
    marked = tb.mark_norm_weights_refittable(WeightNames({*folded, "fc.weight", "fc.bias"}), manifest)
    assert {"fc.weight", "fc.bias"} <= set(marked)
    with pytest.raises(BackendError, match=r"unmarked \['fc.weight', 'fc.bias'\]"):
        tb.mark_norm_weights_refittable(WeightNames(set(folded)), manifest)

    new_model, tensors = _perturbed(model, manifest, 41)
    x = _x(manifest)
    source = _RefitSource(out / manifest.model_file, manifest, fp16=False)
    try:
        session = session_from_onnx(source.write(tensors))
        assert np.abs(session.run(x) - _ref(new_model, x)).max() <= 1e-4
    finally:
        source.close()
    fp16_dir = tmp_path / "fp16"
    fp16_onnx = fp16_copy_of_onnx(out, manifest, fp16_dir)
    source = _RefitSource(fp16_onnx, manifest, fp16=True)
    try:
        inits = {i.name: i for i in onnx.load(str(source.write(tensors))).graph.initializer}
        got = numpy_helper.to_array(inits["fc.weight"])
        assert got.dtype == np.float16 and np.array_equal(got, tensors["fc.weight"].astype(np.float16))
    finally:
        source.close()


def test_a_bias_only_head_keeps_prepacking_and_the_in_place_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Above 100 classes the head is bias only: the Gemm's weight stays a constant that ORT may prepack (only
    refit-dependent weights turn prepacking off), and the bias, read at every run, is written in place."""
    import timm
    import torch

    from cema_deploy.export.to_onnx import export_timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=101).eval()
    out = tmp_path / "bias-only"
    manifest = export_timm("test_resnet", out, model=model, img_size=64, refit="head").manifest
    assert [p.name for p in manifest.head_refittable] == ["fc.bias"]
    x = _x(manifest)
    with get_backend("ort-cpu", out) as be:
        assert be.refit_path == "hybrid", be.inplace_error
        assert be._prepared is not None and be._prepared.packed == frozenset()
        new_model, tensors = _perturbed(model, manifest, 51)
        be.refit(RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1))
        assert np.abs(be.infer(x) - _ref(new_model, x)).max() <= 1e-4


def test_a_refittable_head_weight_is_the_one_input_kept_from_prepacking(exported_head) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported_head("bn")
    with get_backend("ort-cpu", out) as be:
        assert be._prepared is not None and be._prepared.packed == frozenset({"fc.weight"})
